"""Sharing one cluster between queues (teams): quotas with borrowing, fair share by decayed usage,
backfill without delay, and why each waiting job waits. Pure functions of the job records, the
queues' config, the usage ledger and `now`: the controller and bench/scale_sim.py call the same.

One admission pass (`admit`) takes the QUEUED jobs in this order:

    highest priority first; then a job within its queue's quota before one that would borrow; then
    the queue furthest below its share first:
        ratio(q) = (U_q + A_q * h) / weight_q        (lowest first; ties: FIFO, the lowest seq)
    U_q: the queue's decayed usage in worker-seconds (`advance_usage`: a worker-second used t
         seconds ago counts 2^(-t/h), h = queues.half_life_s, Slurm's decay);
    A_q: the workers its jobs hold now, admitted ones of this pass included (so one pass does not
         hand every free worker to one queue); weight_q: its weight.

Each queue is a FIFO of its own (its head first). For the job taken:

    over its quota + borrowing limit (any resource)  -> waits; its queue's later jobs wait behind it
    beyond its quota, within its borrowing limit    -> starts only in idle room (fits what is free);
                                                       else waits, blocking nobody
    within its quota                                 -> starts if all its workers fit; else it is the
                                                       blocker: later jobs start only by backfill

Backfill without delay: behind a blocker, a job starts only if it fits now and will end (its steps
left x its measured, else configured, step time) before the blocker could start anyway (the
"shadow" time: when the expected ends of running jobs free enough room for it). A job whose end
is unknown never overtakes. With the one unlimited queue of conf/queues/default.yaml this is the
cluster's old order: priority, then FIFO, no overtaking.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from orchestrator.config.schema import RESOURCES, QueuesConfig, QueueSpec
from orchestrator.config.typed import to_dict
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.resources import Decision, fits, free_capacity, held, job_demand
from orchestrator.jobs.state import JobState

EPS = 1e-9
DEFAULT_QUEUE = "default"
UNLIMITED = QueuesConfig(teams={DEFAULT_QUEUE: QueueSpec()})  # one queue, no quota: the single-user cluster


# ------------------------------------------------------------------------------------- usage
@dataclass(frozen=True)
class Usage:
    """Each queue's decayed usage in worker-seconds, as of `at` (None: never advanced)."""

    at: float | None = None
    by_queue: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"at": self.at, "by_queue": dict(self.by_queue)}

    @classmethod
    def from_json(cls, d: dict | None) -> Usage:
        return cls(**d) if d else cls()


def advance_usage(usage: Usage, held_workers: dict[str, float], now: float, half_life_s: float) -> Usage:
    """`usage` advanced to `now`: what was there decays by 2^(-dt/h), and each queue's held workers
    add their worker-seconds of the interval, each decayed by its age (w * h/ln2 * (1 - 2^(-dt/h)))."""
    if usage.at is None:
        return Usage(now, dict(usage.by_queue))
    dt = max(now - usage.at, 0.0)
    keep = 2.0 ** (-dt / half_life_s)
    out = {q: u * keep for q, u in usage.by_queue.items()}
    for q, w in held_workers.items():
        out[q] = out.get(q, 0.0) + w * half_life_s / math.log(2) * (1.0 - keep)
    return Usage(now, out)


def charge(job: JobRecord) -> dict[str, float]:
    """What a job counts against its queue's quota: workers (an elastic one at its maximum) and
    what they hold."""
    return {"workers": float(job.config.get("max_workers") or job.workers), **held(job)}


def queue_in_use(jobs: list[JobRecord]) -> dict[str, dict[str, float]]:
    """Per queue, what its active jobs hold."""
    out: dict[str, dict[str, float]] = {}
    for j in jobs:
        if j.state.active:
            use = out.setdefault(j.queue, {})
            for k, v in charge(j).items():
                use[k] = use.get(k, 0.0) + v
    return out


def share_ratio(usage: float, held_workers: float, weight: float, half_life_s: float) -> float:
    """How far a queue is above (high) or below (low) its share: the module docstring's ratio."""
    return (usage + held_workers * half_life_s) / weight


# ------------------------------------------------------------------------------------- quota
@dataclass(frozen=True)
class QuotaCheck:
    verdict: str  # "within" its quota, "borrow" beyond it within its limit, "over" its limit
    why: str = ""  # for "over": the line `orch queue` shows


