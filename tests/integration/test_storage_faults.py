"""Storage faults in the middle of a real `orch run` (2 DeepSpeed workers on a real local Ray
cluster): the node-local staging disk fills up, the store becomes read-only, the S3 bucket is
deleted, the S3 credentials are revoked. Each time the job fails at once (no restart can fix it,
so none is used) with one reason that names what and the fix, within a bounded time; the last
committed checkpoint stays intact (every file's sha256) and, once the fault is gone, resumable.
And every worker killed while rank 0 writes a commit marker: the half-committed checkpoint is
never resumed from.

The disk faults need root (a tmpfs, remounted read-only); they are skipped otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from orchestrator.jobs.store import JobStore
from orchestrator.storage import join_uri, open_store
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

RUN = ["run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=5000", "trainer.log_interval=5",
       "checkpoint.interval=20", "checkpoint.keep_last=2", "data.num_documents=300",
       "pipeline.jobs.pretrain.max_failures=2", "tracking=none"]
FAIL_WITHIN_S = 240  # from the fault to `orch run` exiting: generous on 2 busy cores, but never a hang

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting (and remounting read-only) a tmpfs needs root")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextmanager
def _tmpfs(path: Path, size: str):
    """A fresh tmpfs of `size` mounted at `path` (made here), unmounted at the end."""
    path.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_read_only(path: Path, timeout: float = 60) -> None:
    """Remount `path` read-only; the kernel refuses (EBUSY) while a file is open for writing, so
    try again until an upload is not in flight."""
    deadline = time.time() + timeout
    while subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode != 0:
        assert time.time() < deadline, f"could not remount {path} read-only"
        time.sleep(0.05)


class Run:
    """One `orch run` in a child process, watched through its job records."""

    def __init__(self, state: Path, *overrides: str, env: dict | None = None, max_failures: int = 2):
        self.state = state
        run = [a for a in RUN if not a.startswith("pipeline.jobs.pretrain.max_failures=")]
        cmd = [sys.executable, "-m", "orchestrator", *run, f"pipeline.jobs.pretrain.max_failures={max_failures}",
               *overrides, "--state-dir", str(state)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})

    def job(self):
        jobs = JobStore(self.state).list() if (self.state / "jobs.db").exists() else []
        return jobs[0] if jobs else None

    def wait_for_commit(self, min_step: int = 20, timeout: float = 400) -> str:
        """The URI of a committed checkpoint of at least `min_step`, once the job has one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            job = self.job()
            if job and job.checkpoint and int(job.checkpoint.rsplit("step-", 1)[1]) >= min_step:
                return job.checkpoint
            time.sleep(0.5)
        self.proc.kill()
        raise AssertionError("no committed checkpoint in time: " + self.proc.communicate()[0][-3000:])

    def finish(self) -> tuple[int, str, float]:
        """Exit code, output and seconds from now until `orch run` exited."""
        t0 = time.time()
        try:
            out, _ = self.proc.communicate(timeout=FAIL_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"orch run still running {FAIL_WITHIN_S} s after the fault: "
                                 + self.proc.communicate()[0][-3000:]) from None
        return self.proc.returncode, out, time.time() - t0


def _failed_at_once(run: Run, code: int, out: str, *needles: str) -> str:
    assert code == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    job = run.job()
    assert job.state.value == "FAILED", job.history
    reason = job.failure_reason
    assert "\n" not in reason and all(n in reason for n in needles), reason
    assert job.restarts == 0 and "RESTARTING" not in [h["state"] for h in job.history]  # no restart used up
    return reason


def _intact(store, checkpoint: str) -> int:
    """Every file of the committed checkpoint, read back, matches the sha256 its marker records."""
    marker = json.loads(store.get(join_uri(checkpoint, "COMMITTED.json")))
    for f in marker["files"]:
        assert hashlib.sha256(store.get(join_uri(checkpoint, f["path"]))).hexdigest() == f["sha256"], f["path"]
    return len(marker["files"])


def _newest_intact(store, newest: str, seen: str) -> int:
    """The job's last committed checkpoint is intact; it is the one the test saw commit or a later one."""
    assert int(newest.rsplit("step-", 1)[1]) >= int(seen.rsplit("step-", 1)[1]), (newest, seen)
    return _intact(store, newest)


@needs_root
@pytest.mark.reliability(category="fault: storage", case="node-local staging disk full mid-run (tmpfs filled)",
                         lost="nothing committed; the steps since the last commit",
                         happened="the job failed at once (no restart used) with one line naming the staging folder "
                                  "and ORCH_LOCAL_DIR; the last committed checkpoint verified")
