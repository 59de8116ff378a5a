"""Secrets and exposure, end to end: planted AWS and W&B keys never appear in any byte `orch up` and
the controller (or Ray, W&B, DeepSpeed under them) write, and the local clusters listen on loopback
only. (`orch run`'s pipeline with planted keys: tests/integration/test_pipeline.py, the S3 pipeline.)

Every child process runs with HOME, TMPDIR, RAY_TMPDIR, ORCH_LOCAL_DIR and W&B's folders inside one
short temporary folder of the test, so "every byte written" is every file under it, plus the bucket
(each object's body and metadata) and the output of every command.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, run_orch
from tests.corpora import dataset_with_a_flipped_byte
from tests.leaks import bucket_hits, find_in_tree, output_hits, plant_secrets, sandboxed

pytestmark = pytest.mark.slow

@pytest.fixture
def sandbox():
    with sandboxed() as box:
        yield box


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

        # A submit refused for its corpus (the store read at submit), then a job through the controller
        # that reaches the store and fails in its worker (a shard with a flipped byte).
        bucket = s3_server.make_bucket("orchsec")
        store = ["storage=s3", f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3_server.endpoint_url}"]
        s3_server.client().put_object(Bucket=bucket, Key="corpus/notes.txt", Body=b"text \xff\xfe not utf-8")
        job = ["model=gpt_tiny", "pipeline=pretrain", "pipeline.jobs.pretrain.workers=1", *store]
        refused = run_orch("submit", *job, "data.name=binary", f"data.source=s3://{bucket}/corpus/", *state,
                           env=env, timeout=240)
        outputs["orch submit (refused)"] = refused.stdout + refused.stderr
        assert refused.returncode == 2 and "notes.txt" in refused.stderr, refused.stdout + refused.stderr
        shard = dataset_with_a_flipped_byte(f"s3://{bucket}/broken", job, endpoint_url=s3_server.endpoint_url)
        sub = run_orch("submit", *job, "data.source=null", f"data.uri=s3://{bucket}/broken", *state, env=env,
                       timeout=240)
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
        assert rec["state"] == "FAILED" and shard in rec["failure_reason"] and "sha256" in rec["failure_reason"], rec
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
    in_bucket, _ = bucket_hits(s3_server, bucket, secrets)
    assert hits + in_bucket + output_hits(outputs, secrets) == []


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