def quota_check(queue: str, spec: QueueSpec, in_use: dict[str, float], need: dict[str, float]) -> QuotaCheck:
    """Whether `need` fits `queue`'s quota beside `in_use` (what its active jobs hold)."""
    verdict = "within"
    for r in RESOURCES:
        nominal = spec.quota.get(r)
        if nominal is None or not need.get(r):
            continue
        used, after = in_use.get(r, 0.0), in_use.get(r, 0.0) + need[r]
        if after <= nominal + EPS:
            continue
        limit = spec.borrow.get(r)
        if limit is not None and after > nominal + limit + EPS:
            unit = "workers" if r == "workers" else r
            if used >= nominal - EPS and limit == 0:
                why = f"{queue} at its quota {used:g}/{nominal:g} {unit} and nothing to borrow"
            else:
                why = (f"{queue} at {used:g}/{nominal:g} {unit} of its quota, needs {need[r]:g} more"
                       + (" and nothing to borrow" if limit == 0 else f", beyond its borrowing limit of {limit:g}"))
            return QuotaCheck("over", why)
        verdict = "borrow"
    return QuotaCheck(verdict)


def never_fits_queue(job: JobRecord, spec: QueueSpec) -> str | None:
    """Why `job` can never run in its queue (more than its quota and borrowing limit), or None."""
    for r, need in charge(job).items():
        nominal, limit = spec.quota.get(r), spec.borrow.get(r)
        if nominal is not None and limit is not None and need > nominal + limit + EPS:
            unit = "workers" if r == "workers" else r
            return (f"job {job.name} needs {need:g} {unit} but queue {job.queue} may hold at most {nominal + limit:g} "
                    f"(quota {nominal:g} + borrowing {limit:g}); lower its workers, or submit to another --queue")
    return None


def within_nominal(spec: QueueSpec, in_use: dict[str, float]) -> bool:
    """Whether a queue holds no more than its nominal quota of every resource."""
    return all(spec.quota.get(r) is None or in_use.get(r, 0.0) <= spec.quota.get(r) + EPS for r in RESOURCES)


# ------------------------------------------------------------------------------------- time
def expected_run_s(job: JobRecord) -> float | None:
    """Seconds the job still needs: its steps left x its measured step time, else its configured
    `step_time_s`; None when neither is known."""
    step_time = job.metrics.get("step_time_s") or job.config.get("step_time_s")
    max_steps = (job.config.get("trainer") or {}).get("max_steps")
    if not step_time or max_steps is None:
        return None
    return max(int(max_steps) - int(job.metrics.get("step") or 0), 0) * float(step_time)


def shadow_time(blocker: JobRecord, running: list[JobRecord], free: dict[str, float], now: float) -> float | None:
    """When `blocker` could start at the earliest: the expected end of the running job whose room,
    with the room of those ending before it, makes the blocker fit; None if unknown or never."""
    need = job_demand(blocker)
    room = dict(free)
    ends = [(now + run, j) for j in running if (run := expected_run_s(j)) is not None]  # (unknown: never)
    for end, j in sorted(ends, key=lambda e: e[0]):
        for k, v in held(j).items():
            room[k] = room.get(k, 0.0) + v
        if fits(need, room):
            return end
    return None


def n_workers(n: float) -> str:
    return f"{n:g} worker" + ("" if n == 1 else "s")


