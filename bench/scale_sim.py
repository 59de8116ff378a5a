"""Scale by simulation: the controller's real policies on a simulated 1,000-node GPU cluster, and the
goodput of a 16,384-GPU pretraining job under failures with `checkpoint.interval=auto`.

    PYTHONPATH=. .venv/bin/python bench/scale_sim.py                 # both parts (about a minute)
    PYTHONPATH=. .venv/bin/python bench/scale_sim.py --part queue    # only the queue
    PYTHONPATH=. .venv/bin/python bench/scale_sim.py --part goodput  # only the goodput
    PYTHONPATH=. .venv/bin/python bench/scale_sim.py --part sharing  # queues, fair share, preemption

Part 1 (queue). 1,000 nodes x 8 GPUs (96 CPUs each), 10,000 jobs queued at t=0: 1 to 1,024 workers
of one GPU each, priorities 0/1/5/10, pipelines of dependent jobs (pretrain -> finetune -> eval),
a few elastic jobs, some that fail (their dependents must be BLOCKED), some that restart. Each
controller tick calls what `Controller.step` calls, unchanged: `dependency_decisions`,
`admission_decisions`, and `apply_events` for the events the simulated runners emitted; state
changes go through `check_transition`. The simulator places each admitted gang on nodes (PACK: the
fullest nodes that have room first) and asserts, every tick, that no node and no resource is
over-committed, that the admitted jobs are exactly the head of the queue in (priority, FIFO) order
with the first one left waiting not fitting (no overtaking), and that a job starts only once every
dependency SUCCEEDED. It prints decisions per second of policy time and the policy time per tick.

Part 2 (goodput). A 16,384-GPU job with exponentially distributed failures (mean 3 h, seeded),
driven through the training loop's own `CheckpointCadence` (checkpoint.interval=auto: the first
save after 60 s, then Young/Daly from each measured blocking time). The checkpoint costs are the
figures `bench/checkpoint_blocking.py --link-mbit 400` measured (issue 5): 0.674 s blocking per
save with the background upload, 11.627 s for a synchronous save + upload (so ~11 s of upload
during which a failure loses the save), and 26.1 s from kill -9 to the first step after resume.
Effective training time = steps kept x step time / wall time. Target >= 95%.

Part 3 (sharing; not in `both`): several queues with quotas, borrowing and bursts on the same
cluster, with fair share and preemption (bench/sharing_sim.py says what it runs and prints).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import heapq
import math
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config.interval import young_daly_s  # noqa: E402
from orchestrator.config.schema import CheckpointConfig  # noqa: E402
from orchestrator.jobs.events import AttemptReason, EventKind, RunnerEvent, RunnerPoll, RunnerStatus  # noqa: E402
from orchestrator.jobs.lifecycle import apply_events, preview  # noqa: E402
from orchestrator.jobs.policy import admission_decisions, dependency_decisions, never_fits  # noqa: E402
from orchestrator.jobs.record import JobRecord  # noqa: E402
from orchestrator.jobs.state import JobState, check_transition  # noqa: E402
from orchestrator.train.cadence import CheckpointCadence  # noqa: E402

S = JobState
_FAILED_DEPS = (S.FAILED, S.CANCELLED, S.BLOCKED)

# Figures of `bench/checkpoint_blocking.py --link-mbit 400` (issue 5's closing note, 2 CPU workers,
# ~30M-param GPT, ~350 MB ZeRO-2 checkpoint with Adam states, 400 Mbit/s link to S3).
MEASURED_BLOCKING_S = 0.674  # training blocked per save, background upload
MEASURED_SYNC_S = 11.627  # synchronous save + upload of the same checkpoint
MEASURED_RESTART_S = 26.1  # kill -9 of the workers -> first step after resume


# ===================================================================================== part 1: queue
@dataclass
class Cluster:
    """Nodes with free GPUs and CPUs; gangs placed PACK-style (fullest nodes with room first)."""

    nodes: int
    gpus_per_node: int = 8
    cpus_per_node: int = 96
    free_gpu: list[int] = field(default_factory=list)
    free_cpu: list[float] = field(default_factory=list)
    placed: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # job -> [(node, gpus, cpus)]

    def __post_init__(self):
        self.free_gpu = [self.gpus_per_node] * self.nodes
        self.free_cpu = [float(self.cpus_per_node)] * self.nodes
        # nodes by free GPU count, so placing a gang costs O(bundles), not O(nodes)
        self.by_free: list[set[int]] = [set() for _ in range(self.gpus_per_node + 1)]
        self.by_free[self.gpus_per_node] = set(range(self.nodes))

    @property
    def capacity(self) -> dict[str, float]:
        return {"CPU": float(self.nodes * self.cpus_per_node), "GPU": float(self.nodes * self.gpus_per_node)}

    def _move(self, node: int, before: int, after: int) -> None:
        self.by_free[before].discard(node)
        self.by_free[after].add(node)

    def place(self, job_id: str, bundles: int, cpus: float) -> bool:
        """Place `bundles` bundles of {1 GPU, cpus CPU}; False (and nothing placed) if they do not fit."""
        if sum(len(s) * g for g, s in enumerate(self.by_free)) < bundles:
            return False
        out, left = [], bundles
        for g in range(1, self.gpus_per_node + 1):  # fullest first (fewest free GPUs)
            for node in sorted(self.by_free[g]):
                take = min(g, left, int(self.free_cpu[node] // cpus) if cpus else g)
                if take <= 0:
                    continue
                out.append((node, take, take * cpus))
                left -= take
                if not left:
                    break
            if not left:
                break
        if left:
            return False
        for node, gpus, c in out:
            self._move(node, self.free_gpu[node], self.free_gpu[node] - gpus)
            self.free_gpu[node] -= gpus
            self.free_cpu[node] -= c
            assert self.free_gpu[node] >= 0 and self.free_cpu[node] >= -1e-9, f"node {node} over-committed"
        self.placed[job_id] = out
        return True

    def release(self, job_id: str) -> None:
        for node, gpus, c in self.placed.pop(job_id, []):
            self._move(node, self.free_gpu[node], self.free_gpu[node] + gpus)
            self.free_gpu[node] += gpus
            self.free_cpu[node] += c

    def used_gpus(self) -> int:
        return self.nodes * self.gpus_per_node - sum(self.free_gpu)


def make_jobs(n: int, seed: int, max_workers: int = 1024) -> list[JobRecord]:
    """`n` QUEUED-to-be (PENDING) jobs: sizes skewed to small, pipelines of dependents, priorities."""
    rng = random.Random(seed)
    sizes = [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if w <= max_workers]
    weights = [20, 15, 15, 15, 10, 8, 6, 4, 3, 2, 1][:len(sizes)]
    jobs: list[JobRecord] = []
    i = 0
    while len(jobs) < n:
        chain = rng.choices([1, 2, 3], [70, 20, 10])[0]  # a pipeline: pretrain -> finetune -> eval
        parent = None
        for depth in range(min(chain, n - len(jobs))):
            workers = rng.choices(sizes, weights)[0]
            elastic = depth == 0 and workers >= 4 and rng.random() < 0.03
            depends = [parent] if parent else (["ghost"] if rng.random() < 0.001 else [])
            config = {
                "workers": workers,
                "max_workers": workers * 2 if elastic else None,
                "max_failures": 1,
                "cluster": {"cpus_per_worker": rng.choice([4, 8, 12]), "gpus_per_worker": 1},
                "trainer": {"max_steps": 1000},
                # what the simulated runner does (not read by the policies)
                "sim": {"run_s": rng.lognormvariate(math.log(900), 0.8), "startup_s": rng.uniform(20, 120),
                        "failures": rng.choices([0, 1, 2], [92, 6, 2])[0]},
            }
            jid = f"j{i:05d}"
            jobs.append(JobRecord(id=jid, pipeline_id=f"p{i}", name=jid, kind="finetune" if depth else "pretrain",
                                  state=S.PENDING, priority=rng.choices([0, 1, 5, 10], [70, 20, 8, 2])[0],
                                  depends_on=depends, config=config, created_at=0.0, seq=i))
            parent, i = jid, i + 1
    return jobs


def runner_script(record: JobRecord, t0: float, tick_s: float) -> list[tuple[float, EventKind, dict]]:
    """The events a launch of `record` emits, with the time of each (Ray Train restarts the group in
    place after a failure, up to max_failures; one more failure fails the job)."""
    sim, workers = record.config["sim"], record.workers
    t = t0 + sim["startup_s"]
    out = [(t, EventKind.ATTEMPT_STARTED, {"attempt": 1, "reason": AttemptReason.FIRST.value, "world_size": workers}),
           (t, EventKind.ENGINE_READY, {"attempt": 1})]
    for k in range(sim["failures"]):
        t += sim["run_s"] * 0.5
        if k >= record.config["max_failures"]:
            return out + [(t, EventKind.FAILED, {"reason": "worker group failed; max_failures reached"})]
        out += [(t, EventKind.ATTEMPT_STARTED, {"attempt": k + 2, "reason": AttemptReason.FAILURE.value,
                                                "world_size": workers}),
                (t + 60.0, EventKind.ENGINE_READY, {"attempt": k + 2, "resumed_from": "step-x"})]
        t += 60.0
    t += sim["run_s"]
    out.append((t, EventKind.PROGRESS, {"metrics": {"step": 1000, "loss": 2.0}}))
    return out + [(t, EventKind.SUCCEEDED, {"export": f"s3://b/{record.id}/export", "metrics": {"step": 1000}})]


@dataclass
class QueueStats:
    ticks: int = 0
    decisions: int = 0  # dependency + admission decisions and state changes from events
    policy_s: float = 0.0  # time inside the policy functions
    tick_policy_s: list[float] = field(default_factory=list)
    first_tick_s: float = 0.0  # the first tick: every job in the queue
    makespan_s: float = 0.0
    gpu_seconds: float = 0.0
    states: dict = field(default_factory=dict)
    refused: int = 0


class QueueSim:
    """The controller's loop over an in-memory store; `admit` is the policy under test (a seam)."""

    def __init__(self, cluster: Cluster, jobs: list[JobRecord], tick_s: float = 60.0, admit=admission_decisions):
        self.cluster, self.tick_s, self.admit = cluster, tick_s, admit
        self.records: dict[str, JobRecord] = {}
        self.stats = QueueStats()
        for j in jobs:  # what Controller.submit refuses: a job that can never fit
            if never_fits(j, cluster.capacity):
                self.stats.refused += 1
            else:
                self.records[j.id] = j
        self.live = set(self.records)
        self.events: list[tuple[float, int, str, RunnerEvent]] = []  # heap of (time, order, job, event)
        self._order = 0

    # ------------------------------------------------------------------------------ helpers
    def _set(self, record: JobRecord, state: JobState, **fields) -> JobRecord:
        check_transition(record.state, state)
        new = dataclasses.replace(record, state=state, **fields)
        self.records[record.id] = new
        if state.terminal:
            self.live.discard(record.id)
            self.cluster.release(record.id)
        return new

    def _policy_input(self) -> list[JobRecord]:
        """What `Controller.step` hands the policies: the non-terminal jobs and their terminal deps."""
        jobs = [self.records[i] for i in self.live]
        deps = {d for j in jobs if j.state is S.PENDING for d in j.depends_on if d not in self.live}
        return jobs + [self.records[d] for d in deps if d in self.records]

    # ------------------------------------------------------------------------------ one tick
    def tick(self, now: float) -> None:
        jobs = self._policy_input()
        t0 = time.perf_counter()
        dep = dependency_decisions(jobs)
        spent = time.perf_counter() - t0
        for d in dep:
            self._set(self.records[d.job_id], d.state)
        jobs = [self.records[i] for i in self.live]
        t0 = time.perf_counter()
        admitted = self.admit(jobs, self.cluster.capacity)
        spent += time.perf_counter() - t0
        self._check_admission(jobs, admitted)
        for d in admitted:
            self._start(self.records[d.job_id], now)
        spent += self._deliver(now)
        self.stats.ticks += 1
        self.stats.decisions += len(dep) + len(admitted)
        self.stats.policy_s += spent
        self.stats.tick_policy_s.append(spent)
        self._check_capacity()

    def _start(self, record: JobRecord, now: float) -> None:
        for d in record.depends_on:
            assert self.records[d].state is S.SUCCEEDED, f"{record.id} started before dependency {d} succeeded"
        cpus = record.config["cluster"]["cpus_per_worker"]
        bundles = record.workers
        if record.config.get("max_workers"):  # elastic: as many as there is room for, up to its maximum
            bundles = max(record.workers, min(record.config["max_workers"], sum(self.cluster.free_gpu)))
        assert self.cluster.place(record.id, bundles, cpus), f"admitted {record.id} ({bundles} GPUs) cannot be placed"
        record = self._set(record, S.STARTING, last_event_seq=0)
        for seq, (t, kind, data) in enumerate(runner_script(record, now, self.tick_s), 1):
            self._order += 1
            heapq.heappush(self.events, (t, self._order, record.id, RunnerEvent(seq, kind, data, t)))
        self.stats.gpu_seconds -= bundles * now

    def _deliver(self, now: float) -> float:
        """Apply (through the lifecycle fold) every runner event emitted up to `now`."""
        due: dict[str, list[RunnerEvent]] = defaultdict(list)
        while self.events and self.events[0][0] <= now:
            _, _, jid, event = heapq.heappop(self.events)
            due[jid].append(event)
        spent = 0.0
        for jid, events in due.items():
            record = self.records[jid]
            t0 = time.perf_counter()
            changes = apply_events(record, events)
            spent += time.perf_counter() - t0
            for change in changes:
                if change.state is not None:
                    check_transition(record.state, change.state)
                    self.stats.decisions += 1
                record = preview(record, change)
            self.records[jid] = record
            if record.state.terminal:
                self.stats.gpu_seconds += sum(g for _, g, _ in self.cluster.placed.get(jid, [])) * now
                self.live.discard(jid)
                self.cluster.release(jid)
        return spent

    # ------------------------------------------------------------------------------ checks
    def _check_admission(self, jobs: list[JobRecord], admitted) -> None:
        """Admitted = the head of the queue in (priority desc, seq) order; the first one left waiting
        does not fit what the active jobs and the admitted ones leave (or is an elastic job that
        waits for a gang being placed)."""
        queued = [j for j in jobs if j.state is S.QUEUED]
        head = heapq.nsmallest(len(admitted) + 1, queued, key=lambda j: (-j.priority, j.seq))
        ids = [d.job_id for d in admitted]
        assert ids == [j.id for j in head[:len(ids)]], f"admission out of priority/FIFO order: {ids[:5]}"
        charge = {"GPU": 0.0, "CPU": 0.0}
        for j in jobs:
            if j.state.active or j.id in ids:
                n = j.config.get("max_workers") or j.workers
                charge["GPU"] += n * j.config["cluster"]["gpus_per_worker"]
                charge["CPU"] += n * j.config["cluster"]["cpus_per_worker"]
        if len(head) > len(ids):
            nxt = head[len(ids)]
            cap = self.cluster.capacity
            fits = all(cap[k] - charge[k] >= nxt.workers * nxt.config["cluster"][f"{k.lower()}s_per_worker"]
                       for k in ("GPU", "CPU"))
            placing = any(j.state in (S.STARTING, S.RESTARTING) for j in jobs) or ids
            assert not fits or (nxt.config.get("max_workers") and placing), \
                f"{nxt.id} fits but was left waiting (the head of the queue must start)"

    def _check_capacity(self) -> None:
        assert min(self.cluster.free_gpu) >= 0 and min(self.cluster.free_cpu) >= -1e-9, "a node is over-committed"
        for j in self.live:
            if self.records[j].state.active:
                assert j in self.cluster.placed, f"active job {j} holds no placement"

    def check_final(self) -> None:
        for j in self.records.values():
            assert j.state.terminal, f"{j.id} ended the simulation {j.state.value}"
            bad = [d for d in j.depends_on if d not in self.records or self.records[d].state in _FAILED_DEPS]
            if j.state is S.BLOCKED:
                assert bad, f"{j.id} BLOCKED with every dependency fine"
            else:
                assert not bad, f"{j.id} is {j.state.value} although dependency {bad[0]} failed"
                assert all(self.records[d].state is S.SUCCEEDED for d in j.depends_on)

    # ------------------------------------------------------------------------------ run
    def run(self) -> QueueStats:
        now = 0.0
        while self.live:
            self.tick(now)
            if now == 0.0:
                self.stats.first_tick_s = self.stats.tick_policy_s[0]
            if not self.live:
                break
            # the next tick that has anything to do (a quiet tick decides nothing new)
            nxt = self.events[0][0] if self.events else now + self.tick_s
            now = max(now + self.tick_s, math.ceil(nxt / self.tick_s) * self.tick_s)
        self.stats.makespan_s = now
        self.check_final()
        self.stats.states = dict(sorted(_count(j.state.value for j in self.records.values()).items()))
        return self.stats


