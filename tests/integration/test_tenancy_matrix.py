"""The tenancy matrix, generated from the exported SDL: every root field, mutation and subscription × every role
× own org / another org / no org, against the contract's role table (contracts section 2).

A new root field is covered the day it lands: its scope comes from its ``@requires``, its org from an ``orgId``
argument or an input's ``orgId``. A field that names no org must be listed in ``ORGLESS`` (saying what it
reaches), and a required argument of a new input type needs a sample in ``SAMPLES``; until then this test fails.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from graphql import (
    GraphQLArgument,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLNonNull,
    GraphQLObjectType,
    Undefined,
    build_schema,
    get_named_type,
    is_leaf_type,
)

from gateway.resources import Resources
from kernel.scopes import ROLE_GRANTS, Scope
from resolvers.root import build_schema as build_gateway_schema
from schema.context import Context
from schema.loaders import Loaders
from tests.conftest import TokenFactory
from tests.helpers import graphql

SDL = Path(__file__).resolve().parents[2] / "schema" / "schema.graphql"
OWN, OTHER = "org_tenant_own", "org_tenant_other"
ROLES = sorted(ROLE_GRANTS)
PLATFORM_ROLES = {role for role, grant in ROLE_GRANTS.items() if grant.all_orgs}
RANGE = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"}
MODEL = f"tenancy-{uuid.uuid4().hex[:8]}"

# Root fields with no org argument, and what they reach: "global" (not org data: any caller holding a GraphQL
# scope and the field's own scope), "all_orgs" (every org's data: platform roles only), "by_id" (an object whose
# org is checked when it is found; an unknown id is null for everyone allowed to ask).
ORGLESS = {
    "viewer": "global",
    "modelPrices": "global",
    "upsertModelPrice": "global",
    "spendByOrg": "all_orgs",
    "exportJob": "by_id",  # the query (null when unknown) and the subscription (NOT_FOUND when unknown)
    "cancelExportJob": "by_id",  # NOT_FOUND when unknown: its answer is not nullable
}
# Fields whose org argument may be null, when null does not mean "every org": "scoped" (the orgs the caller
# sees: any role with the field's scope may ask, and gets only its own orgs' data; the export tests check that
# no other org's job is listed).
NULL_ORG = {"exportJobs": "scoped"}
# Values for required arguments, by named input type (orgId is filled in per case).
SAMPLES: dict[str, Any] = {
    "ID": lambda: str(uuid.uuid4()),
    "String": lambda: MODEL,
    "TimeRange": lambda: dict(RANGE),
    "ModelPriceInput": lambda: {
        "model": MODEL,
        "effectiveFrom": "2026-01-01T00:00:00Z",
        "inputPerMillion": "1",
        "outputPerMillion": "2",
    },
    "CostExportInput": lambda: {"month": "2026-11"},
    "IncidentExportInput": lambda: {"range": dict(RANGE)},
}


@dataclass(frozen=True)
class Case:
    operation: str  # query, mutation, subscription
    field: str
    org: str  # own, other, none
    document: str
    variables: dict[str, Any]
    scope: Scope | None
    reach: str  # org, all_orgs, global, by_id, scoped

    def allowed_for(self, role: str) -> bool:
        grant = ROLE_GRANTS[role]
        if not grant.scopes or (self.scope is not None and self.scope not in grant.scopes):
            return False
        if self.reach in ("global", "by_id", "scoped") or (self.reach == "org" and self.org == "own"):
            return True
        return grant.all_orgs  # another org's data, or every org's

    def __str__(self) -> str:
        return f"{self.operation} {self.field} ({self.org} org)"


def _required_scope(field: GraphQLField) -> Scope | None:
    for directive in (field.ast_node.directives or ()) if field.ast_node else ():
        if directive.name.value == "requires":
            return Scope(directive.arguments[0].value.value)  # type: ignore[attr-defined]
    return None


def _org_argument(field: GraphQLField) -> tuple[str, bool] | None:
    """Where the field takes its org: ("orgId", nullable) or ("input.orgId", nullable)."""
    if "orgId" in field.args:
        return "orgId", not isinstance(field.args["orgId"].type, GraphQLNonNull)
    for name, argument in field.args.items():
        named = get_named_type(argument.type)
        if isinstance(named, GraphQLInputObjectType) and "orgId" in named.fields:
            return f"{name}.orgId", not isinstance(named.fields["orgId"].type, GraphQLNonNull)
    return None


def _has_default(argument: GraphQLArgument) -> bool:
    return argument.default_value is not Undefined or getattr(argument, "default", None) is not None


def _sample(name: str, argument: GraphQLArgument) -> Any:
    type_name = get_named_type(argument.type).name
    if type_name not in SAMPLES:
        raise AssertionError(f"argument {name}: {type_name} has no sample in SAMPLES; add one")
    return SAMPLES[type_name]()


def _cases_for(operation: str, name: str, field: GraphQLField) -> list[Case]:
    scope = _required_scope(field)
    org_argument = _org_argument(field)
    if org_argument is None and name not in ORGLESS:
        raise AssertionError(f"{operation} field {name} names no org: say in ORGLESS what it reaches")
    required = {n: a for n, a in field.args.items() if isinstance(a.type, GraphQLNonNull) and not _has_default(a)}
    values = {n: _sample(n, a) for n, a in required.items() if n != "orgId"}
    selection = "" if is_leaf_type(get_named_type(field.type)) else " { __typename }"
    if org_argument is None:
        orgs: list[tuple[str, str | None]] = [("none", None)]
        reach = ORGLESS[name]
    else:
        nullable = org_argument[1]
        orgs = [("own", OWN), ("other", OTHER)] + ([("none", None)] if nullable else [])
        reach = "org"
    cases = []
    for label, org in orgs:
        variables = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
        if org_argument is not None:
            path = org_argument[0].split(".")
            if len(path) == 1:
                variables["orgId"] = org
            else:
                variables.setdefault(path[0], SAMPLES[get_named_type(field.args[path[0]].type).name]())[path[1]] = org
        declared = ", ".join(f"${n}: {field.args[n].type}" for n in variables)
        passed = ", ".join(f"{n}: ${n}" for n in variables)
        document = (
            f"{operation}{f'({declared})' if declared else ''} {{ {name}{f'({passed})' if passed else ''}{selection} }}"
        )
        case_reach = NULL_ORG.get(name, "all_orgs") if org_argument is not None and org is None else reach
        cases.append(Case(operation, name, label, document, variables, scope, case_reach))
    return cases


def _all_cases() -> list[Case]:
    schema = build_schema(SDL.read_text())
    cases = []
    for operation, root in (("query", schema.query_type), ("mutation", schema.mutation_type),
                            ("subscription", schema.subscription_type)):  # fmt: skip
        assert isinstance(root, GraphQLObjectType) or root is None
        for name, field in root.fields.items() if root else ():
            cases += _cases_for(operation, name, field)
    return cases


CASES = _all_cases()


def _token(make_token: TokenFactory, role: str) -> str:
    return make_token(role, org=None if role in PLATFORM_ROLES else OWN, sub=f"tenancy-{role}")


def _denied(errors: list[dict[str, Any]], field: str, reach: str) -> bool:
    """FORBIDDEN: denied. Any other code is a failure, except NOT_FOUND for an unknown id of a field reached by
    id (the caller was allowed to ask; the sampled id exists nowhere)."""
    codes = {e["extensions"]["code"] for e in errors if (e.get("path") or [field])[0] == field}
    allowed_codes = {"FORBIDDEN", "NOT_FOUND"} if reach == "by_id" else {"FORBIDDEN"}
    assert codes <= allowed_codes, f"unexpected errors: {errors}"
    return "FORBIDDEN" in codes


def test_every_root_field_is_in_the_matrix() -> None:
    fields = {(c.operation, c.field) for c in CASES}
    assert ("query", "usage") in fields and ("subscription", "freshness") in fields
    assert {c.org for c in CASES if c.field == "usage"} == {"own", "other"}


@pytest.mark.parametrize("role", ROLES)
async def test_queries_and_mutations_follow_the_role_table(
    client: httpx.AsyncClient, make_token: TokenFactory, role: str
) -> None:
    token = _token(make_token, role)
    wrong = []
    for case in (c for c in CASES if c.operation != "subscription"):
        response = await graphql(client, case.document, token, case.variables)
        body = response.json()
        denied = response.status_code == 403 or _denied(body.get("errors", []), case.field, case.reach)
        if denied == case.allowed_for(role):
            wrong.append(f"{case}: {'denied' if denied else 'allowed'}; body {body}")
        if denied:
            assert (body.get("data") or {}).get(case.field) is None, f"{case} leaked data"
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("role", ROLES)
async def test_subscriptions_follow_the_role_table(resources: Resources, make_token: TokenFactory, role: str) -> None:
    """In process, on the schema the app serves: authorization lives there; the WebSocket's own checks (token at
    connect and per operation) are tested with the transport."""
    caller = await resources.verifier.verify(_token(make_token, role))
    schema = build_gateway_schema()
    wrong = []
    for case in (c for c in CASES if c.operation == "subscription"):
        context = Context(resources=resources, caller=caller, loaders=Loaders(resources))
        stream = await schema.subscribe(case.document, variable_values=case.variables, context_value=context)
        first = await asyncio.wait_for(anext(stream), 10) if hasattr(stream, "__anext__") else stream
        if hasattr(stream, "aclose"):
            await stream.aclose()
        errors = [{"path": e.path, "extensions": e.extensions or {}} for e in first.errors or []]
        denied = _denied(errors, case.field, case.reach)
        if denied == case.allowed_for(role):
            wrong.append(f"{case}: {'denied' if denied else 'allowed'}; errors {errors}")
    assert not wrong, "\n".join(wrong)