def free_workers(job: JobRecord, free: dict[str, float]) -> int:
    """How many of the job's workers fit in `free`."""
    per = job_demand(job, 1)
    return max(0, min(int((free.get(k, 0.0) + EPS) // v) for k, v in per.items() if v > 0))


# ------------------------------------------------------------------------------------- admission
@dataclass(frozen=True)
class Admission:
    decisions: list[Decision]  # the jobs that start now
    waits: dict[str, str]  # every other QUEUED job: why it waits
    blocker: str | None = None  # the job within its quota that waits for room (what preemption would serve)


class _Pass:
    """The state of one admission pass: what is free, what each queue holds, who blocks."""

    def __init__(self, jobs: list[JobRecord], capacity: dict[str, float], queues: QueuesConfig, usage: Usage,
                 now: float):
        self.queues, self.usage, self.now = queues, usage, now
        self.free = free_capacity(jobs, capacity)
        self.in_use = queue_in_use(jobs)
        self.running = [j for j in jobs if j.state.active]
        self.placing = any(j.state in (JobState.STARTING, JobState.RESTARTING) for j in jobs)
        self.out: list[Decision] = []
        self.waits: dict[str, str] = {}
        self.blocker: JobRecord | None = None
        self.shadow: float | None = None
        self.lines: dict[str, deque[JobRecord]] = {}  # each queue's waiting jobs, its head first
        for j in sorted((j for j in jobs if j.state.waiting), key=lambda j: (-j.priority, j.seq)):
            if j.queue in queues.teams:
                self.lines.setdefault(j.queue, deque()).append(j)
            else:
                self.waits[j.id] = (f"its queue {j.queue!r} is not configured (queues: {', '.join(queues.teams)}); "
                                    f"`orch queue set` defines it")

    def ratio(self, queue: str) -> float:
        return share_ratio(self.usage.by_queue.get(queue, 0.0), self.in_use.get(queue, {}).get("workers", 0.0),
                           self.queues.teams[queue].weight, self.queues.half_life_s)

    def borrows(self, job: JobRecord) -> bool:
        spec = self.queues.teams[job.queue]
        return quota_check(job.queue, spec, self.in_use.get(job.queue, {}), charge(job)).verdict != "within"

    def next_job(self) -> JobRecord | None:
        """The head to consider next: highest priority, then one within its queue's quota before one
        that would borrow (so a preempted borrower does not take back the room it gave), then the
        queue furthest below its share, then FIFO."""
        heads = [line[0] for line in self.lines.values() if line]
        if not heads:
            return None
        job = min(heads, key=lambda j: (-j.priority, self.borrows(j), self.ratio(j.queue), j.seq))
        self.lines[job.queue].popleft()
        return job

    def close(self, queue: str, head: JobRecord) -> None:
        """The queue's later jobs wait behind its head (FIFO within a queue)."""
        for j in self.lines.pop(queue, ()):
            self.waits[j.id] = f"behind {head.id} in queue {queue}"

    def start(self, job: JobRecord, reason: str) -> None:
        for k, v in held(job).items():
            self.free[k] = self.free.get(k, 0.0) - v
        use = self.in_use.setdefault(job.queue, {})
        for k, v in charge(job).items():
            use[k] = use.get(k, 0.0) + v
        self.running.append(job)
        self.out.append(Decision(job.id, JobState.STARTING, reason))

    def block(self, job: JobRecord, backfill: bool = True) -> None:
        self.blocker = job
        self.shadow = shadow_time(job, self.running, self.free, self.now) if backfill else None
        when = f"; room expected in {self.shadow - self.now:.0f} s" if self.shadow is not None else ""
        self.waits[job.id] = f"needs {n_workers(job.workers)}, {free_workers(job, self.free)} free{when}"


def admit(jobs: list[JobRecord], capacity: dict[str, float], queues: QueuesConfig = UNLIMITED,
          usage: Usage = Usage(), now: float = 0.0, autoscaling: bool = False, explain: bool = True) -> Admission:
    """Which QUEUED jobs start now, and why each other one waits (see the module docstring).
    `explain=False` (the controller's loop): once nothing more can start (a blocker and no backfill
    possible), the jobs after it are not visited, and `waits` names only those seen."""
    p = _Pass(jobs, capacity, queues, usage, now)
    idle = not p.running
    while (job := p.next_job()) is not None:
        if not explain and p.blocker is not None and p.shadow is None:
            break
        quota = quota_check(job.queue, queues.teams[job.queue], p.in_use.get(job.queue, {}), charge(job))
        if quota.verdict == "over":
            p.waits[job.id] = quota.why
            p.close(job.queue, job)
        elif p.blocker is not None:
            _backfill(p, job, quota)
        elif fits(job_demand(job), p.free) and not _elastic_waits(p, job):
            p.start(job, "admitted: all workers fit" + (" (borrowing idle room)" if quota.verdict == "borrow" else ""))
        elif quota.verdict == "borrow":
            p.waits[job.id] = (f"{job.queue} would borrow beyond its quota and there is no idle room: needs "
                               f"{n_workers(job.workers)}, {free_workers(job, p.free)} free")
            p.close(job.queue, job)
        elif autoscaling and idle and not p.out:
            p.start(job, "admitted: the autoscaler adds the nodes it needs")
            p.block(job, backfill=False)
            p.waits.pop(job.id)
        else:
            p.block(job, backfill=not job.config.get("max_workers"))
    return Admission(p.out, p.waits, p.blocker.id if p.blocker and p.blocker.id in p.waits else None)


def _elastic_waits(p: _Pass, job: JobRecord) -> bool:
    """An elastic job takes all the room it finds up to its maximum: it starts only once the gangs
    admitted before it hold their workers, so it cannot take theirs."""
    return bool(job.config.get("max_workers")) and not fits(held(job), p.free) and (p.placing or bool(p.out))


def _backfill(p: _Pass, job: JobRecord, quota: QuotaCheck) -> None:
    """Behind the blocker, `job` starts only if it fits now and ends before the blocker could start."""
    b = p.blocker
    behind = f"behind {b.id} (priority {b.priority}), needs {n_workers(job.workers)}, {free_workers(job, p.free)} free"
    if not fits(job_demand(job), p.free) or job.config.get("max_workers"):
        p.waits[job.id] = behind
        return
    run = expected_run_s(job)
    if run is None:
        p.waits[job.id] = behind + ": its end is unknown (no step time yet), so it may not overtake"
    elif p.shadow is None or p.now + run > p.shadow + EPS:
        p.waits[job.id] = behind + f": it would run {run:.0f} s, past the time {b.id} can start"
    else:
        p.start(job, f"backfilled: ends in {run:.0f} s, before {b.id} can start (in {p.shadow - p.now:.0f} s)"
                + (" (borrowing idle room)" if quota.verdict == "borrow" else ""))


# ------------------------------------------------------------------------------------- report
def queue_report(jobs: list[JobRecord], capacity: dict[str, float], queues: QueuesConfig, usage: Usage,
                 now: float) -> dict:
    """What `orch queue` shows: per queue its quota, borrowing limit, weight, what it holds and
    borrows, its decayed usage, its share of usage against its entitled share; per waiting job why
    it waits (what the next admission pass would decide)."""
    result = admit(jobs, capacity, queues, usage, now)
    in_use = queue_in_use(jobs)
    h = queues.half_life_s
    load = {q: usage.by_queue.get(q, 0.0) + in_use.get(q, {}).get("workers", 0.0) * h for q in queues.teams}
    total, weights = sum(load.values()), sum(s.weight for s in queues.teams.values())
    rows = []
    for q, spec in queues.teams.items():
        use = in_use.get(q, {})
        borrowed = {r: use.get(r, 0.0) - spec.quota.get(r) for r in RESOURCES
                    if spec.quota.get(r) is not None and use.get(r, 0.0) > spec.quota.get(r) + EPS}
        rows.append({"queue": q, "quota": to_dict(spec.quota), "borrow_limit": to_dict(spec.borrow),
                     "weight": spec.weight, "in_use": use, "borrowed": borrowed,
                     "usage_worker_s": usage.by_queue.get(q, 0.0), "share": load[q] / total if total else 0.0,
                     "entitled": spec.weight / weights, "waiting": sum(1 for j in jobs if j.queue == q
                                                                       and (j.state.waiting or j.state is
                                                                            JobState.PENDING))})
    why = dict(result.waits)
    for d in result.decisions:
        why[d.job_id] = f"starts at the next decision ({d.reason})"
    by_id = {j.id: j for j in jobs}
    for j in jobs:
        if j.state is JobState.PENDING:
            dep = next((d for d in j.depends_on if d not in by_id or by_id[d].state is not JobState.SUCCEEDED), None)
            why[j.id] = f"waits for its dependency {dep}" if dep else "its dependencies succeeded"
    waiting = sorted((j for j in jobs if j.id in why), key=lambda j: (-j.priority, j.seq))
    return {"at": now, "half_life_s": h, "queues": rows,
            "jobs": [{"id": j.id, "queue": j.queue, "user": j.user, "priority": j.priority, "workers": j.workers,
                      "state": j.state.value, "why": why[j.id]} for j in waiting]}

