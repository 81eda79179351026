"""What the GraphQL surface needs of the process's long-lived clients.

The app's ``Resources`` (``gateway/resources.py``) provides it; the surface names only what it uses, so it never
imports the app that assembles it.
"""

from __future__ import annotations

from typing import Protocol

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from db.audit_trail import AuditTrail
from exports.storage.protocol import Storage
from kernel.auth import TokenVerifier
from kernel.cache import Cache
from kernel.offload import Offload
from kernel.pubsub import PubSub
from kernel.settings import Settings


class Services(Protocol):
    @property
    def settings(self) -> Settings: ...

    @property
    def query_engine(self) -> AsyncEngine:
        """GraphQL's own connection pool (statement timeout, bounded wait)."""

    @property
    def cache(self) -> Cache: ...

    @property
    def pubsub(self) -> PubSub: ...

    @property
    def audit(self) -> AuditTrail: ...

    @property
    def verifier(self) -> TokenVerifier: ...

    @property
    def redis(self) -> Redis | None: ...

    @property
    def storage(self) -> Storage:
        """Where export files live (download links)."""

    @property
    def offload(self) -> Offload:
        """Helper processes for an answer's CPU-bound steps (spike detection)."""
