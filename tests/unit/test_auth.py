from __future__ import annotations

import pytest

from gateway.auth import Caller, TokenVerifier, ensure_org_access, issue_token
from gateway.errors import Forbidden, Unauthenticated
from gateway.scopes import ROLE_GRANTS, Scope
from gateway.settings import Settings

SECRET = "k" * 40


def test_role_table_matches_the_contract() -> None:
    all_read = {Scope.USAGE_READ, Scope.SPEND_READ, Scope.RELIABILITY_READ, Scope.EXPORTS_READ}
    writes = {Scope.INCIDENT_EXPORT_WRITE, Scope.COST_EXPORT_WRITE}
    assert ROLE_GRANTS["viewer"].scopes == {Scope.USAGE_READ}
    assert ROLE_GRANTS["org_admin"].scopes == all_read | writes
    assert ROLE_GRANTS["platform_admin"].scopes == set(Scope)
    assert ROLE_GRANTS["platform_finance"].scopes == ROLE_GRANTS["finance"].scopes
    assert [r for r, g in ROLE_GRANTS.items() if g.all_orgs] == ["platform_finance", "platform_admin"]
    assert ROLE_GRANTS["ingest"].scopes == frozenset() and ROLE_GRANTS["ingest"].may_ingest


def test_org_access() -> None:
    viewer = Caller("v", "org_a", ("viewer",))
    ensure_org_access(viewer, "org_a")
    for org in ("org_b", None):
        with pytest.raises(Forbidden):
            ensure_org_access(viewer, org)
    ensure_org_access(Caller("p", None, ("platform_finance",)), None)
    with pytest.raises(Forbidden):  # a role that needs an org, without one
        ensure_org_access(Caller("x", None, ("finance",)), "org_a")
    with pytest.raises(Forbidden):  # ingest sees no org in GraphQL
        ensure_org_access(Caller("i", "org_a", ("ingest",)), "org_a")


def test_unknown_roles_grant_nothing() -> None:
    assert Caller("u", "org_a", ("superuser",)).scopes == frozenset()


async def test_verify_round_trip_and_bad_claims() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    caller = await verifier.verify_header("Bearer " + issue_token(SECRET, ["engineer"], subject="e", org_id="o"))
    assert caller == Caller("e", "o", ("engineer",))
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(issue_token(SECRET, ["viewer"], subject="e", ttl_seconds=-5))
    with pytest.raises(Unauthenticated, match="Bearer"):
        await verifier.verify_header("Token abc")