def _count(items) -> dict:
    out: dict = defaultdict(int)
    for i in items:
        out[i] += 1
    return out


def policy_scaling(sizes=(2500, 5000, 10_000, 20_000), nodes: int = 1000, rounds: int = 3) -> dict[int, float]:
    """Policy time of one tick (dependency_decisions + admission_decisions) with every job waiting,
    by queue length (best of `rounds`, garbage collector off): linear growth means no quadratic step."""
    out = {}
    for n in sizes:
        pending = make_jobs(n, 0)
        queued = {d.job_id for d in dependency_decisions(pending) if d.state is S.QUEUED}
        waiting = [dataclasses.replace(j, state=S.QUEUED) if j.id in queued else j for j in pending]
        capacity = Cluster(nodes).capacity
        best = float("inf")
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                t0 = time.perf_counter()
                dependency_decisions(pending)
                admission_decisions(waiting, capacity)
                best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
        out[n] = best
    return out


class _IdleLauncher:
    def start(self, record, init_from, reason):
        return record.id

    def attach(self, record):
        return None

    def poll(self, handle, after_seq):
        return RunnerPoll(RunnerStatus.ALIVE)

    def request_stop(self, handle, request):
        pass

    def kill(self, handle):
        pass


def controller_step_s(n: int) -> tuple[float, float]:
    """One quiet `Controller.step` (nothing to decide) over `n` waiting jobs in the real SQLite
    JobStore, and one `JobStore.list()` of the same jobs: where a step's time goes beside the policies."""
    from orchestrator.jobs.controller import Controller
    from orchestrator.jobs.store import JobStore

    jobs = make_jobs(n, 0)
    for j in jobs:
        j.config.pop("sim")
        j.state = S.PENDING if j.depends_on and j.depends_on != ["ghost"] else S.QUEUED
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore(tmp)
        store.add(jobs)
        controller = Controller(store, _IdleLauncher(), lambda: {"CPU": 0.0, "GPU": 0.0}, say=lambda m: None)
        ids = [j.id for j in jobs if j.depends_on != ["ghost"]]
        t0 = time.perf_counter()
        controller.step(ids)
        step = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.list()
        return step, time.perf_counter() - t0


