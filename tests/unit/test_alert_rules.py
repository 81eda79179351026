"""The shipped Prometheus rules: well-formed, on metrics the gateway really exports, with runbooks that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "dashboards" / "rules").glob("*.yml"))
PRODUCT = ("gateway", "schema", "resolvers", "ingest", "db", "exports")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _rules() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            found += [(f"{path.name}:{rule['alert']}", rule) for rule in group["rules"]]
    return found


def _instrument_names() -> set[str]:
    """Every metric name created in the product code (OpenTelemetry instruments and prometheus_client)."""
    names: set[str] = set()
    for package in PRODUCT:
        for source in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\"(analytics_[a-z0-9_]+)\"", source.read_text()))
    return names


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_there_are_rules() -> None:
    assert RULE_FILES and _rules()


@pytest.mark.parametrize(("name", "rule"), _rules(), ids=[name for name, _ in _rules()])
def test_rule_is_well_formed_and_points_at_real_metrics_and_runbooks(name: str, rule: dict[str, Any]) -> None:
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
    assert rule["labels"]["severity"] in ("page", "ticket")
    assert rule["annotations"]["summary"]
    metrics = set(re.findall(r"\b(analytics_[a-z0-9_]+)", rule["expr"]))
    assert metrics, f"{name}: the expression names no gateway metric"
    defined = _instrument_names()
    for metric in metrics:
        base = next((metric.removesuffix(s) for s in SUFFIXES if metric.endswith(s)), metric)
        assert base in defined or metric in defined, f"{name}: {metric} is not a metric the gateway exports"
    document, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert anchor in _anchors((ROOT / document).read_text()), f"{name}: no heading for {anchor} in {document}"
