"""Unit tests of the guards against exposure: names and paths that cannot leave their prefix,
checkpoints loaded as data only (weights_only), the local cluster's processes told apart from
other clusters', and the secret finder the end-to-end tests rely on."""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import io
import json
import pickle
import random
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch

from orchestrator.checkpoint.layout import CheckpointRef, download_checkpoint, run_uri
from orchestrator.checkpoint.safe_load import load, weights_only_loads
from orchestrator.config.compose import compose_dict, compose_root, job_config_from_dict, resolve_jobs
from orchestrator.config.schema import RootConfig
from orchestrator.config.typed import build, to_dict
from orchestrator.errors import CheckpointError, ConfigError, StorageError
from orchestrator.raycluster.connect import is_loopback_address
from orchestrator.raycluster.local import Proc, cluster_pids, session_of
from orchestrator.storage import LocalStore, join_uri
from tests.leaks import encodings, find_in_bytes, plant_secrets
from tests.unit.config.test_config import _isolated  # noqa: F401  (autouse: the real conf/, a scratch cwd, no bucket)

REPO = Path(__file__).resolve().parents[2]


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------- names and paths
@pytest.mark.parametrize("override, value", [
    ("data.name=../escape", "'../escape'"),
    ("data.name=a/b", "'a/b'"),
    ("data.name=.hidden", "'.hidden'"),
    ("data.name='two words'", "'two words'"),
    ("data.name=a..b", "'a..b'"),
    ("pipeline.jobs.finetune.data.name=../../x", "'../../x'"),
])
def test_unsafe_dataset_names_are_one_config_error(override, value):
    with pytest.raises(ConfigError) as info:
        resolve_jobs(compose_root([override]))
    msg = _one_line(info)
    assert "is not a safe name" in msg and f"name={value}" in msg
    assert ("pipeline.jobs.finetune.data" if "finetune" in override else "config 'data'") in msg


def test_safe_names_compose():
    jobs = resolve_jobs(compose_root(["data.name=stories-v2.1_a", "pipeline.jobs.finetune.data.name=QA.2"]))
    assert [j.data.name for j in jobs] == ["stories-v2.1_a", "QA.2", "QA.2-scratch"]
    assert jobs[0].data.uri.endswith("/datasets/stories-v2.1_a")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 101, "-leading-dash", "tab\tname"])
def test_unsafe_job_names_are_one_config_error(name):
    raw = compose_dict(["pipeline=pretrain"])
    raw["pipeline"]["jobs"][name] = raw["pipeline"]["jobs"].pop("pretrain")
    with pytest.raises(ConfigError) as info:
        build(RootConfig, raw)
    msg = _one_line(info)
    assert "config 'pipeline' is invalid: job name=" in msg and "is not a safe name" in msg


def test_a_job_dict_sent_to_the_controller_with_an_unsafe_name_is_refused():
    (job,) = resolve_jobs(compose_root(["pipeline=pretrain"]))
    data = to_dict(job)
    assert job_config_from_dict(data).name == "pretrain"
    data["name"] = "../../etc"
    with pytest.raises(ConfigError) as info:
        job_config_from_dict(data)
    assert "name='../../etc' is not a safe name" in _one_line(info)


def test_run_uri_stays_under_runs():
    assert run_uri("s3://b/orch", "p1a2b3c-pretrain") == "s3://b/orch/runs/p1a2b3c-pretrain"
    for bad in ("../x", "a/b", "..", "", "a\\..\\b"):
        with pytest.raises(ConfigError, match="job id=.* is not a safe name"):
            run_uri("s3://b/orch", bad)


@pytest.mark.parametrize("part", ["..", "../x", "a/../b", "a/..", "a\\..\\b"])
def test_join_uri_refuses_parts_that_climb_out(part):
    # refused twice over: the marker's check (a path inside the checkpoint) and join_uri's ('..')
    with pytest.raises((StorageError, CheckpointError), match=r"'\.\.' segment|not a path inside the checkpoint"):
        join_uri("s3://b/runs/j", part)


def test_join_uri_keeps_names_with_dots():
    assert join_uri("file:///s", "a..b", ".x", "x.y/z..") == "file:///s/a..b/.x/x.y/z.."


