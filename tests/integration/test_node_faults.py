"""Process and node faults on a real 3-node Ray cluster on this machine (`orch up --nodes 3`):
the job's runner actor killed with SIGKILL, and a whole worker node lost (its raylet and every
process under it killed with SIGKILL, as when a machine dies). After each the job completes, no
committed checkpoint is lost, the job is launched once, and its final loss equals an
uninterrupted run's; the steps redone are only those since the last commit.

(The worker processes, the controller actor and the whole cluster (`orch down` / `orch up`) are
killed in test_recovery.py and test_controller.py.)
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.integration.test_controller import TINY, Cli, _free_port

pytestmark = pytest.mark.slow

STEPS = 240
JOB = [*TINY, "pipeline=pretrain", f"trainer.max_steps={STEPS}", "checkpoint.interval=40", "checkpoint.keep_last=2",
       "pipeline.jobs.pretrain.max_failures=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.conftest import run_orch

    state = tmp_path_factory.mktemp("node-faults")
    port = _free_port()
    up = run_orch("up", "--nodes", "3", "--cpus-per-node", "2", "--port", str(port), "--state-dir", str(state),
                  timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {"address": f"127.0.0.1:{port}", "state": state}
    run_orch("down", "--state-dir", str(state), timeout=120)


def _processes(cluster: dict, name: str) -> list[psutil.Process]:
    """This cluster's processes whose command line names `name` (other clusters may run beside it)."""
    from orchestrator.local_ray import cluster_pids, process_table, session_of

    table = process_table()
    port = int(cluster["address"].rsplit(":", 1)[1])
    mine = cluster_pids(table, port, session_of(table, port))
    out = []
    for p in table:
        if p.pid in mine and name in p.cmdline:
            try:
                out.append(psutil.Process(p.pid))
            except psutil.Error:
                continue
    return out


def _raylet_of(proc: psutil.Process) -> psutil.Process | None:
    for parent in proc.parents():
        if parent.name() == "raylet" or any(part.endswith("/raylet") for part in parent.cmdline()[:1]):
            return parent
    return None


def _under(root: psutil.Process, pids: set[int]) -> bool:
    return any(c.pid in pids for c in root.children(recursive=True))


def _committed_step(job: dict) -> int:
    return int((job["checkpoint"] or "step-0").rsplit("step-", 1)[1])


def _wait_for_commit(cli: Cli, job_id: str, min_step: int) -> dict:
    return cli.wait(lambda j: j[job_id]["state"] == "RUNNING" and _committed_step(j[job_id]) >= min_step, poll=0.3)


def _assert_recovered(job: dict, ref: dict, committed_before: int) -> str:
    assert job["state"] == "SUCCEEDED", job["failure_reason"]
    assert sum(h["state"] == "STARTING" for h in job["history"]) == 1  # launched once, never twice
    assert job["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-6, abs=1e-7)
    resumed = [h["reason"] for h in job["history"] if "resumed from" in h["reason"]]
    assert resumed, job["history"]
    step = int(resumed[0].rsplit("step-", 1)[1].split()[0].rstrip(",)"))
    assert step >= committed_before  # no committed checkpoint lost: only the steps since it were redone
    return resumed[0]


@pytest.mark.reliability(category="fault: process", case="kill -9 of the job's runner actor (persistent controller)",
                         lost="the steps since the last commit (trained again, same losses)",
                         happened="the controller saw the runner die, launched a new one, which resumed from the last "
                                  "commit; final loss equal to an uninterrupted run's")
def test_runner_killed(orch, cluster):
    cli = Cli(orch, cluster)
    (job,) = cli.submit(*JOB)
    before = _committed_step(_wait_for_commit(cli, job, 80)[job])
    (runner,) = _processes(cluster, "ray::JobRunner")  # the only job running: its runner
    os.kill(runner.pid, signal.SIGKILL)
    (ref,) = cli.submit(*JOB)  # the uninterrupted run, beside the restarted one
    jobs = cli.wait(lambda j: all(j[i]["state"] in ("SUCCEEDED", "FAILED") for i in (ref, job)), timeout=600)
    assert jobs[ref]["restarts"] == 0
    _assert_recovered(jobs[job], jobs[ref], before)
    assert any("runner died" in h["reason"] for h in jobs[job]["history"])
    cluster["ref"] = jobs[ref]


@pytest.mark.reliability(category="fault: node", case="a worker node lost (its raylet and all its processes SIGKILLed)",
                         lost="the node's share of the running step; the steps since the last commit",
                         happened="Ray Train restarted the worker group on the nodes left and resumed from the last "
                                  "commit; final loss equal to an uninterrupted run's")
def test_node_lost(orch, cluster):
    cli = Cli(orch, cluster)
    ref = cluster.get("ref")
    if ref is None:
        (ref_id,) = cli.submit(*JOB)
        ref = cli.wait(lambda j: j[ref_id]["state"] in ("SUCCEEDED", "FAILED"), timeout=600)[ref_id]
    (job,) = cli.submit(*JOB, "cluster.placement_strategy=SPREAD")
    before = _committed_step(_wait_for_commit(cli, job, 80)[job])
    head = _raylet_of(_processes(cluster, "ray::ControllerService")[0])
    workers = {p.pid for p in _processes(cluster, "ray::RayTrainWorker")}
    raylets = {_raylet_of(p) for p in _processes(cluster, "ray::RayTrainWorker")}
    (victim,) = [r for r in raylets if r and r.pid != head.pid][:1]
    assert _under(victim, workers)
    doomed = [victim, *victim.children(recursive=True)]
    for p in doomed:  # the machine dies: everything of that node at once
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    t0 = time.time()
    jobs = cli.wait(lambda j: j[job]["state"] in ("SUCCEEDED", "FAILED"), timeout=600)
    note = _assert_recovered(jobs[job], ref, before)
    print("\n".join(f"{h['state']}: {h['reason']}" for h in jobs[job]["history"]))
    # A failure of the worker group, retried by Ray Train; a second one when the first retry is
    # placed before the cluster has noticed the node is gone (seen once in 3 runs).
    assert 1 <= jobs[job]["restarts"] <= 2, jobs[job]["history"]
    print(f"node lost: {note}; finished {time.time() - t0:.0f} s after the kill")
