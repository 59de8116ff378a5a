"""Node loss, for real: a Ray head and two worker nodes, each in its own network namespace on this
machine (veth pairs on a bridge, addresses of a private /24 that this test makes and removes),
so the nodes share neither a network address nor a process tree. `orch run --address` drives a
job on them from the head's namespace; the node that runs the job's workers is killed (every
process in its namespace, SIGKILL, as when a machine dies). The job resumes from its last commit
on the node left and ends with the final loss of an uninterrupted run on the same cluster.

Needs root (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.jobs.store import JobStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                 reason="network namespaces need root and iproute2's `ip`")]

RUN = ["run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=120", "trainer.log_interval=1",
       "checkpoint.interval=40", "data.num_documents=300", "tracking=none", "storage.shared=true",
       "pipeline.jobs.pretrain.max_failures=2"]


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


@pytest.mark.reliability(category="fault: node",
                         case="a worker node lost (own network namespace: every process of it SIGKILLed)",
                         lost="the steps since the last commit (trained again, same losses)",
                         happened="Ray Train restarted the worker group on the node left, resumed from the last "
                                  "commit, and ended with the final loss of an uninterrupted run")
def test_node_lost_in_its_own_network_namespace(tmp_path, reliability_tries):
    with NamespacedCluster() as cluster:
        ref = cluster.orch(*RUN, "--state-dir", str(tmp_path / "ref"))
        out, _ = ref.communicate(timeout=600)
        assert ref.returncode == 0, out[-3000:]
        (ref_job,) = JobStore(tmp_path / "ref").list()

        state = tmp_path / "lost"
        proc = cluster.orch(*RUN, "--state-dir", str(state))
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