def run_queue(nodes: int, jobs: int, seed: int, tick_s: float) -> QueueStats:
    cluster = Cluster(nodes)
    sim = QueueSim(cluster, make_jobs(jobs, seed), tick_s)
    stats = sim.run()
    gpus = cluster.nodes * cluster.gpus_per_node
    p = sorted(stats.tick_policy_s)
    print(f"queue: {nodes} nodes x 8 GPUs, {jobs} jobs (seed {seed}), controller tick every {tick_s:g} s simulated")
    print(f"  final states {stats.states}; refused at submit {stats.refused}")
    print(f"  {stats.ticks} ticks, {stats.decisions} decisions in {stats.policy_s:.2f} s of policy time: "
          f"{stats.decisions / stats.policy_s:,.0f} decisions/s")
    print(f"  policy time per tick: first (all {jobs} jobs queued) {stats.first_tick_s * 1e3:.1f} ms, "
          f"median {statistics.median(p) * 1e3:.2f} ms, p99 {p[int(len(p) * 0.99)] * 1e3:.2f} ms, "
          f"max {p[-1] * 1e3:.1f} ms")
    print(f"  simulated makespan {stats.makespan_s / 3600:.1f} h, GPU utilisation "
          f"{stats.gpu_seconds / (gpus * stats.makespan_s):.1%}; checks held every tick: no over-commit, "
          f"priority/FIFO head admitted, no overtaking, dependencies respected")
    scaling = policy_scaling()
    print("  policy time of one tick by queue length: "
          + ", ".join(f"{n:,} jobs {s * 1e3:.0f} ms" for n, s in scaling.items())
          + f" (20k/10k = {scaling[20_000] / scaling[10_000]:.2f}; linear would be 2, quadratic 4)")
    step, listing = controller_step_s(jobs)
    print(f"  the real Controller.step over the {jobs:,} waiting jobs in its SQLite store (nothing to decide): "
          f"{step:.2f} s, {step / jobs * 1e3:.2f} ms per job, where one JobStore.list() of them takes "
          f"{listing:.2f} s (the step reads the jobs it drives with JobStore.get_many, twice)")
    print(f"  against the controller's 1 s poll: the policies take {stats.first_tick_s:.1%} of it with all {jobs:,} "
          f"jobs queued; the whole step {step:.1f}x the poll"
          + (" (the loop then runs back to back)" if step > 1 else ""))
    return stats


