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
from orchestrator.jobs.policy import admission_decisions, dependency_decisions, never_fits
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore


class Launcher(Protocol):
    def start(self, record: JobRecord, init_from: str | None): ...
    def poll(self, handle): ...


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

    # ---------------------------------------------------------------------------------- submit
    def submit(self, jobs: list[JobConfig], pipeline_id: str | None = None) -> list[JobRecord]:
        """Record a pipeline's jobs as PENDING (dependencies named by job name inside it)."""
        pipeline_id = pipeline_id or new_pipeline_id()
        ids = {j.name: f"{pipeline_id}-{j.name}" for j in jobs}
        now = time.time()
        records = [
            JobRecord(id=ids[j.name], pipeline_id=pipeline_id, name=j.name, kind=j.kind, state=JobState.PENDING,
                      priority=j.priority, depends_on=[ids[d] for d in j.depends_on], config=to_dict(j), created_at=now)
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
            self.handles[d.job_id] = self.launcher.start(record, init_from)
        for job_id, handle in list(self.handles.items()):
            self._observe(self.store.get(job_id), self.launcher.poll(handle))
        return any(not self.store.get(i).state.terminal for i in job_ids)

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
        restarts = max(0, p.attempts - 1)
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
        elif record.state is JobState.RESTARTING and p.status == "running" and p.ready_attempt == p.attempts:
            self.store.transition(record.id, JobState.RUNNING, "worker group restarted" + resumed)
            self.say(f"{record.id}: RUNNING again{resumed}")
        if p.status == "succeeded":
            self.store.transition(record.id, JobState.SUCCEEDED, "training finished", export=p.export, restarts=restarts)
            self.say(f"{record.id}: SUCCEEDED")
            self.handles.pop(record.id, None)
        elif p.status == "failed":
            self.store.transition(record.id, JobState.FAILED, p.reason or "failed", failure_reason=p.reason,
                                  failure_detail=p.traceback, restarts=restarts)
            self.say(f"{record.id}: FAILED: {p.reason}")
            self.handles.pop(record.id, None)

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
