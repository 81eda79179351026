"""The benchmark's targets, and its figures against them."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "usage_single_p50_ms": 25.0,
    "usage_single_p99_ms": 60.0,
    "gateway_floor_latency_ratio": 2.0,
    "concurrent16_throughput_share_of_floor": 0.5,
    "trivial_share_of_plain": 0.3,
    "publish_to_visible_p99_s": 2.0,
}
LABELS = {"hour_30d": "HOUR 30 d", "day_30d": "DAY 30 d", "day_365d": "DAY 365 d"}


class _Rows(list[dict[str, Any]]):
    def add(self, name: str, value: float | None, target: float, better: str, unit: str) -> None:
        if value is None:
            return
        met = value <= target if better == "lower" else value >= target
        self.append({"what": name, "value": value, "target": target, "unit": unit, "better": better, "met": met})


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Figures against the targets (only what was measured)."""
    rows = _Rows()
    for key, single in results.get("usage_single", {}).items():  # the single-client targets hold for each shape
        _single(rows, LABELS.get(key, key), single)
    concurrent = results.get("usage_concurrent")
    if concurrent:
        rows.add("16 clients: gateway req/s / floor queries/s", concurrent["throughput_share_of_floor"],
                 TARGETS["concurrent16_throughput_share_of_floor"], "higher", "share")  # fmt: skip
    trivial = results.get("trivial")
    if trivial:
        rows.add("trivial query req/s / plain endpoint req/s", trivial["viewer_share_of_plain"],
                 TARGETS["trivial_share_of_plain"], "higher", "share")  # fmt: skip
    visible = results.get("publish_to_visible", {}).get("lag_s")
    if visible and visible.get("count"):
        rows.add("publish-to-visible p99", visible["p99"], TARGETS["publish_to_visible_p99_s"], "lower", "s")
    return {"targets": list(rows), "all_met": all(r["met"] for r in rows) if rows else None}


def _single(rows: _Rows, label: str, single: dict[str, Any]) -> None:
    lat, ratio = single["gateway"]["latency_ms"], single["ratio_gateway_to_floor"]
    rows.add(f"usage {label}, 1 client, p50", lat["p50"], TARGETS["usage_single_p50_ms"], "lower", "ms")
    rows.add(f"usage {label}, 1 client, p99", lat["p99"], TARGETS["usage_single_p99_ms"], "lower", "ms")
    for q in ("p50", "p99"):
        rows.add(f"gateway / floor latency, {label}, {q}", ratio.get(q), TARGETS["gateway_floor_latency_ratio"],
                 "lower", "x")  # fmt: skip
