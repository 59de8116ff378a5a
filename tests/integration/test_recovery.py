"""Recovery on real processes killed with real signals: `kill -9` of one training worker mid-run;
Ray Train restarts the worker group, which resumes from the last committed checkpoint and ends
with the same final loss as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.jobs.store import JobStore
from tests import wandb_files

pytestmark = pytest.mark.slow

RUN = ["run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=300", "trainer.log_interval=1",
       "checkpoint.interval=25", "data.num_documents=600", "pipeline.jobs.pretrain.max_failures=2"]


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


def _attempts(job, state) -> list[dict[int, float]]:
    """The losses each attempt logged: a resumed run writes another offline folder with the same
    W&B run id."""
    out = []
    for run_dir in sorted((state / "wandb").glob(f"offline-run-*-{job.wandb['run_id']}")):
        rows = wandb_files.history(wandb_files.run_file(run_dir))
        out.append({r["_step"]: r["train/loss"] for r in rows if "train/loss" in r})
    return out


def test_kill_a_worker_resumes_from_the_last_commit(tmp_path):
    ref_state, state = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(ref_state)],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None:
            time.sleep(0.5)
            if not (state / "jobs.db").exists():
                continue
            jobs = JobStore(state).list()
            if jobs and jobs[0].checkpoint and jobs[0].metrics.get("step", 0) >= 60:
                pids = _train_worker_pids(proc.pid)
                if pids:
                    killed = pids[-1]
                    os.kill(killed, signal.SIGKILL)
        assert killed, "never reached step 60 with a committed checkpoint"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    (job,) = JobStore(state).list()
    (ref_job,) = JobStore(ref_state).list()
    assert job.state.value == "SUCCEEDED" and job.restarts == 1
    assert "RESTARTING" in [h["state"] for h in job.history]
    # Same final loss as the uninterrupted run, and every step's loss matches after the resume.
    assert job.metrics["loss"] == pytest.approx(ref_job.metrics["loss"], rel=1e-6, abs=1e-7)
    # (W&B rows a killed worker had not yet written are lost for good; the steps replayed after
    # the resume, from the checkpoint to the end, are all there.)
    (theirs,) = _attempts(ref_job, ref_state)
    first, second = _attempts(job, state)
    resumed_at = min(second) - 1
    assert resumed_at % 25 == 0 and resumed_at >= 25  # from a committed checkpoint, not from scratch
    assert max(first) > resumed_at  # the killed attempt had gone past it: those steps were redone
    assert set(second) == set(range(resumed_at + 1, 301))
    for attempt in (first, second):
        for step, loss in attempt.items():
            assert loss == pytest.approx(theirs[step], rel=1e-6, abs=1e-7), step
