"""The controller: submits pipelines into the job store and drives each job's state machine.

One `step()` applies the pure policies (dependencies, admission) and each runner's new events
(`orchestrator.jobs.lifecycle`) to the durable records; `run()` steps until the given jobs are
terminal. Every change is persisted, with the sequence number of the event behind it, before it is
acted on, so a restarted controller applies each event exactly once. The Ray dependency is the
`launcher` seam: tests step the loop with a fake one.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, Protocol

from orchestrator.checkpoint.layout import checkpoint_name
from orchestrator.config.schema import JobConfig, QuarantineConfig, QueuesConfig, dependency_job
from orchestrator.config.typed import build, to_dict
from orchestrator.errors import CheckpointError, ClusterError, ConfigError, OrchError
from orchestrator.jobs.events import Action, AttemptReason, RunnerPoll, RunnerStatus
from orchestrator.jobs.lifecycle import Change, apply_events
from orchestrator.jobs.policy import dependency_decisions, never_fits, restart_decision, scale_refusal
from orchestrator.jobs.preemption import choose_victims
from orchestrator.jobs.quarantine import (
    QUARANTINE_SETTING,
    NodeSlot,
    QuarantineState,
    blames_of,
    decide,
    excluded,
    release,
)
from orchestrator.jobs.record import JobRecord, wandb_group
from orchestrator.jobs.retry import ORPHANED, blocked_dependents, retry_refusal
from orchestrator.jobs.sharing import (
    DEFAULT_QUEUE,
    UNLIMITED,
    Usage,
    admit,
    advance_usage,
    never_fits_queue,
    queue_in_use,
    queue_report,
)
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from orchestrator.jobs.trigger_driver import TriggerDriver

QUEUES_SETTING = "queues"  # the queues' config `orch queue set` gave (else the controller's default)
USAGE_SETTING = "usage"  # the fair-share usage ledger (orchestrator.jobs.sharing.Usage)


class Launcher(Protocol):
    def start(self, record: JobRecord, init_from: str | None, reason: AttemptReason): ...
    def attach(self, record: JobRecord): ...  # the live handle of a job started earlier, or None
    def poll(self, handle, after_seq: int) -> RunnerPoll: ...
    def wait(self, polls: list, timeout: float) -> None: ...  # sleep until an event after (handle, seq), or timeout
    def request_stop(self, handle, request: dict) -> None: ...  # idempotent per request["id"]
    def kill(self, handle) -> None: ...
    # the quarantined nodes ({node id: until}) the runner's next worker groups avoid; `upto`: the last
    # event of the runner the controller has applied (the runner waits for its failures to be judged)
    def exclude(self, handle, nodes: dict[str, float], upto: int) -> None: ...


def new_pipeline_id() -> str:
    return f"p{secrets.token_hex(3)}"


def new_sweep_id() -> str:
    return f"s{secrets.token_hex(3)}"


class Controller:
    def __init__(self, store: JobStore, launcher: Launcher, capacity: Callable[[], dict[str, float]],
                 say: Callable[[str], None] = print, validate: Callable[[dict], object] | None = None,
                 queues: QueuesConfig | None = None, clock: Callable[[], float] = time.time,
                 nodes: Callable[[], list[NodeSlot]] | None = None):
        self.store = store
        self.launcher = launcher
        self.capacity = capacity
        self.say = say
        self.validate = validate  # checks a changed job config (a scale's), raising OrchError/ValueError
        self.default_queues = queues or UNLIMITED  # until `orch queue set` stores others
        self.clock = clock
        self.nodes = nodes  # the alive nodes; None (no view of them): no node is ever quarantined
        self.handles: dict[str, object] = {}
        self.triggers = TriggerDriver(store, say, clock)

    # ---------------------------------------------------------------------------------- queues
    def queues(self) -> QueuesConfig:
        """The queues in force: the last `orch queue set`, else the default (read at every decision)."""
        stored = self.store.get_setting(QUEUES_SETTING)
        return build(QueuesConfig, stored, "queues") if stored else self.default_queues

    def set_queues(self, config: dict) -> QueuesConfig:
        """Replace the queues' config (a composed `queues` group); it takes effect at the next decision."""
        queues = build(QueuesConfig, config, "queues")  # a malformed quota: one ConfigError line naming it
        self.store.put_setting(QUEUES_SETTING, to_dict(queues))
        self.say(f"queues set: {', '.join(queues.teams)} (in force from the next decision)")
        return queues

    def queue_report(self) -> dict:
        """What `orch queue` shows (orchestrator.jobs.sharing.queue_report) over the jobs not ended."""
        jobs = [r for r in self.store.list() if not r.state.terminal]
        usage = Usage.from_json(self.store.get_setting(USAGE_SETTING))
        return queue_report(jobs, self.capacity(), self.queues(), usage, self.clock())

    def check_queue(self, queue: str) -> None:
        teams = self.queues().teams
        if queue not in teams:
            raise ConfigError(f"unknown queue {queue!r}: this cluster's queues are {', '.join(teams)}; submit with "
                              f"--queue NAME (`orch queue` lists them), or define it with `orch queue set`")

    # ---------------------------------------------------------------------------------- submit
    def submit(self, jobs: list[JobConfig], pipeline_id: str | None = None, after: list[str] = (),
               user: str = "", queue: str = DEFAULT_QUEUE) -> list[JobRecord]:
        """Record a pipeline's jobs as PENDING. Dependencies are named by job name inside the
        pipeline; `after` (job ids already submitted) is added to every job that has none there."""
        return self.submit_sweep([jobs], after, pipeline_ids=[pipeline_id or new_pipeline_id()], user=user,
                                 queue=queue)[0]

    def submit_sweep(self, pipelines: list[list[JobConfig]], after: list[str] = (), sweep: dict | None = None,
                     pipeline_ids: list[str] | None = None, user: str = "",
                     queue: str = DEFAULT_QUEUE) -> list[list[JobRecord]]:
        """Record several pipelines at once (all or none). `sweep` ({"id", "overrides": one list per
        pipeline}): they are one sweep's combinations, sharing the sweep id as their W&B group.
        `user` (what the submitter said it is) and `queue` (one of the queues in force) go on every job."""
        self.check_queue(queue)
        parents = [self.store.get(dependency_job(dep)) for dep in after]  # raises JobNotFound with the fix
        pipeline_ids = pipeline_ids or [new_pipeline_id() for _ in pipelines]
        now = time.time()
        out = []
        for i, (jobs, pipeline_id) in enumerate(zip(pipelines, pipeline_ids)):
            # the sweep's id, else (`--after`) the parent's W&B group, else the pipeline's
            group = sweep["id"] if sweep else wandb_group(parents[0]) if parents else pipeline_id
            tag = {"id": sweep["id"], "index": i + 1, "count": len(pipelines),
                   "overrides": list(sweep["overrides"][i])} if sweep else {}
            ids = {j.name: f"{pipeline_id}-{j.name}" for j in jobs}
            out.append([
                JobRecord(id=ids[j.name], pipeline_id=pipeline_id, name=j.name, kind=j.kind, state=JobState.PENDING,
                          priority=j.priority,
                          depends_on=[ids.get(d, d) for d in j.depends_on] or [dependency_job(a) for a in after],
                          config=to_dict(j), created_at=now, wandb={"group": group}, sweep=tag, user=user,
                          queue=queue)
                for j in jobs
            ])
        capacity, spec = self.capacity(), self.queues().teams[queue]
        for r in (r for records in out for r in records):
            why = None if r.config["cluster"].get("autoscaling") else never_fits(r, capacity)
            why = why or never_fits_queue(r, spec)
            if why:
                raise ClusterError(why)
        self.store.add([r for records in out for r in records])
        self.triggers.pin([r for records in out for r in records])
        return out

    # ------------------------------------------------------------------------------------ step
    def step(self, job_ids: list[str]) -> bool:
        """One pass of the loop over `job_ids`. Returns True while any of them is not terminal. The
        jobs that checkpoint triggers among them start are added to `job_ids` (the list given)."""
        self.triggers.step(job_ids)
        self._admit(job_ids)
        ended = False
        for job_id, handle in list(self.handles.items()):
            record = self.store.get(job_id)
            ended |= self._observe(record, self.launcher.poll(handle, record.last_event_seq))
        if ended:  # its dependents, and the jobs waiting for its workers, start now rather than a pass later
            self._admit(job_ids)
        return any(not j.state.terminal for j in self.store.get_many(job_ids))

    def _admit(self, job_ids: list[str]) -> None:
        self._decide_dependencies(job_ids)
        jobs = self.store.get_many(job_ids)
        queues, now = self.queues(), self.clock()
        if self._enforce_deadlines(jobs, queues, now):
            jobs = self.store.get_many(job_ids)
        usage = self._usage(jobs, queues, now)
        autoscaling = any(j.config["cluster"].get("autoscaling") for j in jobs)
        result = admit(jobs, self._room(now), queues, usage, now, autoscaling=autoscaling, explain=False)
        for d in result.decisions:
            record = self.store.transition(d.job_id, d.state, d.reason)
            self.say(f"{d.job_id}: STARTING" + (f" ({d.reason})" if d.reason.startswith("backfilled") else ""))
            # launched before (then retried, or preempted): it continues from its last committed checkpoint
            self._launch(record, AttemptReason.RESUME if record.launches else AttemptReason.FIRST)
        if result.blocker:  # (victims are chosen on the records as this pass left them)
            self._preempt(result.blocker, job_ids, queues, now)

    def _usage(self, jobs: list[JobRecord], queues: QueuesConfig, now: float) -> Usage:
        """The fair-share ledger advanced to `now` by the workers each queue holds (persisted)."""
        held = {q: use.get("workers", 0.0) for q, use in queue_in_use(jobs).items()}
        usage = advance_usage(Usage.from_json(self.store.get_setting(USAGE_SETTING)), held, now, queues.half_life_s)
        self.store.put_setting(USAGE_SETTING, usage.to_json())
        return usage

    def _preempt(self, blocker_id: str, job_ids: list[str], queues: QueuesConfig, now: float) -> None:
        """Ask the victims that free room for the blocker with the least lost work to commit and stop
        (one preemption at a time: the next waits until its victims have stopped)."""
        jobs = self.store.get_many(job_ids)
        if any((j.requested or {}).get("action") == Action.PREEMPT for j in jobs):
            return
        blocker = next(j for j in jobs if j.id == blocker_id)
        chosen = choose_victims(blocker, jobs, self._room(now), queues, now)
        if chosen is None or any(v not in self.handles for v in chosen.victims):
            return
        self.say(f"{blocker_id}: {chosen.reason}")
        for victim in chosen.victims:
            record = self.store.get(victim)
            request = {"action": Action.PREEMPT.value, "id": f"preempt-{len(record.history)}", "for": blocker_id,
                       "deadline": now + queues.preempt_deadline_s}
            self.store.update(victim, requested=request)  # persisted before it is acted on
            self.launcher.request_stop(self.handles[victim], request)
            self.say(f"{victim}: preempting for {blocker_id}: checkpointing the current step (within "
                     f"{queues.preempt_deadline_s:g} s), then stopping; it waits at its place in the queue")

    def _enforce_deadlines(self, jobs: list[JobRecord], queues: QueuesConfig, now: float) -> bool:
        """A victim that did not stop by its deadline is stopped anyway: it resumes from its previous
        commit. True if one was."""
        stopped = False
        for r in jobs:
            request = r.requested or {}
            if request.get("action") != Action.PREEMPT or not r.state.active or now <= request["deadline"]:
                continue
            self._drop(r.id)
            why = (f"preempted for {request['for']}: no checkpoint within {queues.preempt_deadline_s:g} s, stopped "
                   f"anyway; resumes from its previous commit")
            self.store.transition(r.id, JobState.PREEMPTED, why, requested=None, preemptions=r.preemptions + 1)
            self.say(f"{r.id}: PREEMPTED: {why}")
            stopped = True
        return stopped

    def polls(self) -> list[tuple[object, int]]:
        """(runner handle, last event applied) of each job this controller drives."""
        return [(handle, self.store.get(job_id).last_event_seq) for job_id, handle in list(self.handles.items())]

    def wait(self, timeout: float, polls: list[tuple[object, int]] | None = None) -> None:
        """Between passes: sleep up to `timeout` s, waking as soon as a job's state changes in its
        runner (a job ends: its dependents start at once, not a pass later)."""
        self.launcher.wait(self.polls() if polls is None else polls, timeout)

    def _decide_dependencies(self, job_ids: list[str]) -> None:
        jobs = self.store.get_many(job_ids)
        known = {j.id for j in jobs}
        for d in sorted({d for j in jobs for d in j.depends_on if d not in known}):
            try:
                jobs.append(self.store.get(d))
            except OrchError:
                pass  # dependency_decisions blocks the job and names the missing id
        for d in dependency_decisions(jobs):
            self.store.transition(d.job_id, d.state, d.reason)
            self.say(f"{d.job_id}: {d.state.value} ({d.reason})")

    def _launch(self, record: JobRecord, reason: AttemptReason) -> None:
        """Start a new runner for the job; its launch number and event position are persisted first."""
        try:
            init_from = self._init_from(record)
        except OrchError as e:
            self._end(record, JobState.FAILED, str(e), failure_reason=str(e))
            return
        record = self.store.update(record.id, launches=record.launches + 1, last_event_seq=0)
        self.handles[record.id] = self.launcher.start(record, init_from, reason)
        self._tell_runner(record.id, 0)

    def recover(self) -> None:
        """After a controller (re)start: re-attach to the runners of the jobs that were active (and
        re-send a stop the user asked for), and restart from their last committed checkpoint those
        whose runner is gone."""
        for record in self.store.list():
            if not record.state.active or record.id in self.handles:
                continue
            handle = self.launcher.attach(record)
            if handle is None:
                self._relaunch(record, "the controller restarted and the job's worker group was gone", failure=False)
                continue
            self.handles[record.id] = handle
            self.say(f"{record.id}: re-attached to its running worker group")
            self._tell_runner(record.id, record.last_event_seq)
            if record.requested:
                self.launcher.request_stop(handle, record.requested)  # the runner ignores one it has seen

    def _relaunch(self, record: JobRecord, why: str, failure: bool = True) -> None:
        """Start a job again from its last committed checkpoint (the train loop resumes there). A
        runner lost while the controller was away (a head restart) does not count as a failure."""
        decision = restart_decision(record, why, failure)
        if decision.state is not JobState.RESTARTING:
            failed = decision.state is JobState.FAILED
            self._end(record, decision.state, decision.reason, failure_reason=why if failed else None)
            return
        # A new runner starts at the config's (possibly just scaled) size: no scale is pending then.
        fields = {"restarts": record.restarts + int(failure), "requested": None}
        if record.state is not JobState.RESTARTING:
            record = self.store.transition(record.id, JobState.RESTARTING, decision.reason, **fields)
        else:
            record = self.store.update(record.id, **fields)
        self.say(f"{record.id}: RESTARTING ({why})")
        self._launch(record, AttemptReason.RELAUNCH)

    def _end(self, record: JobRecord, state: JobState, reason: str, **fields) -> None:
        self.store.transition(record.id, state, reason, requested=None, **fields)
        self.say(f"{record.id}: {state.value}" + (f": {reason}" if state is not JobState.SUCCEEDED else ""))
        self._drop(record.id)

    def _drop(self, job_id: str) -> None:
        handle = self.handles.pop(job_id, None)
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
            request = {"action": Action.CANCEL.value, "id": f"cancel-{len(record.history)}"}
            self.store.update(job_id, requested=request)  # persisted before it is acted on
            self.launcher.request_stop(handle, request)
            self.say(f"{job_id}: cancelling: checkpointing the current step, then stopping")
        return self.store.get(job_id)

    def scale(self, job_id: str, workers: int) -> JobRecord:
        """Restart a running job at `workers` workers from a checkpoint of its current step."""
        record = self.store.get(job_id)
        why = scale_refusal(record, workers, self.store.list(), self.capacity())
        if why is None and job_id not in self.handles:
            why = f"job {job_id} has no running worker group to scale yet"
        if why:
            raise ClusterError(why)
        new = dict(record.config, workers=workers)
        if self.validate is not None:
            try:
                self.validate(new)
            except (OrchError, ValueError) as e:
                raise ClusterError(f"cannot scale {job_id} to {workers} workers: {e}") from None
        old = record.workers
        request = {"action": Action.SCALE.value, "workers": workers, "id": f"scale-{len(record.history)}", "job": new}
        self.store.update(job_id, config=new, requested=request)
        self.store.transition(job_id, JobState.RESTARTING, f"scaling from {old} to {workers} workers")
        self.launcher.request_stop(self.handles[job_id], request)
        self.say(f"{job_id}: scaling from {old} to {workers} workers: checkpoint, then restart from it")
        return self.store.get(job_id)

    def retry(self, job_id: str, reason: str = "retried by the user") -> JobRecord:
        """Queue a FAILED or CANCELLED job again, and the dependents it BLOCKED: it continues from its
        last committed checkpoint (its run's newest), with its whole failure budget again."""
        record = self.store.get(job_id)
        why = retry_refusal(record)
        if why:
            raise ClusterError(why)
        start = checkpoint_name(record.checkpoint) if record.checkpoint else "the start"
        record = self.store.transition(job_id, JobState.PENDING, f"{reason}: continues from {start}",
                                       failure_reason=None, failure_detail=None, requested=None, restarts=0,
                                       attempt={})
        self.say(f"{job_id}: PENDING ({reason}; continues from {start})")
        for dep in blocked_dependents(job_id, self.store.list()):
            self.store.transition(dep, JobState.PENDING, f"its dependency {job_id} was retried")
            self.say(f"{dep}: PENDING (its dependency {job_id} was retried)")
        return record

    def resume(self, pipeline_id: str, reason: str) -> list[JobRecord]:
        """Continue a pipeline whose driver is gone: every job of it that did not succeed is queued
        again (`retry`); a job still recorded as running (its `orch run` vanished) is first recorded
        as ended. Returns all the pipeline's jobs."""
        for r in self.store.list(pipeline_id):
            if not r.state.terminal:
                self.store.transition(r.id, JobState.CANCELLED, ORPHANED, failure_reason=ORPHANED)
        for r in self.store.list(pipeline_id):
            if r.state in (JobState.FAILED, JobState.CANCELLED):
                self.retry(r.id, reason)
        return self.store.list(pipeline_id)

    def _init_from(self, record: JobRecord) -> str | None:
        """The job's own `init_from`, else the exported weights of the first dependency that has them
        (fine-tuning starts there); none for a job from scratch."""
        if record.config.get("from_scratch"):
            return None
        if record.config.get("init_from"):
            return record.config["init_from"]
        for dep in record.depends_on:
            export = self.store.get(dep).export
            if export:
                return export
        if record.depends_on:  # never start from random weights by accident
            raise CheckpointError(f"job {record.id}: its dependencies succeeded but none exported weights "
                                  f"to start from")
        return None

    # ------------------------------------------------------------------------------ observe
    def _observe(self, record: JobRecord, poll: RunnerPoll) -> bool:
        """Apply what the job's runner said; True when the job ended or gave its workers back."""
        if poll.status is RunnerStatus.LOST:
            self._drop(record.id)  # frees what its worker group still holds
            self._relaunch(record, poll.reason or "the job's runner died")
            return True
        blamed: list[dict] = []  # the failures and stragglers these events added: they may blame nodes
        last = record.last_event_seq
        for change in apply_events(record, poll.events):
            self._apply(record.id, change)
            last = change.seq
            blamed += [change.fields[k][-1] for k in ("failures", "stragglers") if change.fields.get(k)]
            if change.ends or change.state is JobState.PREEMPTED:  # (a preempted job's runner has stopped)
                self._drop(record.id)
                self._blame(record, blamed)
                return True
        if blamed:
            self._blame(record, blamed)
            self._tell_runner(record.id, last)  # its next worker group waits for this word
        return False

    def _apply(self, job_id: str, change: Change) -> JobRecord:
        """Persist one change together with its event's sequence number, then say it."""
        fields = dict(change.fields, last_event_seq=change.seq)
        if change.state is not None:
            record = self.store.transition(job_id, change.state, change.reason, **fields)
        else:
            record = self.store.update(job_id, **fields)
        if change.say:
            self.say(f"{job_id}: {change.say}")
        return record

    def abandon(self, job_ids: list[str], reason: str) -> None:
        """Mark every non-terminal job of `job_ids` CANCELLED (the process driving them is stopping)."""
        for job_id in job_ids:
            record = self.store.get(job_id)
            if not record.state.terminal:
                self.store.transition(job_id, JobState.CANCELLED, reason, failure_reason=reason)

    def run(self, job_ids: list[str], poll_s: float = 1.0,
            watch: Callable[[list[JobRecord]], None] | None = None) -> list[JobRecord]:
        """Step until every job in `job_ids` is terminal; their final records. `watch` sees the
        records after each pass (orch run's progress bars)."""
        while True:
            going = self.step(job_ids)
            if watch is not None:
                watch(self.store.get_many(job_ids))
            if not going:
                return [self.store.get(i) for i in job_ids]
            self.wait(poll_s)

    # -------------------------------------------------------------------------- quarantine
    def quarantine_state(self) -> QuarantineState:
        return stored_quarantine(self.store)

    def quarantined(self) -> list[dict]:
        """The nodes kept out of placement now (`orch nodes`, `orch status`)."""
        return self.quarantine_state().active(self.clock())

    def _room(self, now: float) -> dict[str, float]:
        """The cluster's capacity without its quarantined nodes (admission counts only where workers go)."""
        capacity, state = self.capacity(), self.quarantine_state()
        if self.nodes is None or not state.active(now):
            return capacity
        out = excluded(state, self.nodes(), now)
        return {k: max(0.0, v - out.get(k, 0.0)) for k, v in capacity.items()}

    def _blame(self, record: JobRecord, failures: list[dict]) -> None:
        """The nodes the job's new failures name: each may be quarantined now (orchestrator.jobs.quarantine),
        under the quarantine config of this job; the runners are told at once."""
        if self.nodes is None:
            return
        config = build(QuarantineConfig, record.config["cluster"].get("quarantine") or {}, "cluster.quarantine")
        new = [b for f in failures for b in blames_of(f, record.id, config)]
        if not new:
            return
        jobs = [j for j in self.store.list() if not j.state.terminal]
        verdict = decide(self.quarantine_state(), new, config, self.clock(), self.nodes(), jobs)
        self.store.put_setting(QUARANTINE_SETTING, verdict.state.to_json())  # persisted before it is acted on
        for line in verdict.lines:
            self.say(f"{record.id}: {line}")
        if verdict.quarantined:
            self._tell_runners()

    def release_node(self, name: str) -> dict:
        """`orch nodes release NODE`: the node may take workers again; the runners are told at once."""
        node = release_stored(self.store, name, self.clock())
        self.say(f"node {node['node_id'][:8]} ({node['node']}) released from quarantine by the user")
        self._tell_runners()
        return node

    def _tell_runners(self) -> None:
        """Every running job's runner: the quarantined nodes changed (read once for all of them)."""
        nodes = {n["node_id"]: n["until"] for n in self.quarantined()}
        for job_id in list(self.handles):
            self._tell_runner(job_id, None, nodes)

    def _tell_runner(self, job_id: str, upto: int | None, nodes: dict[str, float] | None = None) -> None:
        """Send the job's runner the quarantined nodes ({node id: until}; read now unless given); `upto`:
        the last of its events applied (None: unchanged)."""
        handle = self.handles.get(job_id)
        if self.nodes is None or handle is None:
            return
        if nodes is None:
            nodes = {n["node_id"]: n["until"] for n in self.quarantined()}
        try:
            self.launcher.exclude(handle, nodes, upto)
        except Exception as e:  # noqa: BLE001 - a runner gone: the next poll finds it lost
            self.say(f"{job_id}: could not tell its runner the quarantined nodes ({e})")


def stored_quarantine(store: JobStore) -> QuarantineState:
    """The quarantine as the job store keeps it (shared by every job; `orch run`'s state folder too)."""
    return QuarantineState.from_json(store.get_setting(QUARANTINE_SETTING))


def release_stored(store: JobStore, name: str, now: float) -> dict:
    """Release a node (its id, a prefix or its address) in the stored quarantine; the node released."""
    state, node = release(stored_quarantine(store), name, now)
    store.put_setting(QUARANTINE_SETTING, state.to_json())
    return node
