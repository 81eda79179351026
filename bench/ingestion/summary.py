"""The ingestion targets, the figures against them, and whether a run's figures can be trusted."""

from __future__ import annotations

from typing import Any

TARGETS = {"batched_events_per_s": 50_000, "single_events_per_s": 8_000, "latency_p99_s": 1.0}


def config_label(config: dict[str, int]) -> str:
    return f"batch_events={config['batch_events']} prefetch={config['prefetch']} max_age_ms={config['max_age_ms']}"


def summarize(runs: list[dict[str, Any]], defaults: dict[str, int]) -> dict[str, Any]:
    """Throughput at the defaults and at the best settings; latency per run."""
    summary: dict[str, Any] = {}
    for kind, target in (("batched", "batched_events_per_s"), ("single", "single_events_per_s")):
        measured = [r for r in runs if r.get("kind") == kind and "ingest" in r]
        default_runs = [r for r in measured if r["settings"] == defaults]
        top = max(measured, key=lambda r: r["ingest"]["events_per_s"], default=None)
        if default_runs or top:
            summary[kind] = _throughput(TARGETS[target], default_runs, top)
    latency = [r for r in runs if r.get("kind") == "latency" and "latency_s" in r]
    if latency:
        summary["latency"] = {
            "target_p99_s": TARGETS["latency_p99_s"],
            # the rate belongs in the key: runs at several rates share a message size and settings
            "runs": {f"{r['rate_target']:,} events/s, batch={r['message_events']} {config_label(r['settings'])}":
                     _latency(r) for r in latency},
        }  # fmt: skip
    return summary


def _throughput(target: float, default_runs: list[dict[str, Any]], top: dict[str, Any] | None) -> dict[str, Any]:
    rates = [r["ingest"]["events_per_s"] for r in default_runs]
    return {
        "target_events_per_s": target,
        "at_defaults_events_per_s": rates,
        "met_at_defaults": bool(rates) and max(rates) >= target,
        "best_events_per_s": top["ingest"]["events_per_s"] if top else None,
        "best_settings": top["settings"] if top else None,
        "met_at_best": top is not None and top["ingest"]["events_per_s"] >= target,
    }


def _latency(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "p50": run["latency_s"]["p50"],
        "p99": run["latency_s"]["p99"],
        "max": run["latency_s"]["max"],
        "met": run["latency_s"]["p99"] <= TARGETS["latency_p99_s"],
        "publish_events_per_s": run["publish"]["events_per_s"],
    }


def foreign_cores(result: dict[str, Any]) -> float:
    """Cores that processes unrelated to the benchmark used during its window."""
    cores = result.get("cpu", {}).get("cores_used", {})
    return float(cores.get("other", 0.0) + cores.get("postgres_other_db", 0.0))


def disturbances(result: dict[str, Any], threshold_cores: float) -> list[str]:
    """Why a run's figures cannot be trusted: other work on the machine, or faults injected by others."""
    reasons = []
    foreign = foreign_cores(result)
    if foreign > threshold_cores:
        reasons.append(f"other processes used {foreign:.2f} cores")
    log = result.get("gateway_log", {}).get("warnings_and_errors", {})
    if any("CONNECTION_FORCED" in k or "connection close" in k.lower() for k in log):
        reasons.append("the broker closed the gateway's connection (someone ran rabbitmqctl close_connection)")
    if "error" in result:
        reasons.append(result["error"])
    return reasons
