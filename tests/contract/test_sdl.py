"""The exported SDL matches the code and never breaks the shared contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from graphql import build_schema, find_breaking_changes

from resolvers.sdl import SDL_PATH, current_sdl

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT.parent / "shared" / "contracts"
CONTRACT_CHECK = ROOT.parent / "shared" / "tools" / "contract_check.py"
MISSING_KINDS = {"TYPE_REMOVED", "FIELD_REMOVED"}


def test_committed_sdl_matches_the_code() -> None:
    assert SDL_PATH.read_text() == current_sdl(), "schema changed: run 'make sdl' and commit"


def test_sdl_breaks_nothing_in_the_contract() -> None:
    contract = build_schema((CONTRACTS / "schema.graphql").read_text())
    changes = find_breaking_changes(contract, build_schema(SDL_PATH.read_text()))
    breaking = [c.description for c in changes if c.type.name not in MISSING_KINDS]
    assert breaking == []


def test_shared_contract_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(CONTRACT_CHECK), str(SDL_PATH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 breaking" in result.stdout


def test_requires_directive_is_in_the_sdl() -> None:
    sdl = SDL_PATH.read_text()
    assert "directive @requires(scope: Scope!) on FIELD_DEFINITION" in sdl
    assert "@requires(scope: EXPORTS_READ)" in sdl
