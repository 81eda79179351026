"""The gateway code that is measured. Other people edit the working tree while a run goes on (a run takes about
an hour), so by default the gateway and its migrations run from a snapshot of the committed HEAD (``--code
worktree``: a copy of the working tree instead), taken once when the run starts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.harness.runinfo import ROOT, git_commit
from bench.harness.servers import child_env

PRODUCT_DIRS = ("kernel", "gateway", "ingest", "db", "schema", "resolvers", "exports")


def snapshot_code(mode: str) -> tuple[Path, dict[str, Any]]:
    """A private copy of the product code; returns (folder, description for the results)."""
    folder = Path(tempfile.mkdtemp(prefix="ingest_bench_code_"))
    git = git_commit()
    dirty = [line for line in git["dirty_files"] if line[3:].split("/", 1)[0] in PRODUCT_DIRS]
    if mode == "head":
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
    else:
        _copy_worktree(folder)
    return folder, {
        "mode": mode,
        "commit": git["commit"],
        "uncommitted_product_changes": dirty,
        "measured": "the committed HEAD (uncommitted changes above not included)"
        if mode == "head"
        else "the working tree as it was when the run started",
    }


def _copy_worktree(folder: Path) -> None:
    for name in (*PRODUCT_DIRS, "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, folder / name)


def setting_defaults(code: Path) -> dict[str, int]:
    """The ingest defaults of the measured code (read in a subprocess, from the snapshot)."""
    script = (
        "import json; from kernel.settings import Settings as S; f = S.model_fields; "
        "print(json.dumps({'batch_events': f['ingest_batch_events'].default, 'prefetch': f['ingest_prefetch'].default,"
        " 'max_age_ms': f['ingest_batch_max_age_ms'].default}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=code, env=child_env(), capture_output=True, text=True, check=True
    )
    return {k: int(v) for k, v in json.loads(out.stdout).items()}
