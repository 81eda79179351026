"""A schema extension that audits every GraphQL operation (contracts section 2).

Requests refused before they became an operation (unreadable JSON, an unsupported content type, a document over
its size budget) are recorded too, as ``graphql.refused`` with the reason, when the caller is known; requests
refused for their caller's rate are not (each would be an audit row for the caller who floods: they are counted
in the HTTP metrics and the access log instead).

What is recorded is what was executed, not what the client called it: the root fields that the operation
selects once fragments, ``@skip``/``@include`` and variables are applied, and the orgs of their coerced
``orgId`` arguments (an input object's ``orgId`` included). The client's ``operationName`` is kept in the
detail only. Queries and mutations are recorded when they finish; a subscription when its first result (or
its refusal) is sent, and otherwise when it ends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLObjectType,
    GraphQLSchema,
    OperationDefinitionNode,
    get_operation_ast,
)
from graphql.execution.collect_fields import FragmentDetails, collect_fields
from graphql.execution.values import get_argument_values, get_variable_values
from strawberry.extensions import SchemaExtension

from db.audit_trail import AuditEntry, AuditTrail
from kernel.auth import Caller
from kernel.errors import ErrorCode
from schema.errors import error_code


@dataclass(frozen=True)
class Executed:
    """The operation as it runs: its type, its root fields and the orgs they ask for."""

    kind: str
    fields: list[str]
    orgs: list[str]


class AuditOperations(SchemaExtension):
    """After each operation: who, which root fields, which orgs, and the outcome."""

    _recorded = False
    _started: dt.datetime

    def on_operation(self) -> Iterator[None]:
        self._started = dt.datetime.now(dt.UTC)
        try:
            yield
        finally:
            if not self._recorded:
                self._record(self._errors())

    def on_stream_result(self, result: Any) -> Iterator[None]:
        if not self._recorded and self._kind() == "subscription":
            self._record(list(getattr(result, "errors", None) or []))
        yield

    def _kind(self) -> str | None:
        operation = self._operation()
        return operation.operation.value if operation is not None else None

    def _record(self, errors: list[GraphQLError]) -> None:
        context = self.execution_context.context
        caller = getattr(context, "caller", None)
        trail = getattr(getattr(context, "resources", None), "audit", None)
        if caller is None or trail is None:
            return
        self._recorded = True
        executed = self._executed()
        detail: dict[str, Any] = {"fields": executed.fields, "orgs": executed.orgs}
        if self.execution_context.operation_name is not None:
            detail["operation_name"] = self.execution_context.operation_name
        trail.record(
            AuditEntry(
                actor=caller.subject,
                action=f"graphql.{executed.kind}",
                target=",".join(executed.fields) or None,
                org_id=executed.orgs[0] if len(executed.orgs) == 1 else None,
                outcome=_outcome(errors),
                detail=detail,
            ),
            at=self._started,
        )

    def _operation(self) -> OperationDefinitionNode | None:
        document = self.execution_context.graphql_document
        if document is None:
            return None
        return get_operation_ast(document, self.execution_context.operation_name)

    def _executed(self) -> Executed:
        operation = self._operation()
        document = self.execution_context.graphql_document
        schema = self.execution_context.schema._schema
        if operation is None or document is None:
            return Executed("invalid", [], [])
        root = schema.get_root_type(operation.operation)
        if root is None:
            return Executed("invalid", [], [])
        fields, orgs = executed_root_fields(schema, document, operation, root, self.execution_context.variables)
        return Executed(operation.operation.value, fields, orgs)

    def _errors(self) -> list[GraphQLError]:
        result = self.execution_context.result
        return list(self.execution_context.pre_execution_errors or []) + list(getattr(result, "errors", None) or [])


def record_refusal(trail: AuditTrail | None, caller: Caller | None, code: ErrorCode, reason: str) -> None:
    """Audit a request refused before it became an operation; nothing when the caller is not known."""
    if caller is None or trail is None:
        return
    outcome = f"error: {code.value}"
    entry = AuditEntry(actor=caller.subject, action="graphql.refused", outcome=outcome, detail={"reason": reason})
    trail.record(entry, at=dt.datetime.now(dt.UTC))


def executed_root_fields(
    schema: GraphQLSchema,
    document: DocumentNode,
    operation: OperationDefinitionNode,
    root: GraphQLObjectType,
    variables: dict[str, Any] | None,
) -> tuple[list[str], list[str]]:
    """The root fields ``operation`` executes and the orgs their coerced arguments name. With variables
    that do not coerce nothing executes: the fields as written are returned, with no orgs."""
    coerced = get_variable_values(schema, operation.variable_definitions or (), variables or {})
    if isinstance(coerced, list):
        written = [s.name.value for s in operation.selection_set.selections if hasattr(s, "name")]
        return sorted(set(written)), []
    fragments = {
        d.name.value: FragmentDetails(d) for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    collected = collect_fields(schema, fragments, coerced, root, operation)
    fields: set[str] = set()
    orgs: set[str] = set()
    for details in collected.grouped_field_set.values():
        node = details[0].node
        fields.add(node.name.value)
        definition = root.fields.get(node.name.value)
        if definition is None:
            continue
        try:
            arguments = get_argument_values(definition, node, coerced, details[0].fragment_variable_values)
        except GraphQLError:
            continue
        orgs.update(_orgs_in(arguments))
    return sorted(fields), sorted(orgs)


def _orgs_in(arguments: dict[str, Any]) -> Iterator[str]:
    for name, value in arguments.items():
        if name == "orgId" and isinstance(value, str):
            yield value
        elif isinstance(value, dict) and isinstance(value.get("orgId"), str):  # input objects of mutations
            yield value["orgId"]


def _outcome(errors: list[GraphQLError]) -> str:
    if not errors:
        return "ok"
    return "error: " + ",".join(sorted({error_code(e).value for e in errors}))
