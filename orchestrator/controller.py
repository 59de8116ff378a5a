"""The controller: submits pipelines into the job store and drives each job's state machine.

One `step()` applies the pure policies (dependencies, admission) and the launcher's progress to
the durable records; `run()` steps until the given jobs are terminal. Every state change is
persisted before it is acted on. The Ray dependency is the `launcher` seam, so tests can step the
loop with a fake one.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, Protocol

from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.errors import CheckpointError, ClusterError, OrchError
from orchestrator.jobs.policy import (admission_decisions, dependency_decisions, never_fits, restart_decision,
                                      scale_refusal)
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore


class Launcher(Protocol):
    def start(self, record: JobRecord, init_from: str | None): ...
    def attach(self, record: JobRecord): ...  # the live handle of a job started earlier, or None
    def poll(self, handle): ...
    def request_stop(self, handle, why: str, job: dict | None = None) -> None: ...
    def kill(self, handle) -> None: ...


def _resume_note(resumed: dict) -> str:
    if not resumed.get("from"):
        return ""
    note = f", resumed from {resumed['from']}"
    if resumed.get("universal"):
        note += " as a universal checkpoint"
    if resumed.get("skipped"):
        note += f" (skipped corrupt {', '.join(resumed['skipped'])})"
    return note


def new_pipeline_id() -> str:
    return f"p{secrets.token_hex(3)}"


class Controller:
    def __init__(self, store: JobStore, launcher: Launcher, capacity: Callable[[], dict[str, float]],
                 say: Callable[[str], None] = print):
        self.store = store
        self.launcher = launcher
        self.capacity = capacity
        self.say = say
        self.handles: dict[str, object] = {}
        self._last_step: dict[str, int] = {}
        self._restart_base: dict[str, int] = {}  # a job's restart count when its current runner started
        self._last_progress: dict[str, object] = {}

    # ---------------------------------------------------------------------------------- submit
    def submit(self, jobs: list[JobConfig], pipeline_id: str | None = None, after: list[str] = ()) -> list[JobRecord]:
        """Record a pipeline's jobs as PENDING. Dependencies are named by job name inside the
        pipeline; `after` (job ids already submitted) is added to every job that has none there."""
        pipeline_id = pipeline_id or new_pipeline_id()
        for dep in after:
            self.store.get(dep)  # raises JobNotFound with the fix
        ids = {j.name: f"{pipeline_id}-{j.name}" for j in jobs}
        now = time.time()
        records = [
            JobRecord(id=ids[j.name], pipeline_id=pipeline_id, name=j.name, kind=j.kind, state=JobState.PENDING,
                      priority=j.priority, depends_on=[ids.get(d, d) for d in j.depends_on] or list(after),
                      config=to_dict(j), created_at=now)
            for j in jobs
        ]
        capacity = self.capacity()
        for r in records:
            why = None if r.config["cluster"].get("autoscaling") else never_fits(r, capacity)
            if why:
                raise ClusterError(why)
        self.store.add(records)
        return records

    # ------------------------------------------------------------------------------------ step
    def step(self, job_ids: list[str]) -> bool:
        """One pass of the loop over `job_ids`. Returns True while any of them is not terminal."""
        jobs = [self.store.get(i) for i in job_ids]
        known = {j.id for j in jobs}
        deps = {d for j in jobs for d in j.depends_on if d not in known}
        for d in sorted(deps):
            try:
                jobs.append(self.store.get(d))
            except OrchError:
                pass  # dependency_decisions blocks the job and names the missing id
        for d in dependency_decisions(jobs):
            self.store.transition(d.job_id, d.state, d.reason)
            self.say(f"{d.job_id}: {d.state.value} ({d.reason})")
        jobs = [self.store.get(i) for i in job_ids]
        autoscaling = any(j.config["cluster"].get("autoscaling") for j in jobs)
        for d in admission_decisions(jobs, self.capacity(), autoscaling=autoscaling):
            record = self.store.transition(d.job_id, d.state, d.reason)
            self.say(f"{d.job_id}: STARTING")
            try:
                init_from = self._init_from(record)
            except OrchError as e:
                self.store.transition(d.job_id, JobState.FAILED, str(e), failure_reason=str(e))
                self.say(f"{d.job_id}: FAILED: {e}")
                continue
            self._launch(record, init_from)
        for job_id, handle in list(self.handles.items()):
            self._observe(self.store.get(job_id), self.launcher.poll(handle))
        return any(not self.store.get(i).state.terminal for i in job_ids)

    def _launch(self, record: JobRecord, init_from: str | None) -> None:
        self.handles[record.id] = self.launcher.start(record, init_from)
        self._restart_base[record.id] = record.restarts

    def recover(self) -> None:
        """After a controller (re)start: re-attach to the runners of the jobs that were active, and
        restart from their last committed checkpoint those whose runner is gone."""
        for record in self.store.list():
            if not record.state.active or record.id in self.handles:
                continue
            handle = self.launcher.attach(record)
            if handle is not None:
                self.handles[record.id] = handle
                self._restart_base[record.id] = record.restarts
                self.say(f"{record.id}: re-attached to its running worker group")
                continue
            self._relaunch(record, "the controller restarted and the job's worker group was gone", failure=False)

    def _relaunch(self, record: JobRecord, why: str, failure: bool = True) -> None:
        """Start a job again from its last committed checkpoint (the train loop resumes there). A
        runner lost while the controller was away (a head restart) does not count as a failure."""
        decision = restart_decision(record, why, failure)
        if decision.state is not JobState.RESTARTING:
            self._end(record, decision.state, decision.reason, failure_reason=why if decision.state is JobState.FAILED else None)
            return
        restarts = record.restarts + int(failure)
        if record.state is not JobState.RESTARTING:
            record = self.store.transition(record.id, JobState.RESTARTING, decision.reason, restarts=restarts)
        elif restarts != record.restarts:
            record = self.store.update(record.id, restarts=restarts)
        self.say(f"{record.id}: RESTARTING ({why})")
        try:
            init_from = self._init_from(record)
        except OrchError as e:
            self._end(record, JobState.FAILED, str(e), failure_reason=str(e))
            return
        self._launch(record, init_from)

    def _end(self, record: JobRecord, state: JobState, reason: str, **fields) -> None:
        self.store.transition(record.id, state, reason, requested=None, **fields)
        self.say(f"{record.id}: {state.value}" + (f": {reason}" if state is not JobState.SUCCEEDED else ""))
        handle = self.handles.pop(record.id, None)
        if handle is not None:
            self.launcher.kill(handle)  # frees its placement group first, then drops it

    # ---------------------------------------------------------------------------- user actions
    def cancel(self, job_id: str, now: bool = False) -> JobRecord:
        """Cancel a job: a waiting one at once; a running one checkpoints first (unless `now`)."""
        record = self.store.get(job_id)
        if record.state.terminal:
            raise ClusterError(f"job {job_id} is already {record.state.value}; there is nothing to cancel")
        handle = self.handles.get(job_id)
        if not record.state.active or handle is None:
            self._end(record, JobState.CANCELLED, "cancelled by the user", failure_reason="cancelled by the user")
        elif now:
            self._end(record, JobState.CANCELLED, "cancelled by the user (--now: no checkpoint)",
                      failure_reason="cancelled by the user")
        else:
            self.store.update(job_id, requested={"action": "cancel"})  # persisted before it is acted on
            self.launcher.request_stop(handle, "cancel")
            self.say(f"{job_id}: cancelling: checkpointing the current step, then stopping")
        return self.store.get(job_id)

    def scale(self, job_id: str, workers: int) -> JobRecord:
        """Restart a running job at `workers` workers from a checkpoint of its current step."""
        from orchestrator.config.compose import job_config_from_dict

        record = self.store.get(job_id)
        why = scale_refusal(record, workers, self.store.list(), self.capacity())
        if why is None and job_id not in self.handles:
            why = f"job {job_id} has no running worker group to scale yet"
        if why:
            raise ClusterError(why)
        new = dict(record.config, workers=workers)
        try:
            job_config_from_dict(new)
        except (OrchError, ValueError) as e:
            raise ClusterError(f"cannot scale {job_id} to {workers} workers: {e}") from None
        old = record.workers
        fits_now = self._last_progress[job_id].fits if job_id in self._last_progress else 1
        self.store.update(job_id, config=new, requested={"action": "scale", "workers": workers, "fits": fits_now})
        self.store.transition(job_id, JobState.RESTARTING, f"scaling from {old} to {workers} workers")
        self.launcher.request_stop(self.handles[job_id], "scale", new)
        self.say(f"{job_id}: scaling from {old} to {workers} workers: checkpoint, then restart from it")
        return self.store.get(job_id)

    def _init_from(self, record: JobRecord) -> str | None:
        """The job's own `init_from`, else the exported weights of the first dependency that has them
        (fine-tuning starts there)."""
        if record.config.get("init_from"):
            return record.config["init_from"]
        for dep in record.depends_on:
            export = self.store.get(dep).export
            if export:
                return export
        if record.depends_on:  # never start from random weights by accident
            raise CheckpointError(f"job {record.id}: its dependencies succeeded but none exported weights to start from")
        return None

    def _observe(self, record: JobRecord, p) -> None:
        fields = {}
        if p.metrics and p.metrics != record.metrics:
            fields["metrics"] = p.metrics
        if p.checkpoint and p.checkpoint != record.checkpoint:
            fields["checkpoint"] = p.checkpoint
        if p.wandb and p.wandb != record.wandb:
            fields["wandb"] = p.wandb
        if p.status == "busy":
            return
        self._last_progress[record.id] = p
        if p.status == "lost":
            self.handles.pop(record.id, None)
            self._relaunch(record, p.reason or "the job's runner died")
            return
        # Worker-group failures: attempts beyond the ones the runner started on purpose (scaling).
        restarts = self._restart_base.get(record.id, 0) + max(0, p.attempts - max(p.fits, 1) - p.resizes)
        size = p.metrics.get("world_size")
        if size and record.config.get("max_workers") and record.metrics.get("world_size") not in (None, size):
            self.say(f"{record.id}: resized by Ray Train from {record.metrics['world_size']} to {size} workers "
                     f"(elastic {record.workers}-{record.config['max_workers']}); continuing from the last checkpoint")
        if fields:
            record = self.store.update(record.id, **fields)
        step = p.metrics.get("step")
        if step is not None and step != self._last_step.get(record.id):
            self._last_step[record.id] = step
            loss = p.metrics.get("loss")
            if loss is not None:
                self.say(f"{record.id}: step {step}/{record.config['trainer']['max_steps']} loss {loss:.4f}")
        resumed = _resume_note(p.resumed) if p.resumed.get("attempt") == p.attempts else ""
        if p.status == "running" and record.state is JobState.STARTING and p.ready_attempt >= 1:
            self.store.transition(record.id, JobState.RUNNING, "worker group started" + resumed)
            self.say(f"{record.id}: RUNNING on {record.workers} workers{resumed}")
        elif restarts > record.restarts and record.state is JobState.RUNNING:
            self.store.transition(record.id, JobState.RESTARTING, "worker group failed; restarting from the last checkpoint",
                                  restarts=restarts)
            self.say(f"{record.id}: RESTARTING (restart {restarts})")
        elif record.state is JobState.RESTARTING and p.status == "running" and p.ready_attempt == p.attempts >= 1:
            requested = record.requested or {}
            if requested.get("action") != "scale":
                self.store.transition(record.id, JobState.RUNNING, "worker group restarted" + resumed)
                self.say(f"{record.id}: RUNNING again{resumed}")
            elif p.fits > requested.get("fits", 0) and p.ready_attempt > p.fit_base:  # the new-size group trains
                self.store.transition(record.id, JobState.RUNNING, f"restarted at {record.workers} workers" + resumed,
                                      requested=None)
                self.say(f"{record.id}: RUNNING on {record.workers} workers{resumed}")
        if p.status == "succeeded":
            self._end(record, JobState.SUCCEEDED, "training finished", export=p.export, restarts=restarts)
        elif p.status == "stopped":
            self._end(record, JobState.CANCELLED, f"cancelled by the user after a checkpoint ({p.checkpoint})",
                      failure_reason="cancelled by the user")
        elif p.status == "failed":
            self._end(record, JobState.FAILED, p.reason or "failed", failure_reason=p.reason,
                      failure_detail=p.traceback, restarts=restarts)

    def abandon(self, job_ids: list[str], reason: str) -> None:
        """Mark every non-terminal job of `job_ids` CANCELLED (the process driving them is stopping)."""
        for job_id in job_ids:
            record = self.store.get(job_id)
            if not record.state.terminal:
                self.store.transition(job_id, JobState.CANCELLED, reason, failure_reason=reason)

    def run(self, job_ids: list[str], poll_s: float = 1.0) -> list[JobRecord]:
        """Step until every job in `job_ids` is terminal; their final records."""
        while self.step(job_ids):
            time.sleep(poll_s)
        return [self.store.get(i) for i in job_ids]
