"""Sharing a cluster by simulation: several queues with quotas and bursts on 1,000 nodes x 8 GPUs,
10,000 jobs, driven by the controller's own pure policies (`orch.jobs.sharing.admit`,
`orch.jobs.preemption.choose_victims`, `advance_usage`, `dependency_decisions`, the lifecycle fold
`apply_events` and `check_transition`). Run through bench/scale_sim.py:

    PYTHONPATH=. .venv/bin/python bench/scale_sim.py --part sharing

Four queues (teams) of weights 4:3:2:1 with nominal quotas in that ratio summing to the cluster's
8,000 GPUs, each allowed to borrow half its quota again from idle room. Jobs arrive in bursts (each
team sends its jobs in a few waves of minutes each, at different hours), 1-256 workers of one GPU,
priorities 0/1/5/10. Each job trains `max_steps` steps of its own step time and commits a
checkpoint every 200 steps; a preempted job is asked to commit first, and misses the deadline with
probability 10% (a hung worker): then it loses the steps since its last commit. It runs the same
workload twice: victims by the least lost work, and by the newest job first.

Printed: each queue's share of the worker-seconds used while every queue had work waiting against
its entitlement (weight share), and Jain's fairness index over (share / entitlement); preemptions and
steps at risk / lost with each victim rule; the most each queue held against its quota + borrowing
limit (checked every tick: never more); p50/p99 wait from arrival to start per priority; decisions
per second of policy time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from orchestrator.config.schema import QueuesConfig, QueueSpec, Resources
from orchestrator.jobs.events import AttemptReason, EventKind, RunnerEvent
from orchestrator.jobs.lifecycle import apply_events, preview
from orchestrator.jobs.policy import dependency_decisions, never_fits
from orchestrator.jobs.preemption import choose_victims, least_loss, newest_first, steps_since_commit
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.sharing import Usage, admit, advance_usage, charge, never_fits_queue, queue_in_use
from orchestrator.jobs.state import JobState, check_transition

S = JobState
TEAMS = {"team-a": 4, "team-b": 3, "team-c": 2, "team-d": 1}  # queue -> weight (and quota ratio)
COMMIT_EVERY = 200  # steps between periodic checkpoints
MISS_DEADLINE = 0.10  # probability that a victim does not commit before its deadline
COMMIT_S, STARTUP_S = 30.0, 60.0  # a requested commit; a worker group's start


def sharing_queues(gpus: int) -> QueuesConfig:
    total = sum(TEAMS.values())
    return QueuesConfig(
        teams={q: QueueSpec(quota=Resources(workers=gpus * w / total), borrow=Resources(workers=gpus * w / total / 2),
                            weight=float(w)) for q, w in TEAMS.items()},
        half_life_s=4 * 3600.0, min_runtime_s=600.0, preempt_deadline_s=300.0)


def make_sharing_jobs(n: int, seed: int) -> list[JobRecord]:
    """`n` jobs in bursts: each team sends its share of the jobs in 3 waves of 20 minutes at random hours."""
    rng = random.Random(seed)
    sizes, weights = (1, 2, 4, 8, 16, 32, 64, 128, 256), (20, 15, 15, 15, 12, 10, 7, 4, 2)
    waves = {q: sorted(rng.uniform(0, 24 * 3600) for _ in range(3)) for q in TEAMS}
    jobs = []
    for i in range(n):
        team = rng.choices(list(TEAMS), [1, 1, 1, 1])[0]  # equal demand: the weights must do the sharing
        step_s = rng.uniform(0.5, 3.0)
        run_s = min(rng.lognormvariate(math.log(2400), 0.9), 12 * 3600)
        config = {"workers": rng.choices(sizes, weights)[0], "max_workers": None, "max_failures": 0,
                  "cluster": {"cpus_per_worker": 8, "gpus_per_worker": 1},
                  "trainer": {"max_steps": max(1, int(run_s / step_s))},
                  "step_time_s": step_s * rng.uniform(0.8, 1.25),  # configured: an estimate
                  "sim": {"arrive_s": rng.choice(waves[team]) + rng.uniform(0, 1200), "step_s": step_s}}
        jobs.append(JobRecord(id=f"j{i:05d}", pipeline_id=f"p{i}", name="pretrain", kind="pretrain", state=S.PENDING,
                              priority=rng.choices([0, 1, 5, 10], [75, 15, 8, 2])[0], depends_on=[], config=config,
                              created_at=0.0, queue=team, seq=i))
    jobs.sort(key=lambda j: j.config["sim"]["arrive_s"])
    return [dataclasses.replace(j, seq=k) for k, j in enumerate(jobs)]  # FIFO by arrival


@dataclass
class Run:
    """Where a launched job is: when its steps started counting, from which step."""

    started_s: float
    from_step: int
    request_s: float | None = None  # when it was asked to commit and stop
    misses: bool = False  # it will miss the deadline


@dataclass
class SharingStats:
    decisions: int = 0
    policy_s: float = 0.0
    ticks: int = 0
    preemptions: int = 0  # victims stopped
    at_risk: int = 0  # steps since their last commit when asked (lost had every victim missed the deadline)
    lost: int = 0  # steps actually lost (the victims that missed the deadline)
    worker_s: dict = field(default_factory=lambda: defaultdict(float))  # while every queue had work waiting
    worker_s_all: dict = field(default_factory=lambda: defaultdict(float))  # over the whole run
    peak: dict = field(default_factory=lambda: defaultdict(float))  # most workers each queue held
    waits: dict = field(default_factory=lambda: defaultdict(list))  # priority -> [arrival to first start]
    makespan_s: float = 0.0
    refused: list = field(default_factory=list)


class SharingSim:
    def __init__(self, cluster, jobs: list[JobRecord], queues: QueuesConfig, order=least_loss, seed: int = 0,
                 tick_s: float = 60.0, policy=admit):
        self.cluster, self.queues, self.order, self.tick_s = cluster, queues, order, tick_s
        self.admit = policy  # the admission policy under test (a seam)
        self.deadline_s = queues.preempt_deadline_s
        self.rng = random.Random(seed)
        # what Controller.submit refuses: a job that can never fit the cluster or its queue's limit
        self.refused = [j for j in jobs
                        if never_fits(j, cluster.capacity) or never_fits_queue(j, queues.teams[j.queue])]
        self.future = [j for j in jobs if j not in self.refused]  # not arrived yet, in arrival order
        self.records: dict[str, JobRecord] = {}
        self.live: set[str] = set()
        self.runs: dict[str, Run] = {}
        self.usage = Usage()
        self.stats = SharingStats()
        self.stats.refused = [j.id for j in self.refused]
        self.first_start: set[str] = set()
        self.resume: dict[str, int] = {}  # a preempted job's step to resume from
        self.now = 0.0

    def _set(self, r: JobRecord, state: JobState, **fields) -> JobRecord:
        check_transition(r.state, state)
        r = dataclasses.replace(r, state=state, history=[*r.history[-3:], {"state": state.value,
                                                                           "at": self.now, "reason": ""}], **fields)
        self.records[r.id] = r
        return r

    def _apply(self, r: JobRecord, kind: EventKind, **data) -> JobRecord:
        """One runner event through the real lifecycle fold."""
        t0 = time.perf_counter()
        changes = apply_events(r, [RunnerEvent(r.last_event_seq + 1, kind, data, self.now)])
        self.stats.policy_s += time.perf_counter() - t0
        for c in changes:
            if c.state is not None:
                check_transition(r.state, c.state)
                self.stats.decisions += 1
                r = dataclasses.replace(preview(r, c), history=[*r.history[-3:], {"state": c.state.value,
                                                                                  "at": self.now, "reason": ""}])
            else:
                r = preview(r, c)
        self.records[r.id] = r
        return r

    def step_of(self, r: JobRecord) -> int:
        run = self.runs[r.id]
        done = max(0.0, self.now - run.started_s) / r.config["sim"]["step_s"]
        return min(r.config["trainer"]["max_steps"], run.from_step + int(done))

    def committed(self, r: JobRecord, step: int) -> int:
        return max(self.runs[r.id].from_step, step // COMMIT_EVERY * COMMIT_EVERY)

    # ------------------------------------------------------------------------------ the runners
    def _progress(self) -> None:
        """What each launched job's runner has reported by now: ready, its step and last commit, done,
        or stopped for a preemption (committed on request, or stopped at the deadline)."""
        for jid in list(self.runs):
            r, run = self.records[jid], self.runs[jid]
            if r.state is S.STARTING and self.now >= run.started_s:
                r = self._apply(r, EventKind.ATTEMPT_STARTED, attempt=1, reason=AttemptReason.FIRST.value,
                                world_size=r.workers)
                r = self._apply(r, EventKind.ENGINE_READY, attempt=1)
            if r.state is not S.RUNNING:
                continue
            step = self.step_of(r)
            ck = self.committed(r, step)
            r = dataclasses.replace(r, metrics={"step": step, "step_time_s": r.config["sim"]["step_s"]},
                                    checkpoint=f"s3://b/runs/{jid}/checkpoints/step-{ck}" if ck else None)
            self.records[jid] = r
            if step >= r.config["trainer"]["max_steps"]:
                self._apply(r, EventKind.SUCCEEDED, export=f"s3://b/runs/{jid}/export", metrics={"step": step})
                self._release(jid, done=True)
            elif run.request_s is not None and run.misses and self.now >= run.request_s + self.deadline_s:
                self.stats.lost += step - ck  # stopped anyway: resumes from its previous commit
                self._set(r, S.PREEMPTED, requested=None, preemptions=r.preemptions + 1)
                self._release(jid, resume_from=ck)
            elif run.request_s is not None and not run.misses and self.now >= run.request_s + COMMIT_S:
                self._apply(r, EventKind.STOPPED, checkpoint=f"s3://b/runs/{jid}/checkpoints/step-{step}")
                self._release(jid, resume_from=step)

    def _release(self, jid: str, done: bool = False, resume_from: int = 0) -> None:
        self.cluster.release(jid)
        self.runs.pop(jid)
        if done:
            self.live.discard(jid)
        else:
            self.stats.preemptions += 1
            self.resume[jid] = resume_from

    # ------------------------------------------------------------------------------ the controller
    def _arrive(self) -> None:
        arrived = []
        while self.future and self.future[0].config["sim"]["arrive_s"] <= self.now:
            j = self.future.pop(0)
            self.records[j.id] = j
            self.live.add(j.id)
            arrived.append(j)
        t0 = time.perf_counter()
        decisions = dependency_decisions(arrived)
        self.stats.policy_s += time.perf_counter() - t0
        self.stats.decisions += len(decisions)
        for d in decisions:
            self._set(self.records[d.job_id], d.state)

    def _admit(self) -> None:
        jobs = [self.records[i] for i in self.live]
        held = {q: u.get("workers", 0.0) for q, u in queue_in_use(jobs).items()}
        t0 = time.perf_counter()
        self.usage = advance_usage(self.usage, held, self.now, self.queues.half_life_s)
        result = self.admit(jobs, self.cluster.capacity, self.queues, self.usage, self.now, explain=False)
        self.stats.policy_s += time.perf_counter() - t0
        self.stats.decisions += len(result.decisions)
        for d in result.decisions:
            self._start(self.records[d.job_id])
        if not result.blocker or any(r.request_s is not None for r in self.runs.values()):
            return
        jobs = [self.records[i] for i in self.live]
        t0 = time.perf_counter()
        chosen = choose_victims(self.records[result.blocker], jobs, self.cluster.capacity, self.queues, self.now,
                                order=self.order)
        self.stats.policy_s += time.perf_counter() - t0
        for v in chosen.victims if chosen else ():
            self.stats.decisions += 1
            self.stats.at_risk += steps_since_commit(self.records[v])
            self.runs[v].request_s, self.runs[v].misses = self.now, self.rng.random() < MISS_DEADLINE
            self.records[v] = dataclasses.replace(self.records[v], requested={
                "action": "preempt", "id": f"preempt-{self.now}", "for": result.blocker,
                "deadline": self.now + self.queues.preempt_deadline_s})

    def _start(self, r: JobRecord) -> None:
        assert self.cluster.place(r.id, r.workers, r.config["cluster"]["cpus_per_worker"]), f"{r.id} cannot be placed"
        self._set(r, S.STARTING, last_event_seq=0)
        if r.id not in self.first_start:
            self.first_start.add(r.id)
            self.stats.waits[r.priority].append(self.now - r.config["sim"]["arrive_s"])
        self.runs[r.id] = Run(self.now + STARTUP_S, self.resume.get(r.id, 0))

    # ------------------------------------------------------------------------------ checks, clock
    def _account(self, dt: float) -> None:
        """Quota never exceeded except by borrowing (up to the limit); worker-seconds while contended."""
        active = [self.records[i] for i in self.runs]
        use = queue_in_use(active)
        for q, spec in self.queues.teams.items():
            w = use.get(q, {}).get("workers", 0.0)
            assert w <= spec.quota.workers + spec.borrow.workers + 1e-6, f"{q} holds {w} workers, over its limit"
            self.stats.peak[q] = max(self.stats.peak[q], w)
        for q in self.queues.teams:
            self.stats.worker_s_all[q] += use.get(q, {}).get("workers", 0.0) * dt
        waiting = {self.records[i].queue for i in self.live if self.records[i].state.waiting}
        if waiting == set(self.queues.teams):
            for q in self.queues.teams:
                self.stats.worker_s[q] += use.get(q, {}).get("workers", 0.0) * dt
        assert sum(charge(r)["GPU"] for r in active) <= self.cluster.capacity["GPU"] + 1e-6

    def _next_time(self) -> float:
        times = [self.future[0].config["sim"]["arrive_s"]] if self.future else []
        for jid, run in self.runs.items():
            r = self.records[jid]
            if r.state is S.STARTING:
                times.append(run.started_s)
            else:
                steps = r.config["trainer"]["max_steps"] - run.from_step
                times.append(run.started_s + steps * r.config["sim"]["step_s"])
            if run.request_s is not None:
                times.append(run.request_s + (self.queues.preempt_deadline_s if run.misses else COMMIT_S))
        return min(times) if times else self.now

    def run(self) -> SharingStats:
        while self.future or self.live:
            self._arrive()
            self._progress()
            self._admit()
            self.stats.ticks += 1
            if self.stats.ticks % 200 == 0:  # (a long run says how far it is)
                print(f"    ... {self.now / 3600:.1f} h simulated, {len(self.live)} jobs live, {len(self.future)} to "
                      f"arrive", file=sys.stderr, flush=True)
            nxt = max(self.now + self.tick_s, math.ceil(self._next_time() / self.tick_s) * self.tick_s)
            self._account(nxt - self.now)
            self.now = nxt
        self.stats.makespan_s = self.now
        assert all(r.state is S.SUCCEEDED for r in self.records.values()), "a job did not finish"
        return self.stats


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


def run_sharing(cluster_cls, nodes: int, n_jobs: int, seed: int, tick_s: float = 60.0) -> dict:
    """Both victim rules on the same workload; prints the figures and returns them."""
    gpus = nodes * 8
    queues = sharing_queues(gpus)
    print(f"sharing: {nodes} nodes x 8 GPUs, {n_jobs} jobs in bursts (seed {seed}), a decision every {tick_s:g} s "
          f"simulated, queues "
          + ", ".join(f"{q} weight {s.weight:g} quota {s.quota.workers:g} (+{s.borrow.workers:g} borrowable)"
                      for q, s in queues.teams.items()))
    out = {}
    for name, order in (("least lost work", least_loss), ("newest first", newest_first)):
        t0 = time.perf_counter()
        stats = SharingSim(cluster_cls(nodes), make_sharing_jobs(n_jobs, seed), queues, order, seed, tick_s).run()
        out[name] = (stats, time.perf_counter() - t0)
    stats, wall = out["least lost work"]
    total_w, total_ws = sum(TEAMS.values()), sum(stats.worker_s.values()) or 1.0
    total_all = sum(stats.worker_s_all.values())
    ratios = []
    for q, w in TEAMS.items():
        share, entitled = stats.worker_s[q] / total_ws, w / total_w
        ratios.append(share / entitled)
        limit = queues.teams[q].quota.workers + queues.teams[q].borrow.workers
        print(f"  {q}: {share:.1%} of the worker-seconds while every queue had work waiting (entitled "
              f"{entitled:.0%}; {stats.worker_s_all[q] / total_all:.1%} over the whole run, where demand was equal); "
              f"held at most {stats.peak[q]:g} workers (quota {queues.teams[q].quota.workers:g}, "
              f"limit with borrowing {limit:g})")
    print(f"  Jain's index of share / entitlement while contended: {jain(ratios):.3f} (1 = every queue exactly its "
          f"entitlement); contended: {total_ws / gpus / 3600:.1f} h of the whole cluster's worker-seconds; "
          f"refused at submit (larger than the cluster or the queue's limit): {len(stats.refused)}")
    for p in sorted(stats.waits):
        w = stats.waits[p]
        print(f"  priority {p:>2}: {len(w):>5} jobs, wait arrival -> start p50 {_pct(w, .5) / 60:6.1f} min, "
              f"p99 {_pct(w, .99) / 60:6.1f} min")
    for name, (s, wall) in out.items():
        print(f"  victims by {name:<15}: {s.preemptions} preemptions, {s.at_risk:,} steps at risk (since the last "
              f"commit when asked), {s.lost:,} lost (the {MISS_DEADLINE:.0%} that missed the deadline); makespan "
              f"{s.makespan_s / 3600:.1f} h; {s.decisions:,} decisions in {s.policy_s:.1f} s of policy time: "
              f"{s.decisions / s.policy_s:,.0f}/s ({s.ticks} ticks, {wall:.0f} s wall)")
    return out
