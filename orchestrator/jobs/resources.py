"""What a job needs and holds, and what is left free: the resource arithmetic every scheduling
policy shares (orchestrator.jobs.policy, .sharing, .preemption), and the decision they return."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState


@dataclass(frozen=True)
class Decision:
    job_id: str
    state: JobState
    reason: str


def job_demand(job: JobRecord, workers: int | None = None) -> dict[str, float]:
    """All the resources a job's workers need at once (gang)."""
    cluster = job.config["cluster"]
    per = {"CPU": float(cluster["cpus_per_worker"])}
    if cluster.get("gpus_per_worker"):
        per["GPU"] = float(cluster["gpus_per_worker"])
    return {k: v * (workers or job.workers) for k, v in per.items()}


def held(job: JobRecord) -> dict[str, float]:
    """What an active job is charged: its gang; an elastic job its maximum, which Ray Train may
    grow it to whenever there is room (so it never takes what another admitted job waits for)."""
    return job_demand(job, job.config.get("max_workers") or job.workers)


def free_capacity(jobs: list[JobRecord], capacity: dict[str, float], exclude: str | None = None) -> dict[str, float]:
    """What the active jobs (but `exclude`) leave free of `capacity`."""
    free = dict(capacity)
    for job in jobs:
        if job.state.active and job.id != exclude:
            for k, v in held(job).items():
                free[k] = free.get(k, 0.0) - v
    return free


def fits(demand: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in demand.items())
