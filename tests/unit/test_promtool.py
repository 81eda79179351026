"""promtool and amtool on the shipped rules and routes. The binaries come from Debian's packages (`make tools`);
without them these tests fail: they are part of `make test`, not optional."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
ALERTMANAGER = ROOT / "dashboards" / "alertmanager.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run `make tools` (Debian packages prometheus and prometheus-alertmanager)"
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def _alerts() -> dict[str, str]:
    """Alert name -> severity, over every rule file."""
    return {
        rule["alert"]: rule["labels"]["severity"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _alert_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_promtool_checks_every_rule_file() -> None:
    result = _run(_tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _run(_tool("promtool"), "test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def test_the_unit_tests_load_every_rule_file() -> None:
    loaded = {
        (path.parent / name).resolve() for path in TEST_FILES for name in yaml.safe_load(path.read_text())["rule_files"]
    }
    assert loaded == {path.resolve() for path in RULE_FILES}


@pytest.mark.parametrize("alert", sorted(_alerts()))
def test_every_alert_has_a_firing_and_a_silent_case(alert: str) -> None:
    cases = [case for case in _alert_cases() if case["alertname"] == alert]
    assert any(case.get("exp_alerts") for case in cases), f"{alert}: no promtool case where it fires"
    assert any(not case.get("exp_alerts") for case in cases), f"{alert}: no promtool case where it stays silent"


def test_alertmanager_config_is_valid() -> None:
    result = _run(_tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("alert", "severity"), sorted(_alerts().items()))
def test_each_alert_reaches_the_receiver_of_its_severity(alert: str, severity: str) -> None:
    result = _run(
        _tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"alertname={alert}",
        f"severity={severity}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [{"page": "pager", "ticket": "tickets"}[severity]]
