"""Object types of the API that carry no domain logic."""

from __future__ import annotations

import strawberry

from schema.enums import Scope


@strawberry.type
class Viewer:
    subject: str
    org_id: strawberry.ID | None
    roles: list[str]
    scopes: list[Scope]  # type: ignore[valid-type]
