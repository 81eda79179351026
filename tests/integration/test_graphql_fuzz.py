"""A short Schemathesis run against a real gateway process: no 5xx, no INTERNAL for any generated input.
``make fuzz`` runs the same for ten minutes."""

from __future__ import annotations

import pytest

from tests.fuzz.graphql import fuzz

pytestmark = pytest.mark.slow


async def test_generated_graphql_requests_get_no_server_error_and_no_internal() -> None:
    assert await fuzz(examples=50, seed=20261130, max_time=30) == 0
