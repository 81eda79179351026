"""The layer check of ``make lint`` holds on the tree, and fails on an import that points the wrong way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bench", "gateway", "resolvers", "schema", "ingest", "exports", "reliability", "db", "kernel")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("lint-imports")), "--config", str(tree / "pyproject.toml")]
    env = os.environ | {"PYTHONPATH": str(tree)}
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=120)


def test_the_tree_keeps_its_layers() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_the_check(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    prices = tmp_path / "db" / "prices.py"
    prices.write_text(prices.read_text() + "\nfrom gateway.resources import Resources  # noqa: E402\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1
    assert "db is not allowed to import gateway" in result.stdout
