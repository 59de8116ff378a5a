"""Recovery on real processes killed with real signals: `kill -9` of the training workers mid-run;
Ray Train restarts the worker group, which resumes from the last committed checkpoint that
verifies (the newest one has bytes flipped first, so it falls back to the one before) and ends
with the same losses as an uninterrupted run."""

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
       "checkpoint.interval=25", "checkpoint.keep_last=3", "data.num_documents=600",
       "pipeline.jobs.pretrain.max_failures=2"]


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


@pytest.mark.reliability(category="fault: training",
                         case="kill -9 of every worker mid-run, newest checkpoint corrupted",
                         lost="no committed state; the steps after the last good checkpoint were trained again "
                              "(same losses)",
                         happened="the worker group restarted from the checkpoint before the corrupt one, said so, "
                                  "and ended with the losses of an uninterrupted run")
def test_kill_a_worker_resumes_from_the_last_commit(tmp_path):
    ref_state, state = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(ref_state)],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, corrupt_step = None, None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None:
            time.sleep(0.5)
            if not (state / "jobs.db").exists():
                continue
            jobs = JobStore(state).list()
            if not (jobs and jobs[0].metrics.get("step", 0) >= 60):
                continue
            run = state / "store" / "runs" / jobs[0].id / "checkpoints"
            committed = sorted((int(p.parent.name.split("-")[1]), p.parent) for p in run.glob("step-*/COMMITTED.json"))
            pids = _train_worker_pids(proc.pid)
            if len(committed) >= 2 and len(pids) == 2:
                # Kill every worker at once (so no background upload can commit anything newer),
                # then flip a byte in the newest committed checkpoint before the group restarts.
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = pids
                committed = sorted((int(p.parent.name.split("-")[1]), p.parent)
                                   for p in run.glob("step-*/COMMITTED.json"))
                corrupt_step, folder = committed[-1]
                victim = max((p for p in folder.iterdir() if p.name.endswith(".pt")), key=lambda p: p.stat().st_size)
                data = bytearray(victim.read_bytes())
                data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another sha256
                victim.write_bytes(bytes(data))
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
    # It resumed from the checkpoint before the corrupted one, and said so.
    resumed = [h["reason"] for h in job.history if h["reason"].startswith("worker group restarted")]
    assert resumed and f"step-{corrupt_step - 25}" in resumed[0] and "skipped corrupt" in resumed[0], job.history
    assert f"step-{corrupt_step}" in resumed[0]
    # Same final loss as the uninterrupted run, and every step's loss matches after the resume.
    assert job.metrics["loss"] == pytest.approx(ref_job.metrics["loss"], rel=1e-6, abs=1e-7)
    # (W&B rows a killed worker had not yet written are lost for good; the steps replayed after
    # the resume, from the checkpoint to the end, are all there.)
    (theirs,) = _attempts(ref_job, ref_state)
    first, second = _attempts(job, state)
    resumed_at = min(second) - 1
    assert resumed_at == corrupt_step - 25  # from the committed checkpoint before the corrupt one
    assert max(first) > resumed_at  # the killed attempt had gone past it: those steps were redone
    assert set(second) == set(range(resumed_at + 1, 301))
    for attempt in (first, second):
        for step, loss in attempt.items():
            assert loss == pytest.approx(theirs[step], rel=1e-6, abs=1e-7), step


@pytest.mark.reliability(category="fault: training", case="kill -9 of a worker while a checkpoint uploads",
                         lost="the unfinished upload (removed); training went on from the last committed checkpoint",
                         happened="resumed from the last committed checkpoint, never from the partial one; no "
                                  "uncommitted folder left")
def test_kill_during_an_upload_never_loads_the_partial_checkpoint(tmp_path):
    """Uploads are slowed down (checkpoint.upload_limit_mbps) so that a worker can be killed while
    step 60 is being uploaded: the restarted group resumes from step 30, the last committed one,
    and the partial upload leaves nothing behind."""
    state = tmp_path / "state"
    run = ["run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=90", "trainer.log_interval=5",
           "checkpoint.interval=30", "checkpoint.keep_last=5", "checkpoint.upload_limit_mbps=0.25",
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
    resumed = [h["reason"] for h in job.history if h["reason"].startswith("worker group restarted")]
    assert resumed and resumed[0].endswith("/checkpoints/step-30"), job.history  # not the partial step 60
    ckpts = state / "store" / "runs" / job.id / "checkpoints"
    # Every checkpoint folder left is committed, and no attempt's per-rank upload lists remain.
    folders = sorted(p.name for p in ckpts.iterdir())
    assert folders == ["step-30", "step-60", "step-90"]
    assert all((ckpts / f / "COMMITTED.json").exists() for f in folders)
    assert not list(ckpts.rglob("_ranks"))
