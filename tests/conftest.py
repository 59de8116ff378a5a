"""Shared fixtures: a real S3 endpoint on loopback, a runner for the real `orch` command, and the
reliability recorder (tests/reliability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_s3 import S3Server, s3_server  # noqa: F401  (fixture)
from tests.reliability import (  # noqa: F401  (the reliability recorder's hooks and fixture)
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    reliability_tries,
)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first (a stable sort: each file's tests stay together and in
    order). With `--dist loadfile --no-loadscope-reorder` (pyproject.toml) the long scenario files
    start at once on both test processes and the many short files fill in at the end, instead of
    pytest-xdist's default order (files with the most tests first), which left a long file for last."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(autouse=True, scope="session")
def _quiet_environment(tmp_path_factory):
    """W&B offline, node-local scratch under the test's tmp, one thread per worker."""
    scratch = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("ORCH_LOCAL_DIR", str(scratch))
        mp.setenv("ORCH_REPORT", "0")  # `orch run`'s report (~2 s of CPU each): on only where a test checks it
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("ORCH_STATE_DIR", raising=False)
        yield


@dataclass
class OrchResult:
    returncode: int
    stdout: str
    stderr: str

    def status(self, state_dir: Path) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json", "--state-dir", str(state_dir)],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def run_orch(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None) -> OrchResult:
    """Run the real CLI in a child process (`python -m orchestrator ...`)."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, **(env or {})})
    return OrchResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def orch():
    return run_orch