def test_staging_disk_full(tmp_path, reliability_tries):
    with _tmpfs(tmp_path / "scratch", "256m") as scratch:
        run = Run(tmp_path / "state", env={"ORCH_LOCAL_DIR": str(scratch)})
        checkpoint = run.wait_for_commit()
        with open(scratch / "filler", "wb") as f:  # fill what is left of the disk
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass
        code, out, seconds = run.finish()
        reason = _failed_at_once(run, code, out, "cannot stage the checkpoint", "ORCH_LOCAL_DIR", "disk is full")
        assert str(scratch) in reason
    store = open_store(f"file://{tmp_path / 'state' / 'store'}")
    # The job's last commit (the one seen first may since have been dropped by keep_last=2 if two
    # later ones were staged before the disk filled: retention, not a loss).
    assert _newest_intact(store, run.job().checkpoint, checkpoint) > 0
    reliability_tries(1)
    print(f"staging disk full: failed {seconds:.1f} s after the fault")


@needs_root
@pytest.mark.reliability(category="fault: storage", case="local store made read-only mid-run, then resumed",
                         lost="nothing committed; the steps since the last commit",
                         happened="the job failed at once with one line (read-only file system, the fix); once "
                                  "writable again, a run with resume_from continued from the last commit")
def test_store_made_read_only_then_resumed(tmp_path, reliability_tries):
    with _tmpfs(tmp_path / "mnt", "512m") as mnt:
        root = f"file://{mnt}/store"
        run = Run(tmp_path / "state", f"storage.root={root}")
        checkpoint = run.wait_for_commit()
        _remount_read_only(mnt)
        code, out, seconds = run.finish()
        _failed_at_once(run, code, out, "Read-only file system", "storage.root")
        _mount("-o", "remount,rw", str(mnt))
        store = open_store(root)
        assert _intact(store, checkpoint) > 0
        # Resumable: another run continues from the job's last commit (the newest committed one).
        job = run.job()
        newest = job.checkpoint
        step = int(newest.rsplit("step-", 1)[1])
        resumed = subprocess.run([sys.executable, "-m", "orchestrator", *RUN, f"storage.root={root}",
                                  f"trainer.max_steps={step + 5}", f"pipeline.jobs.pretrain.resume_from={newest}",
                                  "--state-dir", str(tmp_path / "state2")], capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resumed from {newest}" in resumed.stdout
    reliability_tries(1)
    print(f"store read-only: failed {seconds:.1f} s after the fault")


@pytest.mark.reliability(category="fault: storage", case="S3 bucket deleted mid-run",
                         lost="the bucket's contents (deleted by the user); nothing else",
                         happened="the job failed at once (no restart used) with one line naming the missing bucket")
def test_bucket_deleted_mid_run(tmp_path, s3_server, reliability_tries):
    bucket = s3_server.make_bucket("deleted")
    run = Run(tmp_path / "state", "storage=s3", f"storage.root=s3://{bucket}/orch",
              f"storage.endpoint_url={s3_server.endpoint_url}")
    run.wait_for_commit()
    s3 = s3_server.client()
    deadline = time.time() + 60
    while True:  # the workers may still add objects (logs every 5 s, checkpoints) while the bucket is emptied
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
        try:
            s3.delete_bucket(Bucket=bucket)
            break
        except s3.exceptions.ClientError:  # (BucketNotEmpty: three tries were once not enough)
            if time.time() > deadline:
                raise
    code, out, seconds = run.finish()
    _failed_at_once(run, code, out, f"S3 bucket '{bucket}' does not exist")
    reliability_tries(1)
    print(f"bucket deleted: failed {seconds:.1f} s after the fault")


@pytest.mark.reliability(category="fault: storage", case="S3 credentials revoked mid-run (403 InvalidAccessKeyId)",
                         lost="nothing committed; the steps since the last commit",
                         happened="the job failed at once (no restart used) with one line naming the credentials and "
                                  "the fix; the last committed checkpoint verified once access was back")
def test_credentials_revoked_mid_run(tmp_path, s3_server, reliability_tries):
    bucket = s3_server.make_bucket("revoked")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        run = Run(tmp_path / "state", "storage=s3", f"storage.root=s3://{bucket}/orch",
                  f"storage.endpoint_url={proxy.url}")
        checkpoint = run.wait_for_commit()
        proxy.revoked = True
        code, out, seconds = run.finish()
        _failed_at_once(run, code, out, "S3 rejected the credentials", "AWS_ACCESS_KEY_ID")
        assert proxy.counts["revoked"] > 0
    store = open_store(f"s3://{bucket}/orch", endpoint_url=s3_server.endpoint_url)
    assert _newest_intact(store, run.job().checkpoint, checkpoint) > 0
    reliability_tries(1)
    print(f"credentials revoked: failed {seconds:.1f} s after the fault")


@pytest.mark.reliability(category="fault: training",
                         case="kill -9 of every worker during a checkpoint commit, through a faulty S3 proxy (503 "
                              "SlowDown 10%, resets 2%, cut bodies 5%)",
                         lost="the checkpoint being committed (its marker never written) and the steps since the last "
                              "commit",
                         happened="prepare, shard reads, uploads, commit, restore and export all completed through the "
                                  "faults; the restarted group resumed from the commit before, never from the "
                                  "half-committed one; final checkpoint and export verified by sha256")
def test_kill_during_a_commit_through_a_faulty_store(tmp_path, s3_server, reliability_tries):
    """The whole pipeline goes through a proxy that throttles, resets and cuts responses short;
    rank 0's PUT of a commit marker is held in it while every worker is killed, then dropped, as
    a request from a dead machine would be."""
    bucket = s3_server.make_bucket("commit")
    root = f"s3://{bucket}/orch"
    with FaultProxy(s3_server.endpoint_url, slowdown=0.1, reset=0.02, truncate=0.05, seed=11) as proxy:
        run = Run(tmp_path / "state", "storage=s3", f"storage.root={root}", f"storage.endpoint_url={proxy.url}",
                  "trainer.max_steps=100")
        first = run.wait_for_commit()
        proxy.hold("COMMITTED.json")
        assert proxy.held.wait(300), "no commit marker was written"
        held_step = int(proxy.held_path.rsplit("step-", 1)[1].split("/")[0])
        workers = [c for c in psutil.Process(run.proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(c.cmdline())]
        assert workers
        for w in workers:
            w.kill()
        proxy.release.set()
        code, out, _ = run.finish()
    assert code == 0, out[-3000:]
    assert proxy.counts["slowdown"] and proxy.counts["reset"] + proxy.counts["truncate"], proxy.counts
    job = run.job()
    assert job.state.value == "SUCCEEDED" and job.restarts == 1, job.history
    resumed = [h["reason"] for h in job.history if "resumed from" in h["reason"]]
    assert resumed and resumed[0].endswith(f"step-{held_step - 20}"), (resumed, held_step, first)
    store = open_store(root, endpoint_url=s3_server.endpoint_url)
    assert _intact(store, job.checkpoint) > 0 and job.checkpoint.endswith("step-100")
    manifest = json.loads(store.get(join_uri(job.export, "export.json")))
    assert hashlib.sha256(store.get(join_uri(job.export, manifest["weights"]))).hexdigest() == manifest["sha256"]
    reliability_tries(1)
    print(f"through the proxy: {dict(proxy.counts)}")


@pytest.mark.reliability(category="fault: storage",
                         case="the same retryable failure at the same step, again after every restart (every PUT of "
                              "step 40's commit marker answered 503 SlowDown)",
                         lost="the steps after the last commit, three times; no committed state",
                         happened="classified storage at the same step three times in a row: the job stopped with "
                                  "one line saying so after 2 restarts, not at its max_failures")
def test_the_same_failure_at_the_same_step_three_times_stops_the_job(tmp_path, s3_server, reliability_tries):
    """No restart storm: a failure that comes back at the same step each time (a commit that the store
    refuses, as an overloaded bucket prefix does) stops the job after trainer.same_failure_limit (3)
    such failures in a row, with one line, well before its max_failures (5)."""
    bucket = s3_server.make_bucket("storm")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.refuse = lambda path: re.search(r"/step-0*40/COMMITTED\.json$", path) is not None
        run = Run(tmp_path / "state", "storage=s3", f"storage.root=s3://{bucket}/orch",
                  f"storage.endpoint_url={proxy.url}", max_failures=5)
        try:
            out, _ = run.proc.communicate(timeout=600)
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
        assert proxy.counts["refused"] > 0
    assert run.proc.returncode == 1, out[-3000:]
    job = run.job()
    assert job.state.value == "FAILED" and job.restarts == 2, job.history
    reason = job.failure_reason
    assert "\n" not in reason and reason.startswith("the same failure (storage) at step "), reason
    assert "3 times in a row, not restarting again (trainer.same_failure_limit=3)" in reason, reason
    assert len({(f["class"], f["step"]) for f in job.failures}) == 1 and len(job.failures) == 3, job.failures
    assert [e["class"] for e in job.restart_log] == ["storage", "storage"]
    assert all(e["resumed_from_step"] == 20 for e in job.restart_log), job.restart_log
    reliability_tries(1)
