"""Helpers shared by the tests."""

from __future__ import annotations

import httpx


async def graphql(
    client: httpx.AsyncClient, query: str, token: str | None, variables: dict[str, object] | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=headers)