# ===================================================================================== part 2: goodput
class _NullTracker:
    def log(self, *a, **k):
        pass

    def summary(self, *a, **k):
        pass


class SimCheckpointer:
    """The Checkpointer's timing: a save blocks `blocking_s` (plus any wait for the previous upload)
    and commits `upload_s` later, in the background."""

    def __init__(self, clock: list[float], blocking_s: float, upload_s: float):
        self.clock, self.blocking_s, self.upload_s = clock, blocking_s, upload_s
        self.commits: list[tuple[float, int]] = []  # (commit time, step)
        self.last_upload_s = upload_s

    def save(self, engine, step: int, state: dict) -> float:
        now = self.clock[0]
        wait = max(0.0, self.commits[-1][0] - now) if self.commits else 0.0  # a save waits for the previous upload
        blocked = wait + self.blocking_s
        self.clock[0] = now + blocked
        self.commits.append((self.clock[0] + self.upload_s, step))
        return blocked

    def committed(self, at: float) -> int:
        return max((s for t, s in self.commits if t <= at), default=0)

    def wait(self):
        pass


@dataclass
class _State:
    step: int = 0


@dataclass
class Goodput:
    wall_s: float
    useful_s: float
    blocking_s: float
    restart_s: float
    rework_s: float
    failures: int
    saves: int
    interval_s: float

    @property
    def ratio(self) -> float:
        return self.useful_s / self.wall_s


