"""Bearer-token authentication: JWT in, :class:`Caller` out.

HS256 with ``ANALYTICS_JWT_SECRET`` for development and tests; RS256/ES256 keys
from ``ANALYTICS_JWT_JWKS_URL`` in production. Any other algorithm, ``none``
included, is refused by naming the accepted ones to PyJWT.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jwt

from kernel.errors import Forbidden, Unauthenticated
from kernel.scopes import ROLE_GRANTS, Scope
from kernel.settings import Settings

HS_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = ["RS256", "ES256"]
VERIFIED_TOKENS = 4096  # tokens remembered after verification (see RecentTokens)
VERIFIED_FOR_S = 60.0  # at most this long, so a key removed from the JWKS stops working within a minute
NUMERIC_DATES = ("exp", "nbf", "iat")  # RFC 7519 section 2: a JSON number; PyJWT would take "exp": "1700000000"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the verified token says."""

    subject: str
    org_id: str | None
    roles: tuple[str, ...]
    # The token's ``exp`` (Unix time): a WebSocket is closed then, and refuses operations after it.
    expires_at: float | None = field(default=None, compare=False)

    @cached_property
    def scopes(self) -> frozenset[Scope]:
        return frozenset().union(*(ROLE_GRANTS[r].scopes for r in self.roles if r in ROLE_GRANTS))

    @property
    def may_use_graphql(self) -> bool:
        """A caller whose roles grant no scope (``ingest``) has nothing in GraphQL (contract section 2)."""
        return bool(self.scopes)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def all_orgs(self) -> bool:
        return any(ROLE_GRANTS[r].all_orgs for r in self.roles if r in ROLE_GRANTS)

    @property
    def may_ingest(self) -> bool:
        return any(ROLE_GRANTS[r].may_ingest for r in self.roles if r in ROLE_GRANTS)

    def has_scope(self, scope: Scope) -> bool:
        return scope in self.scopes

    def can_see_org(self, org_id: str | None) -> bool:
        """``None`` stands for "every org", which only platform roles see."""
        if self.all_orgs:
            return True
        return org_id is not None and org_id == self.org_id and bool(self.scopes)


def ensure_org_access(caller: Caller, org_id: str | None) -> None:
    """The one check every org-scoped resolver makes before touching data."""
    if not caller.can_see_org(org_id):
        target = "every org" if org_id is None else f"org {org_id!r}"
        raise Forbidden(f"caller may not see {target}")


@dataclass(frozen=True)
class _Verified:
    caller: Caller
    valid_from: float  # nbf / iat
    valid_until: float  # exp, or VERIFIED_FOR_S after verification if sooner


class RecentTokens:
    """Tokens that passed verification, so that a client's every request does not verify its token again.

    Keyed by the whole token (signature included), so only a token that was verified can hit. A hit counts
    only inside the token's own validity (``nbf``/``iat`` to ``exp``) and for at most ``VERIFIED_FOR_S``;
    outside it the token is verified again, which gives the usual errors. The oldest entry goes first when
    full. Verifying an HS256 token on every request was a large share of a trivial query's time.
    """

    def __init__(self, size: int = VERIFIED_TOKENS) -> None:
        self._size = size
        self._entries: dict[str, _Verified] = {}

    def get(self, token: str, now: float) -> Caller | None:
        entry = self._entries.get(token)
        if entry is None or not entry.valid_from <= now < entry.valid_until:
            return None
        return entry.caller

    def put(self, token: str, caller: Caller, claims: Mapping[str, Any], now: float) -> None:
        starts = [float(claims[c]) for c in ("nbf", "iat") if isinstance(claims.get(c), int | float)]
        entry = _Verified(caller, max(starts, default=now), min(float(claims["exp"]), now + VERIFIED_FOR_S))
        self._entries.pop(token, None)
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[token] = entry

    def __len__(self) -> int:
        return len(self._entries)


class TokenVerifier:
    """Verifies bearer tokens against the configured key material."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._secret = signing_secret(settings)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._jwks = jwt.PyJWKClient(str(settings.jwt_jwks_url)) if settings.jwt_jwks_url else None
        self._clock = clock
        self._max_token_bytes = settings.jwt_max_token_bytes
        self.recent = RecentTokens()

    def now(self) -> float:
        """The verifier's clock (Unix time), so that expiry checks elsewhere agree with verification."""
        return self._clock()

    async def verify_header(self, authorization: str | None) -> Caller:
        """Verify an ``Authorization: Bearer <jwt>`` value."""
        if not authorization:
            raise Unauthenticated("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization must be 'Bearer <jwt>'")
        return await self.verify(token.strip())

    async def verify(self, token: str) -> Caller:
        """Verify a bare JWT; :class:`Unauthenticated` naming the problem otherwise."""
        self._check_size(token)
        now = self._clock()
        known = self.recent.get(token, now)
        if known is not None:
            return known
        try:
            key, algorithms = await self._key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        _check_numeric_dates(claims)
        caller = _caller_from(claims)
        self.recent.put(token, caller, claims, now)
        return caller

    def _check_size(self, text: str) -> None:
        # Before any decoding: a megabyte "token" must not cost base64 and JSON work (nor a cache entry).
        # Characters count as bytes: a JWT is ASCII, and anything else fails verification anyway.
        if len(text) > self._max_token_bytes:
            raise Unauthenticated(f"token too long (more than {self._max_token_bytes} bytes)")

    async def _key_for(self, token: str) -> tuple[Any, list[str]]:
        if self._jwks is not None:
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            return signing_key.key, JWKS_ALGORITHMS
        if self._secret is None:
            raise Unauthenticated("no token verification key is configured")
        return self._secret, HS_ALGORITHMS


def signing_secret(settings: Settings) -> str | None:
    """The HS256 secret: the configured one, or on the embedded default a
    development secret kept (mode 0600) in the data folder."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    if settings.database_url is not None or settings.jwt_jwks_url is not None:
        return None
    path = settings.data_dir / "dev-jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _check_numeric_dates(claims: Mapping[str, object]) -> None:
    for name in NUMERIC_DATES:
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Unauthenticated(f"claim {name!r} must be a NumericDate (a JSON number)")


def _caller_from(claims: Mapping[str, object]) -> Caller:
    subject, org_id, roles = claims.get("sub"), claims.get("org_id"), claims.get("roles", [])
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("claim 'sub' must be a non-empty string")
    if org_id is not None and not isinstance(org_id, str):
        raise Unauthenticated("claim 'org_id' must be a string")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("claim 'roles' must be a list of strings")
    exp = claims["exp"]
    assert isinstance(exp, int | float)  # required by decode, a number by _check_numeric_dates
    return Caller(subject=subject, org_id=org_id, roles=tuple(roles), expires_at=float(exp))


def issue_token(
    secret: str,
    roles: Sequence[str],
    *,
    subject: str,
    org_id: str | None = None,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Sign an HS256 development token (the ``token`` command and tests)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "roles": list(roles), "iat": now, "exp": now + ttl_seconds}
    if org_id is not None:
        claims["org_id"] = org_id
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
