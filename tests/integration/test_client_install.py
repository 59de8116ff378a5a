"""The laptop's install: orch's wheel without its `train` extra, in a fresh venv that has only what
the wheel's own dependencies pull in (their closure, taken from this environment's packages, so the
test needs no network), drives an `orch up` head through its Jobs API end to end: submit, status,
logs, cancel. torch, DeepSpeed, Ray, pyarrow and W&B are not importable there, `pip check` is satisfied, and
`orch run` says in one line what to install. Ray's own CLI reaches the same head with
RAY_AUTH_MODE=token, as cluster/README.md says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "conf", "orchestrator", "model")  # what the wheel is built from
TRAINING = ("torch", "deepspeed", "ray", "pyarrow", "wandb", "tokenizers")


def _run(cmd, cwd, timeout=180, env=None, ok=True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if ok:
        assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The distributions of this environment that `requirements` (no extras) pull in, transitively."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        env = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker and not any(req.marker.evaluate(e) for e in env):
            continue
        key = req.name.lower().replace("_", "-")
        if key in found and not req.extras:
            continue
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), (req, dist.version)
        found[key] = dist
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return found


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("client")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info beside the sources
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", base / "dist"], cwd=src)
    wheel = next((base / "dist").glob("orch-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base_requires = [r for r in requires if "extra ==" not in r]

    deps = base / "deps"  # the client's dependencies only: links to this environment's copies
    deps.mkdir()
    for dist in _closure(base_requires).values():
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            if (root / top).exists() and not (deps / top).exists():
                (deps / top).symlink_to(root / top)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=base)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=base).stdout.strip())
    (site / "zz-orch-client-deps.pth").write_text(f"{deps}\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q", wheel],
         cwd=base)
    cwd = base / "laptop"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ORCH_CONF_DIR", "ORCH_STATE_DIR",
                                                             "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return dict(python=python, orch=venv / "bin" / "orch", cwd=cwd, env=env, requires=requires)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from tests.conftest import run_orch

    state = tmp_path_factory.mktemp("head-state")
    up = run_orch("up", "--nodes", "1", "--cpus-per-node", "2", "--state-dir", str(state), timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {"state": state, "dashboard": json.loads((state / "cluster.json").read_text())["dashboard"]}
    down = run_orch("down", "--state-dir", str(state), timeout=120)
    assert down.returncode == 0, down.stderr


def test_the_client_has_no_training_stack_and_its_dependencies_are_complete(client):
    assert any('extra == "train"' in r and r.startswith("torch") for r in client["requires"])  # still declared
    code = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % (TRAINING,)
    assert _run([client["python"], "-c", code], cwd=client["cwd"], env=client["env"]).stdout.strip() == "[]"
    check = _run([client["python"], "-m", "pip", "check"], cwd=client["cwd"], env=client["env"], ok=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_orch_run_in_the_client_says_in_one_line_what_to_install(client):
    out = _run([client["orch"], "run", "model=gpt_tiny"], cwd=client["cwd"], env=client["env"], ok=False)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "orch[train]" in lines[0] and "orch run" in lines[0] and "torch" in lines[0], lines[0]
    assert not (client["cwd"] / ".orch").exists()  # it said so before it started anything
    dry = _run([client["orch"], "run", "--dry-run", "model=gpt_tiny"], cwd=client["cwd"], env=client["env"])
    assert "name: gpt_tiny" in dry.stdout  # composing a config needs no training stack


def test_the_client_drives_an_orch_up_head_through_its_jobs_api(client, head):
    def remote(*args, ok=True):
        return _run([client["orch"], *args, "--address", head["dashboard"]], cwd=client["cwd"], env=client["env"],
                    timeout=180, ok=ok)

    sub = remote("submit", "model=gpt_tiny", "pipeline=pretrain", "trainer.max_steps=100000",
                 "data.num_documents=200", "tracking=none")
    (job,) = sub.stdout.split()
    status = json.loads(remote("status", "--json").stdout)
    assert [r["id"] for r in status] == [job]
    logs = remote("logs", job, "--controller")
    assert f"{job}: submitted" in logs.stdout, logs.stdout
    cancel = remote("cancel", job, "--now")
    assert f"{job}: CANCELLED" in cancel.stdout, cancel.stdout
    assert not (client["cwd"] / ".orch" / "jobs.db").exists()  # the records are the head's


def test_rays_own_cli_reaches_the_head_only_with_token_auth_mode(head):
    ray = Path(sys.executable).parent / "ray"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    listed = _run([ray, "job", "list", "--address", head["dashboard"]], cwd=REPO, timeout=120,
                  env={**env, "RAY_AUTH_MODE": "token"})
    assert re.search(r"JobDetails|\[\]", listed.stdout + listed.stderr), listed.stdout[-2000:]
    without = _run([ray, "job", "list", "--address", head["dashboard"]], cwd=REPO, timeout=120, env=env, ok=False)
    assert without.returncode != 0 and "RAY_AUTH_MODE" in without.stderr, without.stderr[-2000:]  # as the README says