def goodput_trial(seed: int, *, horizon_s: float, mtbf_s: float, step_s: float, blocking_s: float,
                  upload_s: float, restart_s: float, mtbf_hours_cfg: float) -> Goodput:
    """One seeded run of `horizon_s` wall seconds: failures at exponential intervals (during
    restarts too), each costing a restart and the steps since the last *committed* checkpoint."""
    rng = random.Random(seed)
    cfg = CheckpointConfig(interval="auto", mtbf_hours=mtbf_hours_cfg)
    clock = [0.0]
    next_fail = rng.expovariate(1.0 / mtbf_s)
    committed = failures = saves = 0
    blocked = restarting = 0.0
    interval = 0.0
    first = True
    while clock[0] < horizon_s:
        if not first:  # restart: a new worker group resumes from the last committed checkpoint
            end = min(clock[0] + restart_s, horizon_s)
            if next_fail < end:  # failed again while restarting
                restarting += next_fail - clock[0]
                clock[0] = next_fail
                failures += 1
                next_fail = clock[0] + rng.expovariate(1.0 / mtbf_s)
                continue
            restarting += end - clock[0]
            clock[0] = end
        first = False
        ckpt = SimCheckpointer(clock, blocking_s, upload_s)
        state = _State(committed)
        cadence = CheckpointCadence(cfg, ckpt, _NullTracker(), rank=0, step=committed, max_steps=1 << 62,
                                    clock=lambda: clock[0])
        while clock[0] < horizon_s:
            if clock[0] + step_s > next_fail:
                break
            clock[0] += step_s
            state.step += 1
            if cadence.due(state.step):
                blocked += cadence.save(None, state)
                saves += 1
                interval = cadence.schedule.seconds
        if clock[0] >= horizon_s or next_fail >= horizon_s:
            committed = state.step  # the run's end: what it trained is kept (the final save)
            break
        clock[0] = next_fail
        failures += 1
        committed = max(committed, ckpt.committed(next_fail))
        next_fail = clock[0] + rng.expovariate(1.0 / mtbf_s)
    useful = committed * step_s
    return Goodput(horizon_s, useful, blocked, restarting, horizon_s - useful - blocked - restarting, failures,
                   saves, interval)


