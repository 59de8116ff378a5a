"""Preemption that costs the least training: which running jobs to stop so that a waiting one fits.

A pure function of the job records, the queues' config and `now`. A waiting job (the admission
pass's blocker, within its queue's quota) may preempt running jobs of lower priority, or, when its
queue is below its nominal quota, jobs of equal or lower priority of queues that borrow beyond
theirs. Among those, victims are taken by the fewest steps since their last committed checkpoint
(what stopping them loses: they are asked to commit first, but one that misses the deadline loses
these), ties by lower priority, then the newest; never one that has run less than
`queues.min_runtime_s`, never one the preemptor depends on. Victims are added until the preemptor
fits, then any victim the others already make room without is given back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from orchestrator.checkpoint.layout import step_of
from orchestrator.config.schema import QueuesConfig
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.resources import fits, free_capacity, held, job_demand
from orchestrator.jobs.sharing import charge, queue_in_use, quota_check, within_nominal
from orchestrator.jobs.state import JobState


@dataclass(frozen=True)
class Preemption:
    preemptor: str
    victims: tuple[str, ...]
    lost_steps: int  # the victims' steps since their last commit (lost only if they miss the deadline)
    reason: str


def steps_since_commit(job: JobRecord) -> int:
    """Steps the job has trained since its last committed checkpoint."""
    step = int(job.metrics.get("step") or 0)
    committed = step_of(job.checkpoint) if job.checkpoint else 0
    return max(step - committed, 0)


def least_loss(job: JobRecord) -> tuple:
    """The victim order of the issue: fewest steps since a commit, then lower priority, then newest."""
    return steps_since_commit(job), job.priority, -(job.started_at() or 0.0), -job.seq


def newest_first(job: JobRecord) -> tuple:
    """The usual order elsewhere (the comparison in bench/scale_sim.py): the newest job first."""
    return -(job.started_at() or 0.0), -job.seq


def dependencies(job: JobRecord, jobs: list[JobRecord]) -> set[str]:
    """Every job `job` depends on, directly or through others."""
    by_id = {j.id: j for j in jobs}
    found: set[str] = set()
    todo = list(job.depends_on)
    while todo:
        d = todo.pop()
        if d not in found:
            found.add(d)
            todo += by_id[d].depends_on if d in by_id else []
    return found


def candidates(preemptor: JobRecord, jobs: list[JobRecord], queues: QueuesConfig, now: float) -> list[JobRecord]:
    """The running jobs `preemptor` may stop (see the module docstring)."""
    in_use = queue_in_use(jobs)
    spec = queues.teams.get(preemptor.queue)
    if spec is None or quota_check(preemptor.queue, spec, in_use.get(preemptor.queue, {}),
                                   charge(preemptor)).verdict != "within":
        return []  # only a job within its queue's quota preempts
    own = dependencies(preemptor, jobs)
    out = []
    for j in jobs:
        started = j.started_at()
        if j.state is not JobState.RUNNING or j.id in own or started is None or now - started < queues.min_runtime_s:
            continue
        other = queues.teams.get(j.queue)
        borrowing = other is not None and not within_nominal(other, in_use.get(j.queue, {}))
        if j.priority < preemptor.priority or (borrowing and j.queue != preemptor.queue
                                               and j.priority <= preemptor.priority):
            out.append(j)
    return out


def choose_victims(preemptor: JobRecord, jobs: list[JobRecord], capacity: dict[str, float], queues: QueuesConfig,
                   now: float, order: Callable[[JobRecord], tuple] = least_loss) -> Preemption | None:
    """The running jobs to stop so that `preemptor` fits, by `order`; None if it fits already or
    no allowed set of victims makes room."""
    need = job_demand(preemptor)
    room = free_capacity(jobs, capacity)
    if fits(need, room):
        return None
    chosen: list[JobRecord] = []
    for victim in sorted(candidates(preemptor, jobs, queues, now), key=order):
        chosen.append(victim)
        room = _plus(room, held(victim))
        if fits(need, room):
            break
    else:
        return None
    for victim in sorted(chosen, key=order, reverse=True):  # give back those the others make room without
        without = _plus(room, held(victim), -1.0)
        if fits(need, without):
            chosen.remove(victim)
            room = without
    chosen.sort(key=order)
    lost = sum(steps_since_commit(v) for v in chosen)
    names = ", ".join(f"{v.id} ({steps_since_commit(v)} steps since its last commit)" for v in chosen)
    return Preemption(preemptor.id, tuple(v.id for v in chosen), lost,
                      f"preempted for {preemptor.id} (priority {preemptor.priority}, queue {preemptor.queue}): {names}")


def _plus(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + sign * v
    return out
