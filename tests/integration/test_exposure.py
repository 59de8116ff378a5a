"""Secrets and exposure, end to end: planted AWS and W&B keys never appear in any byte orch (or Ray,
W&B, DeepSpeed under it) writes, and the local clusters listen on loopback only.

Every child process runs with HOME, TMPDIR, RAY_TMPDIR, ORCH_LOCAL_DIR and W&B's folders inside one
short temporary folder of the test, so "every byte written" is every file under it, plus the bucket
(each object's body and metadata) and the output of every command.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, run_orch
from tests.leaks import find_in_bytes, find_in_tree, plant_secrets

pytestmark = pytest.mark.slow

TINY = [
    "model=gpt_tiny",
    "trainer.max_steps=6",
    "trainer.log_interval=2",
    "checkpoint.interval=3",
    "checkpoint.keep_last=2",
    "data.num_documents=400",
    "pipeline.jobs.finetune.trainer.max_steps=3",
    "pipeline.jobs.finetune.data.num_documents=200",
    "~pipeline.jobs.finetune_scratch",  # (the demo's baseline adds nothing here)
]


@pytest.fixture
def sandbox():
    """A short folder (Ray's socket paths must stay under 107 bytes) holding everything the
    commands write: the state folder, scratch, Ray's sessions, HOME, TMPDIR and W&B's folders."""
    root = Path(tempfile.mkdtemp(prefix="orchsec-", dir="/tmp"))
    dirs = {name: root / name for name in ("state", "scratch", "ray", "tmp", "home", "wandb")}
    for d in dirs.values():
        d.mkdir()
    env = {
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "RAY_TMPDIR": str(dirs["ray"]),
        "ORCH_LOCAL_DIR": str(dirs["scratch"]),
        "WANDB_CONFIG_DIR": str(dirs["wandb"] / "config"),
        "WANDB_CACHE_DIR": str(dirs["wandb"] / "cache"),
        "WANDB_DATA_DIR": str(dirs["wandb"] / "data"),
        "WANDB_ARTIFACT_DIR": str(dirs["wandb"] / "artifacts"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    try:
        yield root, dirs, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bucket_hits(s3_server, bucket: str, secrets: dict[str, str]) -> tuple[list[str], int]:
    """Hits in every object of the bucket (body and metadata), and the number of objects."""
    client = s3_server.client()
    hits, n = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            data = got["Body"].read() + json.dumps(got.get("Metadata", {})).encode() + obj["Key"].encode()
            hits += [f"s3://{bucket}/{obj['Key']}: {name}" for name in find_in_bytes(data, secrets)]
            n += 1
    return hits, n


def _output_hits(outputs: dict[str, str], secrets: dict[str, str]) -> list[str]:
    return [f"output of `{cmd}`: {name}" for cmd, text in outputs.items()
            for name in find_in_bytes(text.encode(), secrets)]


def test_planted_secrets_never_written_by_a_pipeline(sandbox, s3_server):
    """`orch run` (pretrain -> fine-tune, S3 on loopback, W&B offline) with planted AWS and W&B
    keys, then `orch status`: no byte under the sandbox, in the bucket or in any output holds them."""
    root, dirs, env = sandbox
    secrets = plant_secrets()
    env = {**env, **secrets}
    bucket = s3_server.make_bucket("orchsec")
    store = ["storage=s3", f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3_server.endpoint_url}"]
    state = ["--state-dir", str(dirs["state"])]
    outputs = {}

    dry = run_orch("run", *TINY, *store, *state, "--dry-run", env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    outputs["orch run --dry-run"] = dry.stdout + dry.stderr
    run = run_orch("run", *TINY, *store, *state, env=env, timeout=900)
    outputs["orch run"] = run.stdout + run.stderr
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for args in (["status"], ["status", "--json"]):
        out = run_orch(*args, *state, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        outputs["orch " + " ".join(args)] = out.stdout + out.stderr
    jobs = json.loads(out.stdout)
    assert [j["state"] for j in jobs] == ["SUCCEEDED", "SUCCEEDED"], jobs
    for job in jobs:
        out = run_orch("status", job["id"], *state, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        outputs[f"orch status {job['id']}"] = out.stdout + out.stderr

    # The keys were there to leak: S3 was used (datasets, checkpoints, exports in the bucket), W&B
    # wrote its offline runs, Ray its session logs.
    hits, files = find_in_tree(root, secrets)
    bucket_hits, objects = _bucket_hits(s3_server, bucket, secrets)
    assert hits + bucket_hits + _output_hits(outputs, secrets) == []
    assert objects > 10 and files > 50, (objects, files)
    assert len(list(dirs["state"].rglob("run-*.wandb"))) == 2  # one W&B run per job, in the state folder
    assert not list(dirs["scratch"].rglob("*.wandb"))  # never on a worker's scratch disk
    # The metrics history went to the bucket too (and `status --json` read it back from there).
    assert all(j["metrics_history"]["rows"] > 0 and j["metrics_history"]["uri"].startswith("s3://") for j in jobs)
    assert list(dirs["ray"].glob("ray/session_*/logs/*"))
    assert not (dirs["state"] / "store").exists()  # everything went to the bucket


# ------------------------------------------------------------------------------ listening sockets
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _processes(mentioning: list[str]) -> list[psutil.Process]:
    """Processes whose command line mentions one of `mentioning`, with all their descendants."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if p.pid != os.getpid() and any(m in line for m in mentioning):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    return list(found.values())


def _listening(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every listening TCP/UDP socket of `procs`."""
    out = []
    for p in procs:
        try:
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    out.append((p.pid, p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return out


def test_up_listens_on_loopback_only_and_keeps_secrets(sandbox, s3_server):
    """`orch up --nodes 2` with planted keys: every socket of the cluster's processes (GCS, raylets,
    dashboard, agents, client server, the controller) listens on loopback; a submitted job that
    fails, `orch logs` and `orch status --json` leave the keys nowhere; `orch down` stops every
    process of this cluster (and only those: it matches them by this cluster's session)."""
    root, dirs, env = sandbox
    secrets = plant_secrets()
    env = {**env, **secrets}
    port = _free_port()
    state = ["--state-dir", str(dirs["state"])]
    outputs = {}
    up = run_orch("up", "--nodes", "2", "--cpus-per-node", "1", "--port", str(port), *state, env=env, timeout=240)
    outputs["orch up"] = up.stdout + up.stderr
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        procs = _processes([str(dirs["ray"]), f"127.0.0.1:{port}"])
        sockets = _listening(procs)
        assert any(port == p for *_, p in sockets), f"the GCS port {port} is not among {sockets}"
        assert {"gcs_server", "raylet"} <= {p.name() for p in procs}
        exposed = [s for s in sockets if not _loopback(s[2])]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        client_server = [s for s in sockets if "10001" == str(s[3])]
        assert client_server == [], f"the Ray client server took the shared port 10001: {client_server}"

        # A job through the controller that reaches the store, then fails in its runner.
        bucket = s3_server.make_bucket("orchsec")
        store = ["storage=s3", f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3_server.endpoint_url}"]
        s3_server.client().put_object(Bucket=bucket, Key="corpus/notes.txt", Body=b"text \xff\xfe not utf-8")
        sub = run_orch("submit", "model=gpt_tiny", "pipeline=pretrain", "pipeline.jobs.pretrain.workers=1", *store,
                       "data.name=broken", f"data.source=s3://{bucket}/corpus/", *state, env=env, timeout=240)
        outputs["orch submit"] = sub.stdout + sub.stderr
        assert sub.returncode == 0, sub.stdout + sub.stderr
        (job,) = sub.stdout.split()
        deadline = time.time() + 240
        while time.time() < deadline:
            st = run_orch("status", "--json", *state, env=env, timeout=120)
            assert st.returncode == 0, st.stderr
            (rec,) = json.loads(st.stdout)
            if rec["state"] in ("FAILED", "SUCCEEDED", "CANCELLED"):
                break
            time.sleep(2)
        outputs["orch status --json"] = st.stdout + st.stderr
        assert rec["state"] == "FAILED" and "notes.txt" in rec["failure_reason"], rec
        logs = run_orch("logs", job, *state, env=env, timeout=120)
        assert logs.returncode == 0 and job in logs.stdout, logs.stdout + logs.stderr
        outputs["orch logs"] = logs.stdout + logs.stderr
    finally:
        down = run_orch("down", *state, env=env, timeout=120)
        outputs["orch down"] = down.stdout + down.stderr
    assert down.returncode == 0, down.stdout + down.stderr
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert alive == [], f"still running after `orch down`: {[(p.pid, p.name()) for p in alive]}"

    hits, files = find_in_tree(root, secrets)
    assert files > 20 and list(dirs["ray"].glob("ray/orch-*/session_*/logs/*"))  # `orch up`'s own folder in Ray's
    bucket_hits, _ = _bucket_hits(s3_server, bucket, secrets)
    assert hits + bucket_hits + _output_hits(outputs, secrets) == []


_EMBEDDED = """
import json, os, psutil, ray
from orchestrator.raycluster.connect import connect
from orchestrator.config.schema import ClusterConfig

with connect(ClusterConfig(name="local", num_cpus=1)) as r:
    r.get(r.remote(lambda: 1).remote())
    me = psutil.Process()
    out = []
    for p in [me, *me.children(recursive=True)]:
        try:
            out += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    print("LISTENING " + json.dumps(out))
"""


def test_embedded_cluster_listens_on_loopback_only(sandbox):
    """The cluster `orch run` starts for itself listens on loopback only (Ray's default on Linux is
    every interface, at the machine's own address)."""
    _, _, env = sandbox
    out = subprocess.run([sys.executable, "-c", _EMBEDDED], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, **env})
    m = re.search(r"^LISTENING (.*)$", out.stdout, re.M)
    assert out.returncode == 0 and m, out.stdout[-2000:] + out.stderr[-2000:]
    sockets = json.loads(m.group(1))
    assert {name for _, name, *_ in sockets} >= {"gcs_server", "raylet"}, sockets
    assert [s for s in sockets if not _loopback(s[2])] == []


@pytest.mark.parametrize("override, needle", [
    ("data.name=../../escape", "config 'data' is invalid: name='../../escape' is not a safe name"),
    ("pipeline.jobs.finetune.data.name=qa/../../x",
     "config 'pipeline.jobs.finetune.data' is invalid: name='qa/../../x' is not a safe name"),
])
def test_unsafe_names_are_one_line_and_exit_2(orch, tmp_path, override, needle):
    out = orch("run", "--dry-run", "model=gpt_tiny", override, "--state-dir", str(tmp_path), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
