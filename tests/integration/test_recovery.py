"""Recovery on real processes killed with real signals: `kill -9` of the training workers mid-run;
Ray Train restarts the worker group, which resumes from the last committed checkpoint that
verifies (the newest one has bytes flipped first, so it falls back to the one before) and is killed
again before its next commit, and ends with the same losses as an uninterrupted run: in the
metrics history and in the job's one W&B run, one row per step. A checkpoint upload killed half-way
is never loaded. A whole node lost (its own network namespace, every process SIGKILLed) is resumed
on the node left with the final loss of the same uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.jobs.store import JobStore
from orchestrator.storage import open_store
from orchestrator.train import history
from orchestrator.train.history import read_history
from tests import wandb_files

pytestmark = pytest.mark.slow

STEPS = 150  # two kills after step 60, then the third group trains from step 25 to the end
RUN = ["run", "pipeline=pretrain", "model=gpt_tiny", f"trainer.max_steps={STEPS}", "trainer.log_interval=1",
       "checkpoint.interval=25", "checkpoint.keep_last=3", "data.num_documents=600",
       "pipeline.jobs.pretrain.max_failures=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of RUN, once for the module: (its job record, its state folder)."""
    state = tmp_path_factory.mktemp("reference") / "state"
    ref = subprocess.run([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    (job,) = JobStore(state).list()
    return job, state


def _train_worker_pids(driver_pid: int) -> list[int]:
    """Training worker processes of the embedded cluster that `orch run` (pid) started: they
    descend from it (driver -> raylet -> workers), so no other test's processes are touched."""
    import psutil

    pids = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return sorted(pids)


def _history(state, job_id: str) -> list[dict]:
    """The job's metrics history, read from its run folder in the store (as `orch status --json` does)."""
    store = open_store(str(state / "store"))
    return read_history(store, f"file://{state}/store/runs/{job_id}")["rows"]


def _wandb_losses(state, job) -> dict[int, float]:
    """The losses of the job's one offline W&B run folder, by step (asserting one row per step)."""
    (run_dir,) = (state / "wandb").glob(f"offline-run-*-{job.wandb['run_id']}")
    assert job.wandb["dir"] == str(run_dir)
    out: dict[int, float] = {}
    for row in wandb_files.history(wandb_files.run_file(run_dir)):
        if "train/loss" in row:
            assert row["_step"] not in out and row["_step"] == row["trainer/step"], row
            out[row["_step"]] = row["train/loss"]
    return out


def _corrupt_newest(run) -> int:
    """Flip one byte in the newest committed checkpoint's largest file (same size, another sha256)."""
    committed = sorted((int(p.parent.name.split("-")[1]), p.parent) for p in run.glob("step-*/COMMITTED.json"))
    step, folder = committed[-1]
    victim = max((p for p in folder.iterdir() if p.name.endswith(".pt")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return step


def _kill_twice(proc, state) -> tuple[int, int]:
    """Kill every worker once past step 60 with two commits (corrupting the newest), then again once the
    restarted group has trained a few steps, before its next commit. Returns (corrupt step, second kill step)."""
    corrupt_step, second, killed = None, None, set()
    deadline = time.time() + 400
    while time.time() < deadline and second is None:
        time.sleep(0.2)
        if not (state / "jobs.db").exists():
            continue
        jobs = JobStore(state).list()
        if not jobs:
            continue
        run = state / "store" / "runs" / jobs[0].id / "checkpoints"
        committed = sorted(int(p.parent.name.split("-")[1]) for p in run.glob("step-*/COMMITTED.json"))
        pids = _train_worker_pids(proc.pid)
        if len(pids) != 2 or killed & set(pids):
            continue
        if corrupt_step is None and jobs[0].metrics.get("step", 0) >= 60 and len(committed) >= 2:
            # Every worker at once (no background upload can commit anything newer), then a flipped
            # byte in the newest committed checkpoint before the group restarts.
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            corrupt_step, killed = _corrupt_newest(run), set(pids)
        elif corrupt_step is not None:
            rows = _history(state, jobs[0].id)
            resumed = corrupt_step - 25
            if rows and rows[-1]["attempt"] == 2 and resumed + 3 <= rows[-1]["step"] and max(committed) <= resumed:
                for pid in pids:  # the second group dies before its first commit
                    os.kill(pid, signal.SIGKILL)
                second = rows[-1]["step"]
    assert corrupt_step and second, f"never killed twice (corrupt step {corrupt_step})"
    return corrupt_step, second


@pytest.mark.reliability(category="fault: training",
                         case="kill -9 of every worker mid-run, newest checkpoint corrupted",
                         lost="no committed state; the steps after the last good checkpoint were trained again "
                              "(same losses), twice; no metrics row",
                         happened="the worker group restarted from the checkpoint before the corrupt one, said so, "
                                  "and ended with the losses of an uninterrupted run")
def test_kill_a_worker_resumes_from_the_last_commit(tmp_path, reference):
    (ref_job, ref_state), state = reference, tmp_path / "killed"

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ORCH_REPORT": "1"})  # (the report is checked below)
    try:
        corrupt_step, second_kill = _kill_twice(proc, state)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    (job,) = JobStore(state).list()
    assert job.state.value == "SUCCEEDED" and job.restarts == 2
    assert "RESTARTING" in [h["state"] for h in job.history]
    # It resumed from the checkpoint before the corrupted one, and said so.
    resumed = [h["reason"] for h in job.history if h["reason"].startswith("worker group restarted")]
    assert resumed and f"step-{corrupt_step - 25}" in resumed[0] and "skipped corrupt" in resumed[0], job.history
    assert f"step-{corrupt_step}" in resumed[0]
    # Same final loss as the uninterrupted run.
    assert job.metrics["loss"] == pytest.approx(ref_job.metrics["loss"], rel=1e-6, abs=1e-7)
    # The metrics history: exactly one row per step 1..STEPS with the uninterrupted run's losses; the
    # second and third attempts resumed from the same checkpoint (the second was killed before its
    # first commit), so the steps after it are the third attempt's.
    theirs, rows = _history(ref_state, ref_job.id), _history(state, job.id)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) == [r["step"] for r in theirs]
    for mine, ref_row in zip(rows, theirs):
        assert mine["metrics"]["train/loss"] == pytest.approx(ref_row["metrics"]["train/loss"], rel=1e-6, abs=1e-7)
    start = corrupt_step - 25
    assert {r["attempt"] for r in rows if r["step"] <= start} == {1}
    assert {r["attempt"] for r in rows if r["step"] > start} == {3} and second_kill > start
    assert rows[start]["events"][0] == {"kind": "restart", "from_step": start, "world_size": 2}
    # The report `orch run` wrote counts both restarts, and time lost to them (the killed groups'
    # work after the checkpoint, and the restarts themselves).
    page = (state / "reports" / job.pipeline_id / "index.html").read_text()
    assert "<th>restarts after failures</th><td>2</td>" in page
    lost = re.search(r"<th>time lost to failures</th><td>(?:(\d+)m )?(\d+)s</td>", page)
    assert lost and int(lost.group(1) or 0) * 60 + int(lost.group(2)) > 0, page[:3000]
    assert "<th>worker groups started</th><td>3</td>" in page
    # (the second group's rows were all trained again by the third: one line on the curves)
    assert page.count(f"restart: resumed from step {start} at 2 workers") == 1
    # One W&B run folder for the job, with the same losses against the step axis.
    expected = history.losses(theirs)
    got = _wandb_losses(state, job)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.mark.reliability(category="fault: training",
                         case="kill -9 of a worker while a checkpoint uploads (throttled saves longer than the stall "
                              "timeout)",
                         lost="the unfinished upload (removed); training went on from the last committed checkpoint",
                         happened="resumed from the last committed checkpoint, never from the partial one; no "
                                  "uncommitted folder left; no save taken for a stall")
def test_kill_during_an_upload_never_loads_the_partial_checkpoint(tmp_path):
    """Uploads are slowed down (checkpoint.upload_limit_mbps) so that a worker can be killed while
    step 60 is being uploaded: the restarted group resumes from step 30, the last committed one,
    and the partial upload leaves nothing behind. The uploads are synchronous and take longer than
    the stall timeout (rank 0's ~1.4 MB at 0.2 MB/s, 7 s, against 4 s): a long save is no stall."""
    state = tmp_path / "state"
    run = ["run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=90", "trainer.log_interval=5",
           "checkpoint.interval=30", "checkpoint.keep_last=5", "checkpoint.upload_limit_mbps=0.2",
           "checkpoint.async_upload=false", "trainer.stall_timeout_s=4",
           "data.num_documents=600", "pipeline.jobs.pretrain.max_failures=2", "--state-dir", str(state)]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *run], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None:
            time.sleep(0.2)
            if not (state / "jobs.db").exists():
                continue
            jobs = JobStore(state).list()
            if not jobs:
                continue
            ckpts = state / "store" / "runs" / jobs[0].id / "checkpoints"
            step60 = ckpts / "step-60"
            uploading = step60.is_dir() and any(step60.rglob("*.pt")) and not (step60 / "COMMITTED.json").exists()
            pids = _train_worker_pids(proc.pid)
            if (ckpts / "step-30" / "COMMITTED.json").exists() and uploading and pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        assert killed, "never caught step 60 mid-upload"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (job,) = JobStore(state).list()
    assert job.state.value == "SUCCEEDED" and job.restarts == 1
    assert [f["class"] for f in job.failures] == ["worker_crash"], job.failures  # the kill; no save was a stall
    resumed = [h["reason"] for h in job.history if h["reason"].startswith("worker group restarted")]
    assert resumed and resumed[0].endswith("/checkpoints/step-30"), job.history  # not the partial step 60
    ckpts = state / "store" / "runs" / job.id / "checkpoints"
    # Every checkpoint folder left is committed, and no attempt's per-rank upload lists remain.
    folders = sorted(p.name for p in ckpts.iterdir())
    assert folders == ["step-30", "step-60", "step-90"]
    assert all((ckpts / f / "COMMITTED.json").exists() for f in folders)
    assert not list(ckpts.rglob("_ranks"))


# ------------------------------------------------------------------ a node lost, for real
needs_netns = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                 reason="network namespaces need root and iproute2's `ip`")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_namespace(ns: str) -> None:
    for _ in range(5):  # (a dying process may start no new ones, but be sure)
        pids = _pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


class NamespacedCluster:
    """Head + 2 worker nodes (2 CPUs each), one network namespace per node, on a test bridge."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.net = f"10.213.{random.randint(1, 250)}"
        self.bridge = f"obr{tag}"
        self.names = [f"orch{tag}n{i}" for i in range(3)]
        self.addrs = [f"{self.net}.{i + 2}" for i in range(3)]
        self.temp = tempfile.mkdtemp(prefix="orchns-", dir="/tmp")  # short: Ray's socket paths
        env = dict(os.environ)
        if (Path.home() / ".ray" / "auth_token").is_file():
            env.setdefault("RAY_AUTH_MODE", "token")
        self.env = env

    def __enter__(self):
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            _ip("netns", "add", ns)
            _ip("link", "add", f"{self.bridge}v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"{self.bridge}v{i}", "master", self.bridge)
            _ip("link", "set", f"{self.bridge}v{i}", "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        ray = str(Path(sys.executable).parent / "ray")
        self.address = f"{self.addrs[0]}:6379"
        self._run(0, ray, "start", "--head", f"--node-ip-address={self.addrs[0]}", "--port=6379", "--num-cpus=0",
                  "--include-dashboard=false", f"--temp-dir={self.temp}", "--disable-usage-stats")
        for i in (1, 2):
            self._run(i, ray, "start", f"--address={self.address}", f"--node-ip-address={self.addrs[i]}",
                      "--num-cpus=2", "--disable-usage-stats")
        return self

    def _run(self, node: int, *cmd: str) -> subprocess.CompletedProcess:
        out = subprocess.run(["ip", "netns", "exec", self.names[node], *cmd], capture_output=True, text=True,
                             env=self.env, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out

    def orch(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[0], sys.executable, "-m", "orchestrator", *args,
                                 "--address", self.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=self.env)

    def node_running(self, name: str) -> int | None:
        """The worker node (1 or 2) with a process whose command line names `name`."""
        for i in (1, 2):
            for pid in _pids(self.names[i]):
                try:
                    if name in Path(f"/proc/{pid}/cmdline").read_text():
                        return i
                except OSError:
                    continue
        return None

    def kill_node(self, node: int) -> None:
        _kill_namespace(self.names[node])

    def __exit__(self, *exc):
        for ns in self.names:
            _kill_namespace(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)


@needs_netns
@pytest.mark.reliability(category="fault: node",
                         case="a worker node lost (own network namespace: every process of it SIGKILLed)",
                         lost="the steps since the last commit (trained again, same losses)",
                         happened="Ray Train restarted the worker group on the node left, resumed from the last "
                                  "commit, and ended with the final loss of an uninterrupted run")
def test_node_lost_in_its_own_network_namespace(tmp_path, reliability_tries, reference):
    """A Ray head and two worker nodes, each in its own network namespace on this machine (veth pairs
    on a bridge, addresses of a private /24 that this test makes and removes), so the nodes share
    neither a network address nor a process tree. `orch run --address` drives the job from the head's
    namespace; the node that runs its workers is killed (every process in its namespace, SIGKILL, as
    when a machine dies). The job resumes from its last commit on the node left and ends with the
    final loss of the uninterrupted run (`reference`: the same job on the embedded cluster; the losses
    depend on the global batch, the seed and the data, not on where the workers run)."""
    ref_job, _ = reference
    with NamespacedCluster() as cluster:
        state = tmp_path / "lost"
        proc = cluster.orch(*RUN, "tracking=none", "storage.shared=true", "--state-dir", str(state))
        try:
            deadline, before = time.time() + 400, None
            while time.time() < deadline and before is None:
                time.sleep(0.5)
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                jobs = JobStore(state).list() if (state / "jobs.db").exists() else []
                if jobs and jobs[0].checkpoint and jobs[0].metrics.get("step", 0) >= 60:
                    before = int(jobs[0].checkpoint.rsplit("step-", 1)[1])
            assert before, "never reached step 60 with a commit"
            node = cluster.node_running("RayTrainWorker")
            assert node, "no training worker on a worker node"
            cluster.kill_node(node)
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-3000:]
    (job,) = JobStore(state).list()
    assert job.state.value == "SUCCEEDED" and 1 <= job.restarts <= 2, job.history
    resumed = [h["reason"] for h in job.history if "resumed from" in h["reason"]]
    assert resumed and int(resumed[0].rsplit("step-", 1)[1].split()[0]) >= before, (resumed, before)
    assert job.metrics["loss"] == pytest.approx(ref_job.metrics["loss"], rel=1e-6, abs=1e-7)
    reliability_tries(1)


def _rank_of(pid: int, job_id: str) -> int | None:
    """The rank of worker process `pid` (each rank's log file in the node's scratch is rank-R-PID.log)."""
    logs = Path(os.environ["ORCH_LOCAL_DIR"]) / job_id / "logs"
    found = list(logs.glob(f"rank-*-{pid}.log"))
    return int(found[0].name.split("-")[1]) if found else None


def _slow_down(pid: int, state, steps: int) -> None:
    """Keep worker `pid` slow (stopped half the time, 0.1 s at a time) for `steps` steps of the job."""
    start = JobStore(state).list()[0].metrics["step"]
    deadline = time.time() + 120
    try:
        while JobStore(state).list()[0].metrics["step"] < start + steps and time.time() < deadline:
            for _ in range(10):
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.1)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)


def _slow_then_stop_a_worker(proc, state) -> tuple[int, int]:
    """Once the job is past step 30 with a commit: one training worker kept slow for 20 steps (a
    straggler), then stopped with SIGSTOP (a hang). Returns (pid, rank)."""
    deadline = time.time() + 400
    while time.time() < deadline:
        time.sleep(0.2)
        jobs = JobStore(state).list() if (state / "jobs.db").exists() else []
        if not jobs or jobs[0].metrics.get("step", 0) < 30 or not jobs[0].checkpoint:
            continue
        pids = _train_worker_pids(proc.pid)
        ranks = {pid: _rank_of(pid, jobs[0].id) for pid in pids}
        if len(pids) == 2 and None not in ranks.values():
            victim = random.choice(pids)
            _slow_down(victim, state, 20)
            time.sleep(0.5)
            os.kill(victim, signal.SIGSTOP)
            return victim, ranks[victim]
    raise AssertionError("the job never reached step 30 with two workers")


@pytest.mark.reliability(category="fault: training",
                         case="one worker kept slow (SIGSTOP/SIGCONT), then stopped with SIGSTOP (a hang, no crash)",
                         lost="the steps after the last commit (trained again, same losses)",
                         happened="no false stall while it was slow; then a stall after the stall timeout: every "
                                  "rank's stacks saved, the stopped rank named with its node, its process killed, the "
                                  "group resumed from the last commit")
def test_a_slow_then_stopped_worker_is_a_named_stall(tmp_path, reference):
    """One worker kept slow, then `kill -STOP`: no crash, so only the heartbeats show it. Slow is no
    stall; stopped, the watchdog names it, keeps every rank's stacks in the store, kills it, and the
    job ends with the reference's loss. Every rank's compute time is in the metrics history."""
    (ref_job, _), state = reference, tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *RUN, "trainer.stall_timeout_s=8",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        victim, rank = _slow_then_stop_a_worker(proc, state)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim:
            subprocess.run(["kill", "-9", str(victim)], capture_output=True)
    assert proc.returncode == 0, out[-3000:]
    (job,) = JobStore(state).list()
    assert job.state.value == "SUCCEEDED" and job.restarts == 1, job.history
    (stall,) = job.failures
    assert stall["class"] == "stall" and stall["ranks"] == [rank] and stall["nodes"] == ["127.0.0.1"], stall
    assert f"rank {rank} on node 127.0.0.1 went silent (last heartbeat " in stall["line"], stall["line"]
    assert "stall timeout 8 s" in stall["line"]
    assert f"rank {1 - rank} waited in " in stall["line"], stall["line"]
    # every rank's stacks, in the run's folder in the store: the stopped one marked STUCK
    dumps = Path(stall["dumps"].removeprefix("file://"))
    stuck, other = (dumps / f"rank-{rank}.txt").read_text(), (dumps / f"rank-{1 - rank}.txt").read_text()
    assert f"# rank {rank} (STUCK)" in stuck and "Thread" in stuck and "orch-heartbeat" in stuck, stuck[:2000]
    assert f"# rank {1 - rank} (waiting)" in other and "_loop" in other, other[:2000]
    # the restart ledger: a stall of that rank, resumed from the last commit before it
    (restart,) = job.restart_log
    assert restart["class"] == "stall" and restart["ranks"] == [rank], restart
    assert restart["resumed_from_step"] % 25 == 0 and restart["steps_lost"] >= 0 and restart["seconds_lost"] > 0
    assert restart["failed_at_step"] >= restart["resumed_from_step"], restart
    assert "STALLED: no progress for" in out and "RESTARTING after a stall of rank" in out, out[-3000:]
    assert job.metrics["loss"] == pytest.approx(ref_job.metrics["loss"], rel=1e-6, abs=1e-7)
    # no stall while the rank was only slow (one failure); every rank's compute time in the history
    rows = _history(state, job.id)
    assert all(f"perf/compute_s/rank_{r}" in rows[-1]["metrics"] for r in (0, 1)), rows[-1]
    assert any(r["metrics"].get("perf/slowest_rank") == rank for r in rows)
