"""Retrying jobs and continuing an interrupted `orch run`: pure functions of the job records.

`orch retry JOB` puts a FAILED or CANCELLED job back to PENDING (the state machine's one way out of
a terminal state) together with the dependents it had BLOCKED; a job launched again continues from
the newest committed checkpoint of its run. `orch run --resume` does that for every unfinished job
of the newest earlier `orch run` pipeline in the state folder whose resolved job configs are the
ones composed now. Nothing here touches Ray, files or the clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

# The reason `orch run` records for the jobs it leaves unfinished (Ctrl-C, SIGTERM): an interrupted
# pipeline, which running `orch run` again offers to continue.
ABANDONED = "orch run was interrupted before the job finished"
# The reason for the jobs of a pipeline whose `orch run` vanished without recording it (a reboot, SIGKILL).
ORPHANED = "the orch run that drove the job ended without recording it (a reboot, or SIGKILL)"


def retry_refusal(job: JobRecord) -> str | None:
    """Why `job` cannot be retried, or None: only a job that ended FAILED or CANCELLED can."""
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        return None
    if job.state is JobState.BLOCKED:
        return (f"job {job.id} is BLOCKED: it never ran because a dependency ({', '.join(job.depends_on)}) did not "
                f"succeed; retry that one with `orch retry`, and its blocked dependents are queued again with it")
    if job.state is JobState.SUCCEEDED:
        return (f"job {job.id} is SUCCEEDED: a finished job is not run again; submit a new pipeline "
                f"(`orch submit`) to train again")
    return f"job {job.id} is {job.state.value}: it has not ended; only a FAILED or CANCELLED job can be retried"


def blocked_dependents(job_id: str, jobs: list[JobRecord]) -> list[str]:
    """The BLOCKED jobs that depend on `job_id`, directly or through other BLOCKED jobs, in
    submission order: retrying `job_id` queues them again (each waits for its dependencies as before)."""
    blocked = [j for j in sorted(jobs, key=lambda j: j.seq) if j.state is JobState.BLOCKED]
    found: list[str] = []
    frontier = {job_id}
    while frontier:
        new = [j.id for j in blocked if j.id not in found and frontier.intersection(j.depends_on)]
        found += new
        frontier = set(new)
    return [j.id for j in blocked if j.id in found]


def interrupted(job: JobRecord, driven: bool) -> bool:
    """Whether `orch run` left `job` unfinished: it recorded so (Ctrl-C), or no live `orch run`
    drives a job still recorded as not ended (the process vanished: a reboot, SIGKILL)."""
    if job.state.terminal:
        return job.state is JobState.CANCELLED and job.failure_reason in (ABANDONED, ORPHANED)
    return not driven


def config_difference(then: object, now: object, key: str = "") -> str | None:
    """The first setting that differs between two resolved configs, as `key: THEN then, NOW now`; None if equal."""
    if isinstance(then, dict) and isinstance(now, dict):
        for k in sorted(set(then) | set(now), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in then or k not in now:
                return f"{sub}: {'unset' if k not in then else json.dumps(then[k])} then, " \
                       f"{'unset' if k not in now else json.dumps(now[k])} now"
            diff = config_difference(then[k], now[k], sub)
            if diff:
                return diff
        return None
    if then != now:
        return f"{key}: {json.dumps(then)} then, {json.dumps(now)} now"
    return None


@dataclass(frozen=True)
class Resumable:
    """An earlier `orch run` pipeline with the configuration composed now that has not finished."""

    pipeline_id: str
    jobs: tuple[JobRecord, ...]  # every job of it, in submission order
    interrupted: bool  # left unfinished by an interruption (else it failed or was cancelled)

    def describe(self) -> str:
        """Where each job stands: `pretrain continues from step 20, finetune from the start, ...`."""
        parts = []
        for j in self.jobs:
            if j.state is JobState.SUCCEEDED:
                parts.append(f"{j.name} finished")
            elif j.checkpoint:
                parts.append(f"{j.name} continues from {j.checkpoint.rstrip('/').rsplit('/', 1)[-1]}")
            else:
                parts.append(f"{j.name} from the start")
        return ", ".join(parts)


def find_resumable(records: list[JobRecord], jobs: dict[str, dict],
                   drivers: dict[str, bool]) -> tuple[Resumable | None, str]:
    """The newest pipeline of `drivers` (the `orch run` pipelines of the state folder: whether a live
    process drives each now) whose jobs are `jobs` (name -> resolved config, as JSON) and which did
    not finish; else None and why not (a line for `--resume`)."""
    by_pipeline: dict[str, list[JobRecord]] = {}
    for r in sorted(records, key=lambda r: r.seq):
        if r.pipeline_id in drivers:
            by_pipeline.setdefault(r.pipeline_id, []).append(r)
    newest_first = sorted(by_pipeline.items(), key=lambda kv: -kv[1][-1].seq)
    nearest: str | None = None
    for pid, recs in newest_first:
        if {r.name for r in recs} != set(jobs):
            continue
        diff = next((d for r in recs if (d := config_difference(r.config, jobs[r.name])) is not None), None)
        if diff is not None:
            if nearest is None and not all(r.state is JobState.SUCCEEDED for r in recs):
                nearest = f"the unfinished pipeline {pid} was run with other settings ({diff})"
            continue
        if all(r.state is JobState.SUCCEEDED for r in recs):
            return None, f"pipeline {pid}, the last one run with this configuration, finished"
        if drivers[pid] and any(not r.state.terminal for r in recs):
            return None, f"pipeline {pid} is being run by another `orch run` right now"
        return Resumable(pid, tuple(recs), any(interrupted(r, drivers[pid]) for r in recs)), ""
    return None, nearest or "no earlier `orch run` in this state folder has this configuration"
