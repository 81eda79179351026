"""Field-level authorization: the ``@requires(scope: ...)`` directive.

``requires(Scope.X)`` is what a field declares. It adds the schema directive
(so the exported SDL shows it) and a permission that resolves the field to
null with a FORBIDDEN error at its path when the caller lacks the scope.
"""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.extensions.field_extension import FieldExtension
from strawberry.permission import BasePermission, PermissionExtension
from strawberry.schema_directive import Location

from kernel.errors import ErrorCode
from kernel.scopes import Scope as ScopeValue
from schema.context import Context
from schema.enums import Scope


@strawberry.schema_directive(locations=[Location.FIELD_DEFINITION], name="requires")
class Requires:
    scope: Scope  # type: ignore[valid-type]


class RequireScope(BasePermission):
    """Grants a field to callers holding one scope."""

    error_extensions = {"code": ErrorCode.FORBIDDEN.value}  # noqa: RUF012 - strawberry's own attribute

    def __init__(self, scope: ScopeValue) -> None:
        self.scope = scope
        self.message = f"requires scope {scope.value}"
        self._schema_directive = Requires(scope=scope)  # type: ignore[misc]  # one directive per scope

    def has_permission(self, source: Any, info: strawberry.Info[Context, Any], **kwargs: Any) -> bool:
        caller = info.context.caller
        return caller is not None and caller.has_scope(self.scope)


def requires(scope: ScopeValue) -> list[FieldExtension]:
    """Field extensions for ``@requires(scope: scope)``: null with a FORBIDDEN error without the scope."""
    return [PermissionExtension(permissions=[RequireScope(scope)], fail_silently=False)]
