"""orch as a user installs it: `python -m build` makes a wheel, which goes into a fresh virtual
environment (not editable, nothing of this checkout on the path, run from a folder outside it), and
`orch run --dry-run` and a short `orch run` work from there: conf/ ships inside the package.

Offline and fast: the wheel is built without build isolation (setuptools from this environment, no
download), installed with `pip --no-deps --no-index`, and the new environment sees this
environment's dependencies (torch, Ray, DeepSpeed, ...) through a .pth line that puts their folder
at the END of its path. A .pth line adds a folder without running that folder's own .pth files, so
an editable install of orch there (`pip install -e .`) stays inactive and `import orchestrator`
finds the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "orchestrator", "model", "conf")  # what the wheel is built from


def _run(cmd: list, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from a copy of this checkout's sources, installed into a fresh venv."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info beside the sources
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True,  # (orchestrator/conf stays a link to conf/, as in git)
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", base / "dist"], cwd=src)
    wheel = next((base / "dist").glob("orch-*.whl"))

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=base)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=base).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])  # this env's packages
    (site / "zz-orch-test-deps.pth").write_text("".join(f"{d}\n" for d in deps))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q", wheel],
         cwd=base)

    cwd = base / "elsewhere"  # not the checkout: nothing is found relative to it
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ORCH_CONF_DIR", "ORCH_STATE_DIR")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return dict(wheel=wheel, venv=venv, python=python, orch=venv / "bin" / "orch", cwd=cwd, env=env)


def test_the_wheel_ships_conf_and_is_what_runs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    conf = REPO / "conf"
    expected = {f"orchestrator/conf/{p.relative_to(conf)}" for p in conf.rglob("*.yaml")}
    assert expected and expected <= set(names), sorted(expected - set(names))
    code = "import orchestrator, orchestrator.conf as c; print(orchestrator.__file__); print(c.__file__)"
    out = _run([installed["python"], "-c", code], cwd=installed["cwd"], env=installed["env"]).stdout.split()
    for path in out:
        assert path.startswith(str(installed["venv"])), out  # the wheel's copy, not the checkout's
        assert not Path(path).is_relative_to(REPO)  # (a path test: /tmp/cc_bt/... is not inside /tmp/cc)


def test_dry_run_from_the_wheel(installed):
    out = _run([installed["orch"], "run", "--dry-run", "model=gpt_tiny", "cluster=gpu"], cwd=installed["cwd"],
               env=installed["env"]).stdout
    assert "name: gpt_tiny" in out and "bf16 over nccl" in out and "{CPU: 4, GPU: 1}" in out
    assert not (installed["cwd"] / ".orch").exists()  # a dry run writes nothing
    # an unknown option lists the built-in choices, read from the installed package
    bad = subprocess.run([str(installed["orch"]), "run", "--dry-run", "model=nope"], cwd=installed["cwd"],
                         env=installed["env"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'nope'" in bad.stderr and "gpt_small, gpt_tiny" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_short_run_from_the_wheel(installed):
    out = _run([installed["orch"], "run", "model=gpt_tiny", "pipeline=pretrain", "trainer.max_steps=4",
                "trainer.log_interval=2", "data.num_documents=200", "tracking=none"], cwd=installed["cwd"],
               env=installed["env"], timeout=300).stdout
    assert "SUCCEEDED" in out, out
    runs = installed["cwd"] / ".orch" / "store" / "runs"
    assert list(runs.glob("*-pretrain/checkpoints/step-4/COMMITTED.json")), out
