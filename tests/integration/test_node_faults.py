"""The job's runner actor killed with SIGKILL on a real 3-node Ray cluster on this machine
(`orch up --nodes 3`): the controller launches a new runner, the job completes, no committed
checkpoint is lost, the job is launched once, and its final loss equals an uninterrupted run's;
the steps redone are only those since the last commit.

(The worker processes, the controller actor and the whole cluster (`orch down` / `orch up`) are
killed in test_recovery.py and test_controller.py; a whole node in test_netns_node_loss.py. A
raylet SIGKILLed with everything under it on this cluster recovered the same way: restarts 1, once
2, when the first retry was placed before the GCS had noticed; dropped from the suite for time.)
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.integration import test_controller
from tests.integration.test_controller import TINY, Cli

pytestmark = pytest.mark.slow

cluster = test_controller.cluster  # the same fixture: a 3-node `orch up` cluster of this module's own

STEPS = 160
JOB = [*TINY, "pipeline=pretrain", f"trainer.max_steps={STEPS}", "checkpoint.interval=40", "checkpoint.keep_last=2",
       "pipeline.jobs.pretrain.max_failures=2"]


def _processes(cluster: dict, name: str) -> list[psutil.Process]:
    """This cluster's processes whose command line names `name` (other clusters may run beside it)."""
    from orchestrator.raycluster.local import cluster_pids, process_table, session_of

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
