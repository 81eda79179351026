"""``Query.viewer``: who the caller is and what they may do."""

from __future__ import annotations

from typing import Any

import strawberry

from kernel.scopes import Scope
from schema.context import Context
from schema.types import Viewer


def resolve_viewer(info: strawberry.Info[Context, Any]) -> Viewer:
    caller = info.context.require_caller()
    return Viewer(
        subject=caller.subject,
        org_id=strawberry.ID(caller.org_id) if caller.org_id is not None else None,
        roles=list(caller.roles),
        scopes=[scope for scope in Scope if scope in caller.scopes],
    )
