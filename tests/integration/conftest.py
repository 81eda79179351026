"""Fixtures shared by the integration tests that start their own gateway processes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RUN_ID
from tests.integration.ingest_support import delete_topology


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """This test's own AMQP names, deleted afterwards."""
    name = f"test_{RUN_ID}_{uuid.uuid4().hex[:8]}."
    yield name
    await delete_topology(name)
