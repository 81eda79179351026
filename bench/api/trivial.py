"""Scenario (d): a trivial GraphQL query against a plain JSON endpoint of the same process."""

from __future__ import annotations

from typing import Any

import httpx

from bench.api.queries import VIEWER_QUERY
from bench.api.run import Run
from bench.harness.output import say
from bench.harness.wrk import HttpTarget, graphql_target


async def scenario_trivial(run: Run, token: str, connections: int) -> None:
    """(d): ``{ viewer { subject } }`` against ``/bench/plain`` and ``/bench/bare``, ``connections`` each."""
    say(f"== trivial query vs plain endpoint, {connections} connections")
    targets = {
        "viewer": graphql_target(VIEWER_QUERY, None, token),
        "plain": HttpTarget("/bench/plain"),
        "bare": HttpTarget("/bench/bare"),
    }
    async with httpx.AsyncClient(base_url=run.api.base_url) as http:
        response = await http.post(
            "/graphql", json={"query": VIEWER_QUERY}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200 and "errors" not in response.json(), response.text
    entry: dict[str, Any] = {"connections": connections, "viewer_query": VIEWER_QUERY}
    for name, target in targets.items():
        entry[name] = await run.wrk(f"{name} c{connections}", target, connections)
    entry["viewer_share_of_plain"] = round(entry["viewer"]["rps"] / entry["plain"]["rps"], 3)
    entry["viewer_share_of_bare"] = round(entry["viewer"]["rps"] / entry["bare"]["rps"], 3)
    entry["plain_share_of_bare"] = round(entry["plain"]["rps"] / entry["bare"]["rps"], 3)
    run.results["trivial"] = entry
    run.save()
