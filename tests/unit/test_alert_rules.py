"""The shipped Prometheus rules: well-formed, on metrics the gateway really exports, with runbooks that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "dashboards" / "rules").glob("*.yml"))
PRODUCT = ("gateway", "schema", "resolvers", "ingest", "db", "exports", "reliability")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")
# Metrics the gateway exports without naming them in its code: the OpenTelemetry ASGI middleware's HTTP histogram.
LIBRARY_METRICS = frozenset({"http_server_duration_milliseconds"})
# RabbitMQ's Prometheus plugin (rabbitmq_prometheus), per-object endpoint: labels vhost and queue.
BROKER_METRICS = frozenset({"rabbitmq_queue_messages_ready", "rabbitmq_queue_consumers"})
# A metric name in an expression: one of the families above, or a recording rule (level:metric:operations).
METRIC = re.compile(r"(?<![\w:.])((?:[a-z_]+:)?(?:analytics|http_server|rabbitmq)_[a-z0-9_]+(?::[a-z0-9_]+)?)")


def _groups() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, group) for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]


def _rules() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}:{rule['alert']}", rule) for name, group in _groups() for rule in group["rules"] if "alert" in rule
    ]


def _recorded() -> dict[str, dict[str, Any]]:
    return {rule["record"]: rule for _, group in _groups() for rule in group["rules"] if "record" in rule}


def _instrument_names() -> set[str]:
    """Every metric name created in the product code (OpenTelemetry instruments and prometheus_client)."""
    names: set[str] = set()
    for package in PRODUCT:
        for source in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\"(analytics_[a-z0-9_]+)\"", source.read_text()))
    return names


def _metrics_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(METRIC.findall(without_strings))


def _known(metric: str, defined: set[str]) -> bool:
    if metric in _recorded() or metric in BROKER_METRICS:
        return True
    base = next((metric.removesuffix(s) for s in SUFFIXES if metric.endswith(s)), metric)
    return base in defined or metric in defined or base in LIBRARY_METRICS


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_there_are_rules() -> None:
    assert RULE_FILES and _rules() and _recorded()


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for _, rule in _rules()]
    assert len(names) == len(set(names))


def test_the_metric_pattern_finds_every_kind_of_name() -> None:
    expr = 'a:analytics_x_total:ratio_rate5m > 1 and rabbitmq_queue_consumers{queue=~"x.analytics_y"} unless up'
    assert _metrics_in(expr) == {"a:analytics_x_total:ratio_rate5m", "rabbitmq_queue_consumers"}
    assert not _known("analytics_no_such_metric_total", _instrument_names())


@pytest.mark.parametrize(("name", "rule"), _rules(), ids=[name for name, _ in _rules()])
def test_rule_is_well_formed_and_points_at_real_metrics_and_runbooks(name: str, rule: dict[str, Any]) -> None:
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
    assert rule["labels"]["severity"] in ("page", "ticket")
    assert rule["annotations"]["summary"]
    metrics = _metrics_in(rule["expr"])
    assert metrics, f"{name}: the expression names no metric the gateway, the broker or a recording rule exports"
    defined = _instrument_names()
    for metric in metrics:
        assert _known(metric, defined), f"{name}: {metric} is not a metric the gateway exports"
    document, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert anchor in _anchors((ROOT / document).read_text()), f"{name}: no heading for {anchor} in {document}"


@pytest.mark.parametrize("record", sorted(_recorded()))
def test_recording_rule_is_named_level_metric_operation_over_real_metrics(record: str) -> None:
    rule = _recorded()[record]
    assert set(rule) <= {"record", "expr", "labels"}
    assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", record), record
    metrics = _metrics_in(rule["expr"])
    assert metrics and all(_known(m, _instrument_names()) for m in metrics), metrics


def test_slo_labels_are_bounded() -> None:
    """No org (or any other unbounded) label reaches the SLO series: the rules aggregate to model only."""
    for _, group in _groups():
        for rule in group["rules"]:
            if "analytics_platform_requests" in rule["expr"]:
                assert re.findall(r"by \(([^)]*)\)", rule["expr"]) in ([], ["model"], ["model", "model"]), rule
                assert "org" not in rule["expr"]
