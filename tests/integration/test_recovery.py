"""Recovery on real processes killed with real signals: `kill -9` of the training workers mid-run;
Ray Train restarts the worker group, which resumes from the last committed checkpoint that
verifies (the newest one has bytes flipped first, so it falls back to the one before) and is killed
again before its next commit, and ends with the same losses as an uninterrupted run: in the
metrics history and in the job's one W&B run, one row per step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

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
def test_kill_a_worker_resumes_from_the_last_commit(tmp_path):
    ref_state, state = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run([sys.executable, "-m", "orchestrator", *RUN, "--state-dir", str(ref_state)],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

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
    (ref_job,) = JobStore(ref_state).list()
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
