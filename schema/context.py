"""The per-request GraphQL context that every resolver receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel.auth import Caller
from kernel.errors import Unauthenticated
from schema.loaders import Loaders
from schema.services import Services


@dataclass
class Context:
    """What a resolver may use: the caller, the shared clients, the request id.

    ``caller`` is None only on a WebSocket before ``connection_init``
    authenticates it. ``connection_params`` is filled by Strawberry from the
    ``connection_init`` payload.
    """

    resources: Services
    caller: Caller | None
    loaders: Loaders
    request_id: str | None = None
    connection_params: dict[str, Any] | None = None
    upgrade_authorization: str | None = None

    def require_caller(self) -> Caller:
        if self.caller is None:
            raise Unauthenticated("not authenticated")
        return self.caller
