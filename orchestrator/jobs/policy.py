"""Scheduling policy: pure functions from job records (and free resources) to decisions.

Policies decide, the controller acts. Nothing here touches Ray, files or the clock, so every rule
is tested on plain records.
"""

from __future__ import annotations

from orchestrator.jobs.events import Action
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.resources import Decision, fits, free_capacity, held, job_demand  # noqa: F401 (also for callers)
from orchestrator.jobs.state import JobState

_FAILED_DEPS = (JobState.FAILED, JobState.CANCELLED, JobState.BLOCKED)


def dependency_decisions(jobs: list[JobRecord]) -> list[Decision]:
    """PENDING jobs whose dependencies all SUCCEEDED become QUEUED; any failed, cancelled or
    blocked dependency makes them BLOCKED (they never run). A checkpoint trigger waits for none of
    that: the controller's trigger driver decides it (it is only BLOCKED here when its dependency
    does not exist)."""
    by_id = {j.id: j for j in jobs}
    out = []
    for job in jobs:
        if job.state is not JobState.PENDING:
            continue
        deps = [by_id[d] for d in job.depends_on if d in by_id]
        missing = [d for d in job.depends_on if d not in by_id]
        bad = [d for d in deps if d.state in _FAILED_DEPS]
        if job.config.get("trigger") and not missing:
            continue  # started by its dependency's checkpoints, ended after it (orchestrator.jobs.triggers)
        if missing:
            out.append(Decision(job.id, JobState.BLOCKED, f"dependency {missing[0]} does not exist"))
        elif bad:
            out.append(Decision(job.id, JobState.BLOCKED, f"dependency {bad[0].id} is {bad[0].state.value}"))
        elif all(d.state is JobState.SUCCEEDED for d in deps):
            why = "dependencies succeeded" if deps else "no dependencies"
            out.append(Decision(job.id, JobState.QUEUED, why))
    return out


def admission_decisions(jobs: list[JobRecord], capacity: dict[str, float], autoscaling: bool = False) -> list[Decision]:
    """Which QUEUED jobs start now on a cluster of one unlimited queue: highest priority first, FIFO
    among equals, each only if all of its workers fit in what the active jobs leave free; a job that
    does not fit is not overtaken (but by backfill that cannot delay it). On an autoscaling cluster
    the job at the head of the queue is admitted when nothing else runs, fitting or not: its
    placement group asks the autoscaler for the nodes. `orchestrator.jobs.sharing.admit` decides."""
    from orchestrator.jobs.sharing import admit  # (it builds on this module's resource arithmetic)

    return admit(jobs, capacity, autoscaling=autoscaling, explain=False).decisions


def never_fits(job: JobRecord, capacity: dict[str, float]) -> str | None:
    """Why a job can never run on a cluster of `capacity`, or None."""
    demand = job_demand(job)
    for k, v in demand.items():
        if capacity.get(k, 0.0) + 1e-9 < v:
            return (f"job {job.name} needs {v:g} {k} ({job.workers} workers) but the cluster has "
                    f"{capacity.get(k, 0.0):g}; lower pipeline.jobs.{job.name}.workers or add nodes")
    return None


def restart_decision(job: JobRecord, why: str, failure: bool = True) -> Decision:
    """A job whose worker group is gone: CANCELLED if a cancel was pending, FAILED once its
    `max_failures` restarts are spent (a lost controller is no failure of the job), else
    RESTARTING from its last committed checkpoint."""
    if (job.requested or {}).get("action") == Action.CANCEL:
        return Decision(job.id, JobState.CANCELLED, "cancelled (its worker group was already gone)")
    limit = int(job.config["max_failures"])
    if failure and job.restarts >= limit:
        return Decision(job.id, JobState.FAILED, f"{why}; max_failures={limit} reached")
    return Decision(job.id, JobState.RESTARTING, f"{why}; restarting from the last checkpoint")


def scale_refusal(job: JobRecord, workers: int, jobs: list[JobRecord], capacity: dict[str, float]) -> str | None:
    """Why `job` cannot be restarted at `workers` workers now, or None. The global batch must
    split evenly over the new workers, and the new gang must fit beside the other active jobs."""
    if job.state is not JobState.RUNNING:
        return f"job {job.id} is {job.state.value}; only a RUNNING job can be scaled"
    if job.requested:  # (a preemption or cancel in progress: its request would be overwritten)
        return f"job {job.id} has a {job.requested.get('action')} in progress; scale it once that has taken effect"
    if job.config.get("max_workers"):
        return (f"job {job.id} is elastic ({job.workers}-{job.config['max_workers']} workers): Ray Train sizes it to "
                f"the room it finds; submit it with fixed workers to scale it by hand")
    if workers < 1:
        return f"--workers must be at least 1, got {workers}"
    if workers == job.workers:
        return f"job {job.id} already runs on {workers} workers"
    batch, micro = job.config["trainer"]["global_batch_size"], job.config["trainer"]["micro_batch_size"]
    if batch % (micro * workers):
        splits = [str(n) for n in range(1, batch // micro + 1) if batch % (micro * n) == 0]
        choose = splits[0] if len(splits) == 1 else f"{', '.join(splits[:-1])} or {splits[-1]}"
        return (f"the global batch of {job.id} ({batch}) does not split over {workers} workers x micro batch "
                f"{micro}; choose --workers {choose}")
    if job.config["cluster"].get("autoscaling"):
        return None
    free = free_capacity(jobs, capacity, exclude=job.id)
    per = {k: v / job.workers for k, v in job_demand(job).items()}
    demand = {k: v * workers for k, v in per.items()}
    if not fits(demand, free):
        need = ", ".join(f"{v:g} {k}" for k, v in demand.items())
        have = ", ".join(f"{max(free.get(k, 0.0), 0):g} {k}" for k in demand)
        return (f"{workers} workers of {job.id} need {need}; the cluster has {have} for it; "
                f"choose fewer workers or add nodes")
    return None