def test_a_commit_marker_listing_a_path_outside_the_checkpoint_is_refused(tmp_path):
    """A marker (read from the store: untrusted) that lists ../../x must not make a download
    write outside the destination, nor read outside the checkpoint's prefix."""
    store, root = LocalStore(), tmp_path / "store"
    ckpt = root / "runs" / "p1-pretrain" / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    bait = b"outside"
    (root / "runs" / "bait").write_bytes(bait)  # what ../../bait would reach from the checkpoint
    marker = {"step": 1, "world_size": 1, "zero_stage": 2,
              "files": [{"path": "../../bait", "size": len(bait), "sha256": hashlib.sha256(bait).hexdigest(),
                         "rank": 0}]}
    (ckpt / "COMMITTED.json").write_text(json.dumps(marker))
    dest = tmp_path / "restore" / "a" / "b"
    # refused twice over: the marker's check (a path inside the checkpoint) and join_uri's ('..')
    with pytest.raises((StorageError, CheckpointError), match=r"'\.\.' segment|not a path inside the checkpoint"):
        download_checkpoint(store, CheckpointRef(1, f"file://{ckpt}", True), dest)
    assert not (tmp_path / "restore" / "bait").exists() and not list((tmp_path / "restore").rglob("bait"))


# ---------------------------------------------------------------- checkpoints as data only
def _calls(tree: ast.AST, names: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = ast.unparse(f)
            if dotted in names:
                yield node, dotted


def test_every_torch_load_in_the_code_is_weights_only():
    """orchestrator/ and model/: every torch.load passes weights_only=True (a literal), and nothing
    else unpickles (pickle/cloudpickle/dill loads, numpy with allow_pickle)."""
    loads, bad = 0, []
    for path in sorted([*(REPO / "orchestrator").rglob("*.py"), *(REPO / "model").rglob("*.py")]):
        tree, rel = ast.parse(path.read_text(), str(path)), path.relative_to(REPO)

        def where(n: ast.AST, rel=rel) -> str:
            return f"{rel}:{n.lineno}"

        for node, name in _calls(tree, {"torch.load", "torch.serialization.load", "serialization.load"}):
            loads += 1
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"{where(node)}: {name} without weights_only=True")
        for node, name in _calls(tree, {f"{m}.{f}" for m in ("pickle", "cloudpickle", "dill", "_pickle")
                                        for f in ("load", "loads", "Unpickler")}):
            bad.append(f"{where(node)}: {name}")
        for node, name in _calls(tree, {"np.load", "numpy.load"}):
            if any(k.arg == "allow_pickle" for k in node.keywords):
                bad.append(f"{where(node)}: {name} with allow_pickle")
        for node in ast.walk(tree):  # (comments may name it; code may not pass it)
            if isinstance(node, ast.keyword) and node.arg == "weights_only" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is True):
                bad.append(f"{where(node.value)}: weights_only={ast.unparse(node.value)}")
    assert loads >= 1  # the one in orchestrator/checkpoint/safe_load.py
    assert bad == []