def goodput_mc(seeds: int, **kw) -> Goodput:
    trials = [goodput_trial(s, **kw) for s in range(seeds)]
    total = Goodput(0, 0, 0, 0, 0, 0, 0, 0)
    for t in trials:
        for f in ("wall_s", "useful_s", "blocking_s", "restart_s", "rework_s", "failures", "saves"):
            setattr(total, f, getattr(total, f) + getattr(t, f))
    total.interval_s = statistics.median(t.interval_s for t in trials)
    return total


def analytic(mtbf_s: float, blocking_s: float, upload_s: float, restart_s: float, interval_s: float) -> float:
    """First-order expectation: 1 - δ/τ - (R + τ/2 + U)/M (rework: half an interval plus the upload lag)."""
    return 1 - blocking_s / interval_s - (restart_s + interval_s / 2 + upload_s) / mtbf_s


def _row(label: str, g: Goodput) -> str:
    w = g.wall_s
    return (f"  {label:<44} {g.ratio:6.1%}  interval {g.interval_s:5.0f} s  lost: ckpt {g.blocking_s / w:5.2%}, "
            f"restart {g.restart_s / w:5.2%}, rework {g.rework_s / w:5.2%}  ({g.failures} failures)")


def run_goodput(args) -> Goodput:
    mtbf_s = args.mtbf_hours * 3600
    upload_s = MEASURED_SYNC_S - MEASURED_BLOCKING_S
    kw = dict(horizon_s=args.days * 86400, mtbf_s=mtbf_s, step_s=args.step_s, upload_s=upload_s)
    print(f"goodput: {args.gpus:,}-GPU job, a failure every {args.mtbf_hours:g} h on average (exponential, seeds "
          f"0-{args.seeds - 1}), {args.days:g} days each, step {args.step_s:g} s; checkpoint.interval=auto; "
          f"measured blocking {MEASURED_BLOCKING_S} s, upload {upload_s:.1f} s, restart {MEASURED_RESTART_S} s")
    base = dict(kw, blocking_s=MEASURED_BLOCKING_S, restart_s=MEASURED_RESTART_S)
    main = goodput_mc(args.seeds, **base, mtbf_hours_cfg=args.mtbf_hours)
    tau = young_daly_s(MEASURED_BLOCKING_S, mtbf_s)
    print(_row(f"mtbf_hours={args.mtbf_hours:g} (set to the failure rate)", main)
          + f"  [first-order {analytic(mtbf_s, MEASURED_BLOCKING_S, upload_s, MEASURED_RESTART_S, tau):.1%}]")
    dflt = goodput_mc(args.seeds, **base, mtbf_hours_cfg=CheckpointConfig().mtbf_hours)
    print(_row(f"mtbf_hours={CheckpointConfig().mtbf_hours:g} (the default, left as is)", dflt))
    print("  sensitivity (same seeds; the local 26 s restart is far from a 16k-GPU restart):")
    for restart in (120.0, 300.0, 600.0, 1200.0):
        g = goodput_mc(args.seeds, **dict(base, restart_s=restart), mtbf_hours_cfg=args.mtbf_hours)
        print(_row(f"restart {restart / 60:g} min", g))
    for blocking in (MEASURED_BLOCKING_S * 2, 10.0, 60.0):
        g = goodput_mc(args.seeds, **dict(base, blocking_s=blocking), mtbf_hours_cfg=args.mtbf_hours)
        print(_row(f"blocking {blocking:g} s per save", g))
    # restart time that still meets the target: 1 - δ/τ - (R + τ/2 + U)/M >= target
    r_max = mtbf_s * (1 - args.target - MEASURED_BLOCKING_S / tau) - tau / 2 - upload_s
    print(f"  effective training time {main.ratio:.1%} (target >= {args.target:.0%}: "
          f"{'met' if main.ratio >= args.target else 'MISSED'}); the target holds while a restart takes "
          f"<= {r_max / 60:.1f} min (first order)")
    losses = {"restart": main.restart_s, "rework": main.rework_s, "checkpoint blocking": main.blocking_s}
    worst = max(losses, key=losses.get)
    print(f"  what dominates the loss: {worst} ({losses[worst] / main.wall_s:.2%} of wall time)")
    return main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("queue", "goodput", "both", "sharing"), default="both")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--tick-s", type=float, default=60.0, help="simulated seconds between controller ticks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=16_384)
    p.add_argument("--mtbf-hours", type=float, default=3.0)
    p.add_argument("--days", type=float, default=14.0, help="simulated wall time per goodput trial")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--step-s", type=float, default=6.0, help="seconds per optimizer step of the big job")
    p.add_argument("--target", type=float, default=0.95)
    args = p.parse_args()
    if args.part in ("queue", "both"):
        run_queue(args.nodes, args.jobs, args.seed, args.tick_s)
    if args.part in ("goodput", "both"):
        run_goodput(args)
    if args.part == "sharing":
        from sharing_sim import run_sharing  # (bench/, beside this file)

        run_sharing(Cluster, args.nodes, args.jobs, args.seed, args.tick_s)


if __name__ == "__main__":
    main()
