"""Per-caller rate and concurrency limits for GraphQL (issue 10: no caller may starve the others).

A caller is the token's subject within its org. Its **rate** is a token bucket in the GCRA form: a burst of
``rate_limit_per_minute`` requests, refilled evenly over a minute. The bucket lives in Redis when Redis is
configured (one atomic Lua script on the server's clock, so every replica shares it) and in this process
otherwise, or while Redis cannot be reached. Its **concurrency** (requests running at once) is counted in this
process: it bounds what one caller holds of this process's memory and connection pool, needs no round trip, and
cannot leak a slot when a replica dies.

Over HTTP, ``gateway.middleware.CallerLimitsMiddleware`` admits a request before Strawberry reads its body and
answers ``429`` with ``Retry-After``. Over the WebSocket, ``GatewaySchema.stream`` (``schema/gateway_schema.py``)
applies the same limits to each operation and answers a ``RATE_LIMITED`` GraphQL error (``extensions.retryAfter``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from kernel.auth import Caller
from kernel.errors import RateLimited
from kernel.settings import Settings

log = structlog.get_logger(__name__)

WINDOW_MS = 60_000
LOCAL_CALLERS = 100_000  # callers remembered in process; a forgotten one starts with a full bucket
REDIS_TIMEOUT_S = 0.25
GRAPHQL_PATH = "/graphql"

LEASE_S = 1.0  # how long tokens taken from Redis ahead of need stay usable in this process
MAX_LEASE = 20

# GCRA: KEYS[1] holds the theoretical arrival time (ms). ARGV: emission interval and burst tolerance (ms), and
# how many requests' tokens to take at once (a lease). Returns {tokens taken, ms to wait when none}.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local n = math.floor((now + tonumber(ARGV[2]) - tat) / interval)
if n < 1 then return {0, math.ceil(tat + interval - tonumber(ARGV[2]) - now)} end
if n > tonumber(ARGV[3]) then n = tonumber(ARGV[3]) end
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return {n, 0}
"""


class _Lease:
    """Tokens of one caller taken from Redis ahead of need, and the caller's demand in this process."""

    __slots__ = ("blocked_until", "expires", "previous", "since", "tokens", "used")

    def __init__(self, now: float) -> None:
        self.tokens = 0
        self.blocked_until = now  # Redis said the bucket is empty until then: refused without asking again
        self.expires = now
        self.used = 0  # requests in the current second
        self.previous = 0  # requests in the second before
        self.since = now

    def count(self, now: float) -> None:
        if now - self.since >= LEASE_S:
            self.previous = self.used if now - self.since < 2 * LEASE_S else 0
            self.used, self.since = 0, now
        self.used += 1

    def take(self, now: float) -> bool:
        if self.tokens > 0 and now < self.expires:
            self.tokens -= 1
            return True
        return False


# Set while an HTTP request runs that the middleware has already admitted, so the schema extension does not
# count it twice (the WebSocket transport never sets it).
ADMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("analytics_limits_admitted", default=False)


def caller_key(caller: Caller) -> str:
    """A short, fixed-length key for a caller (subject within org) that reveals neither."""
    raw = f"{caller.org_id or '*'}\x1f{caller.subject}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class _LocalBuckets:
    """The GCRA buckets of this process, bounded to the most recently seen callers."""

    def __init__(self, interval_ms: float) -> None:
        self._interval_ms = interval_ms
        self._tat: OrderedDict[str, float] = OrderedDict()

    def wait_ms(self, key: str) -> float:
        now = time.monotonic() * 1000
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + self._interval_ms
        wait = new_tat - WINDOW_MS - now
        if wait > 0:
            return wait
        self._tat[key] = new_tat
        self._tat.move_to_end(key)
        if len(self._tat) > LOCAL_CALLERS:
            self._tat.popitem(last=False)
        return 0.0


class CallerLimiter:
    """Rate (Redis or in process) and concurrency (in process) per caller."""

    def __init__(self, per_minute: int, max_concurrent: int, redis_prefix: str) -> None:
        self.per_minute = per_minute
        self.max_concurrent = max_concurrent
        self._interval_ms = WINDOW_MS / per_minute
        self._prefix = f"{redis_prefix}ratelimit:"
        self._local = _LocalBuckets(self._interval_ms)
        self._running: dict[str, int] = {}
        self._scripts: dict[int, AsyncScript] = {}
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        # A second's worth of the limit at most, so leased tokens never exceed what a second refills.
        self._max_lease = max(1, min(MAX_LEASE, per_minute // 60))

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerLimiter:
        return cls(settings.rate_limit_per_minute, settings.max_concurrent_per_caller, settings.redis_prefix)

    async def check_rate(self, redis: Redis | None, key: str) -> None:
        """Count one request of ``key``; :class:`RateLimited` when its bucket is empty.

        With Redis, a busy caller takes the tokens of about a second of its recent demand in one round trip
        (a lease, at most ``MAX_LEASE``, usable for ``LEASE_S``): a Redis call costs ~150 µs of this process's
        CPU, as much as a trivial query's validation and execution. A caller sending one request at a time
        takes one token at a time, so leases never make its limit stricter; unused leased tokens expire,
        which can only make a busy caller's limit slightly stricter, never looser."""
        wait_ms = await self._redis_wait_ms(redis, key) if redis is not None else None
        if wait_ms is None:
            wait_ms = self._local.wait_ms(key)
        if wait_ms > 0:
            raise RateLimited(
                f"rate limit of {self.per_minute} requests a minute exceeded", retry_after_s=math.ceil(wait_ms / 1000)
            )

    async def _redis_wait_ms(self, redis: Redis, key: str) -> float | None:
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease(now)
            if len(self._leases) > LOCAL_CALLERS:
                self._leases.popitem(last=False)
        lease.count(now)
        if lease.take(now):
            return 0.0
        if now < lease.blocked_until:
            return (lease.blocked_until - now) * 1000
        want = max(1, min(max(lease.previous, lease.used), self._max_lease))
        script = self._scripts.get(id(redis))
        if script is None:
            script = self._scripts[id(redis)] = redis.register_script(_GCRA)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                taken, wait = await script(keys=[self._prefix + key], args=[repr(self._interval_ms), WINDOW_MS, want])
        except (RedisError, OSError, TimeoutError) as exc:
            # Fail over to this process's buckets: a Redis outage must not refuse every request.
            log.warning("ratelimit.redis_unavailable", error=type(exc).__name__)
            return None
        if taken:
            lease.tokens, lease.expires = int(taken) - 1, now + LEASE_S
            self._leases.move_to_end(key)
        else:
            lease.blocked_until = now + int(wait) / 1000
        return float(wait)

    def acquire(self, key: str) -> None:
        """Take one of ``key``'s concurrent slots; :class:`RateLimited` when all are taken. Pair with
        :meth:`release`."""
        running = self._running.get(key, 0)
        if running >= self.max_concurrent:
            raise RateLimited(f"{self.max_concurrent} requests of this caller are already running", retry_after_s=1)
        self._running[key] = running + 1

    def release(self, key: str) -> None:
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]

    @contextmanager
    def slot(self, key: str) -> Iterator[None]:
        """One of ``key``'s concurrent slots for the duration of the block."""
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def running(self, key: str) -> int:
        return self._running.get(key, 0)