class _Exploit:
    """A pickle that runs code when it is loaded (here: it writes a file)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tmp_path):
    evil, flag = tmp_path / "evil.pt", tmp_path / "flag"
    torch.save({"weights": torch.zeros(2), "payload": _Exploit(flag)}, evil)
    with pytest.raises(CheckpointError) as info:
        load(evil)
    assert "weights_only=True" in _one_line(info) and "GLOBAL" in str(info.value)
    # DeepSpeed's own loads ask for weights_only=False: inside weights_only_loads that is overridden.
    with weights_only_loads(), pytest.raises(CheckpointError):
        torch.load(evil, weights_only=False)
    assert torch.load is not load  # restored
    assert not flag.exists()
    # (without the guard the file would be written: the exploit is real)
    torch.serialization.load(evil, weights_only=False)
    assert flag.read_text() == "pwned"


def test_deepspeed_state_classes_load_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    f = tmp_path / "optim.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, False, False),
                "stage": ZeroStageEnum.gradients, "param_groups": [{"lr": 0.1, "params": [0]}],
                "state": torch.ones(3)}, f)
    with pytest.raises(pickle.UnpicklingError):
        torch.serialization.load(f, weights_only=True)  # plain weights_only refuses them
    got = load(f)
    assert got["loss_scaler"].cur_scale == 1.0 and got["stage"] is ZeroStageEnum.gradients
    assert torch.equal(got["state"], torch.ones(3))


def test_rng_state_round_trips_weights_only(tmp_path):
    """The RNG file of a checkpoint is tensors and numbers (weights_only loads it), and restoring
    it continues every generator exactly."""
    from orchestrator.checkpoint.checkpointer import _rng_state, _set_rng_state

    random.random()
    np.random.rand(3)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    torch.rand(2)
    f = tmp_path / "rng.pt"
    torch.save(_rng_state(), f)
    def draw():
        return random.random(), np.random.rand(4).tolist(), np.random.randn(3).tolist(), torch.rand(4).tolist()

    expected = draw()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _set_rng_state(torch.serialization.load(f, weights_only=True))
    assert draw() == expected


# ------------------------------------------------------------------------- the local cluster
def test_loopback_addresses():
    for a in ("127.0.0.1:6379", "localhost:1", "ray://127.0.0.1:10001", "[::1]:6379"):
        assert is_loopback_address(a), a
    for a in (None, "", "auto", "10.0.0.5:6379", "ray://10.0.0.5:10001", "127.0.0.10:6379"):
        assert not is_loopback_address(a), a


def _table() -> list[Proc]:
    """Two clusters on one machine (ports 6379/6380), a driver of the first, and a bystander."""
    def cluster(base: int, port: int, session: str) -> list[Proc]:
        d = f"/tmp/ray/{session}"
        return [
            Proc(base + 1, 1, f"/x/gcs_server --log_dir={d}/logs --gcs_server_port={port} --session-name={session}"),
            Proc(base + 2, 1, f"/x/raylet --raylet_socket_name={d}/sockets/raylet --gcs-address=127.0.0.1:{port}"),
            Proc(base + 3, base + 2, "ray::IDLE"),  # a worker: no session in its title
            Proc(base + 4, base + 2, "ray::DashboardAgent"),
            Proc(base + 5, 1, f"python -m ray.util.client.server --address=127.0.0.1:{port} --host=127.0.0.1"),
            Proc(base + 6, 1, f"python dashboard.py --session-dir={d} --gcs-address=127.0.0.1:{port}"),
            Proc(base + 7, base + 6, "ray-dashboard-StateHead-0"),
            Proc(base + 8, 1, f"/x/raylet --raylet_socket_name={d}/sockets/raylet.1 --node_manager_port=0"),  # node 2
            Proc(base + 9, base + 8, "ray::RayTrainWorker"),
        ]

    a = cluster(100, 6379, "session_2026-01-01_00-00-00_000001_42")
    b = cluster(200, 6380, "session_2026-01-01_00-00-00_000001_421")  # a session name that extends a's
    bystanders = [Proc(300, 1, "python -m orchestrator status --address 127.0.0.1:6379"),  # a driver, not Ray's
                  Proc(301, 1, "python -m pytest tests/"),
                  Proc(302, 1, "python -m ray.util.client.server --address=127.0.0.1:63790")]  # port 63790
    return [*a, *b, *bystanders]


def test_down_finds_its_own_clusters_processes_and_nothing_else():
    table = _table()
    assert session_of(table, 6379) == "session_2026-01-01_00-00-00_000001_42"
    assert cluster_pids(table, 6379, "session_2026-01-01_00-00-00_000001_42") == set(range(101, 110))
    assert cluster_pids(table, 6380, session_of(table, 6380)) == set(range(201, 210))
    # The session recorded by `orch up` still finds the raylets when the GCS is already gone.
    no_gcs = [p for p in table if p.pid != 101]
    assert cluster_pids(no_gcs, 6379, "session_2026-01-01_00-00-00_000001_42") == set(range(102, 110))


# ------------------------------------------------------------------ the secret finder itself
def test_the_secret_finder_sees_every_likely_encoding(tmp_path):
    secrets = plant_secrets(seed=3)
    key = secrets["AWS_SECRET_ACCESS_KEY"]
    assert "/" in key and "+" in key and len(key) == 40
    other = {"WANDB_API_KEY": secrets["WANDB_API_KEY"]}
    buf = io.BytesIO()
    torch.save({"config": {"note": key}}, buf)
    samples = [
        key.encode(),
        quote(key, safe="").encode(),
        json.dumps({"k": key}).replace("/", "\\/").encode(),
        gzip.compress(b"x=" + key.encode()),
        buf.getvalue(),
        key.encode("utf-16-le"),
    ]
    for prefix in (b"", b"a", b"ab"):  # base64 of the secret inside a longer payload, each alignment
        samples.append(base64.b64encode(prefix + b'{"secret": "' + key.encode() + b'"}'))
    for data in samples:
        framed = data if data[:2] in (b"PK", b"\x1f\x8b") else b"..." + data + b"..."  # archives start at byte 0
        assert find_in_bytes(framed, secrets) == ["AWS_SECRET_ACCESS_KEY"], data[:60]
        assert find_in_bytes(framed, other) == []
    assert all(len(e) >= 20 for e in encodings(key))
