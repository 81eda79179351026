from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from kernel.auth import VERIFIED_FOR_S, Caller, RecentTokens, TokenVerifier, ensure_org_access, issue_token
from kernel.errors import Forbidden, Unauthenticated
from kernel.scopes import ROLE_GRANTS, Scope
from kernel.settings import Settings

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


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_verified_token_is_remembered_only_while_it_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    original = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return original(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    clock = _Clock()
    verifier = TokenVerifier(Settings(jwt_secret=SECRET), clock=clock)
    token = issue_token(SECRET, ["engineer"], subject="e", org_id="o", ttl_seconds=30)
    first, second = await verifier.verify(token), await verifier.verify(token)
    assert first == second == Caller("e", "o", ("engineer",)) and len(decoded) == 1
    clock.now += 31  # past the token's exp: verified again (PyJWT's clock still finds it valid here)
    await verifier.verify(token)
    assert len(decoded) == 2
    long_lived = issue_token(SECRET, ["viewer"], subject="v", ttl_seconds=3600)
    await verifier.verify(long_lived)
    clock.now += VERIFIED_FOR_S + 1  # remembered for at most a minute, whatever the exp
    await verifier.verify(long_lived)
    assert len(decoded) == 4
    forged = token.rsplit(".", 1)[0] + ".c2lnbmF0dXJl"  # same claims, another signature: never a hit
    with pytest.raises(Unauthenticated, match="invalid token"):
        await verifier.verify(forged)


async def test_a_token_not_yet_valid_is_not_remembered() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    future = jwt.encode({"sub": "s", "exp": int(time.time()) + 600, "nbf": int(time.time()) + 300}, SECRET)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="not yet valid"):
            await verifier.verify(future)
    assert len(verifier.recent) == 0


def test_recent_tokens_are_bounded() -> None:
    recent = RecentTokens(size=2)
    caller, now = Caller("s", None, ()), time.time()
    for token in ("a", "b", "c"):
        recent.put(token, caller, {"exp": now + 60}, now)
    assert len(recent) == 2 and recent.get("a", now) is None and recent.get("c", now) == caller


def _signed(claims: dict[str, object]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_dates_must_be_numeric(claim: str) -> None:
    """RFC 7519 NumericDate: PyJWT alone accepts "exp": "1700000000"."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": "s", "roles": ["viewer"], "iat": now - 5, "nbf": now - 5, "exp": now + 60}
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    assert (await verifier.verify(_signed(claims))).expires_at == now + 60
    with pytest.raises(Unauthenticated, match=f"'{claim}' must be a NumericDate"):
        await verifier.verify(_signed(claims | {claim: str(claims[claim])}))
    with pytest.raises(Unauthenticated):  # a boolean is no date either (PyJWT reads "exp": true as 1: expired)
        await verifier.verify(_signed(claims | {claim: True}))


async def test_oversized_tokens_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    monkeypatch.setattr(jwt, "decode", lambda token, *a, **k: decoded.append(token))
    settings = Settings(jwt_secret=SECRET, jwt_max_token_bytes=1024)
    verifier = TokenVerifier(settings)
    with pytest.raises(Unauthenticated, match="too long"):
        await verifier.verify_header("Bearer " + "a" * 1025)
    with pytest.raises(Unauthenticated, match="too long"):
        await verifier.verify("a" * 10_000_000)
    assert decoded == []


def test_callers_without_scopes_have_no_graphql() -> None:
    assert not Caller("i", None, ("ingest",)).may_use_graphql
    assert not Caller("u", "o", ("superuser",)).may_use_graphql
    assert Caller("v", "o", ("viewer",)).may_use_graphql


def test_expiry_is_known_to_the_caller_but_not_its_identity() -> None:
    caller = Caller("v", "o", ("viewer",), expires_at=100.0)
    assert caller == Caller("v", "o", ("viewer",), expires_at=200.0)
    assert not caller.expired(99.9) and caller.expired(100.0)
    assert not Caller("v", "o", ("viewer",)).expired(1e12)
