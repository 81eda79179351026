"""Scopes, roles, and the one table that maps a role to what it may do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    """What a caller may read or write; the ``Scope`` enum of the contract."""

    USAGE_READ = "USAGE_READ"
    SPEND_READ = "SPEND_READ"
    RELIABILITY_READ = "RELIABILITY_READ"
    EXPORTS_READ = "EXPORTS_READ"
    INCIDENT_EXPORT_WRITE = "INCIDENT_EXPORT_WRITE"
    COST_EXPORT_WRITE = "COST_EXPORT_WRITE"
    PRICES_WRITE = "PRICES_WRITE"


@dataclass(frozen=True)
class Grant:
    """What one role gives: scopes, and whether they reach every org."""

    scopes: frozenset[Scope]
    all_orgs: bool = False
    may_ingest: bool = False


_ENGINEER = frozenset({Scope.USAGE_READ, Scope.RELIABILITY_READ, Scope.EXPORTS_READ, Scope.INCIDENT_EXPORT_WRITE})
_FINANCE = frozenset({Scope.USAGE_READ, Scope.SPEND_READ, Scope.EXPORTS_READ, Scope.COST_EXPORT_WRITE})

ROLE_GRANTS: dict[str, Grant] = {
    "viewer": Grant(frozenset({Scope.USAGE_READ})),
    "engineer": Grant(_ENGINEER),
    "finance": Grant(_FINANCE),
    "org_admin": Grant(_ENGINEER | _FINANCE),
    "platform_finance": Grant(_FINANCE, all_orgs=True),
    "platform_admin": Grant(frozenset(Scope), all_orgs=True),
    "ingest": Grant(frozenset(), may_ingest=True),
}
