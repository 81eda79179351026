"""A schema extension that audits every GraphQL operation (contracts section 2)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from graphql import FieldNode, OperationDefinitionNode, value_from_ast_untyped
from strawberry.extensions import SchemaExtension

from gateway.audit import AuditEntry
from schema.errors import error_code


class AuditOperations(SchemaExtension):
    """After each operation: who, which root fields, which orgs, and the outcome."""

    def on_operation(self) -> Iterator[None]:
        started = dt.datetime.now(dt.UTC)
        yield
        context = self.execution_context.context
        caller = getattr(context, "caller", None)
        trail = getattr(getattr(context, "resources", None), "audit", None)
        if caller is None or trail is None:
            return
        operation = self._operation()
        fields, orgs = _root_fields_and_orgs(operation, self.execution_context.variables or {})
        trail.record(
            AuditEntry(
                actor=caller.subject,
                action=f"graphql.{operation.operation.value if operation else 'invalid'}",
                target=self.execution_context.operation_name or ",".join(fields) or None,
                org_id=orgs[0] if len(orgs) == 1 else None,
                outcome=self._outcome(),
                detail={"fields": fields, "orgs": orgs},
            ),
            at=started,
        )

    def _operation(self) -> OperationDefinitionNode | None:
        document = self.execution_context.graphql_document
        if document is None:
            return None
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        name = self.execution_context.operation_name
        return next((o for o in operations if name is None or (o.name and o.name.value == name)), None)

    def _outcome(self) -> str:
        result = self.execution_context.result
        errors = list(self.execution_context.pre_execution_errors or []) + list(getattr(result, "errors", None) or [])
        if not errors:
            return "ok"
        return "error: " + ",".join(sorted({error_code(e).value for e in errors}))


def _root_fields_and_orgs(
    operation: OperationDefinitionNode | None, variables: dict[str, Any]
) -> tuple[list[str], list[str]]:
    if operation is None:
        return [], []
    fields, orgs = [], []
    for selection in operation.selection_set.selections:
        if not isinstance(selection, FieldNode):
            continue
        fields.append(selection.name.value)
        for argument in selection.arguments or ():
            value = value_from_ast_untyped(argument.value, variables)
            if argument.name.value == "orgId" and value is not None:
                orgs.append(str(value))
            elif isinstance(value, dict) and value.get("orgId") is not None:  # input objects of mutations
                orgs.append(str(value["orgId"]))
    return fields, sorted(set(orgs))
