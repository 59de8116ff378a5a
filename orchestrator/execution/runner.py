"""One job's driver, as a Ray actor: prepares its data, runs its worker groups, exports the weights,
and tells the controller what happened as typed, sequence-numbered events.

Under the persistent controller it is a named, detached actor (`orch-job-<id>`): it outlives a
controller crash, a restarted controller re-attaches to it by name and reads the events it has not
applied yet, and the name guarantees one runner per job. When it dies, Ray tears down the worker
group it owns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import traceback

import ray
from ray.util.placement_group import remove_placement_group

from orchestrator.checkpoint.layout import latest_committed, run_uri
from orchestrator.config.compose import job_config_from_dict
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.constants import EVAL_RESULT, HISTORY_POLL_S, QUARANTINE_WAIT_S, TRAINER_STATE
from orchestrator.data.prepare import prepared_dataset
from orchestrator.errors import CheckpointError, FailureClass, OrchError, StorageError
from orchestrator.execution import preflight
from orchestrator.execution.failures import Failure, RestartBudget, classify, own_error, worker_error_message
from orchestrator.execution.failures import retryable as failure_retryable
from orchestrator.execution.prepare_once import prepare_dataset_once
from orchestrator.execution.tracking import ArtifactRef, WandbSink, export_job_id, redact
from orchestrator.execution.watchdog import StallPolicy, Watchdog
from orchestrator.jobs.events import Action, AttemptReason, EventKind, RunnerEvent
from orchestrator.jobs.record import JobRecord, wandb_group
from orchestrator.storage import join_uri
from orchestrator.train.heartbeat import Beat
from orchestrator.train.history import read_history
from orchestrator.train.reports import CheckpointCommitted, EngineReady, Evaluated, Progress, Report, StragglerFound
from orchestrator.workspace import open_job_store

log = logging.getLogger(__name__)

RUNNER_PREFIX = "orch-job-"
WATCHDOG_POLL_S = 1.0  # how often the runner's watchdog looks for a stall


_STATE_EVENTS = frozenset({EventKind.ATTEMPT_STARTED, EventKind.RESTART_DECIDED, EventKind.ENGINE_READY,
                           EventKind.STOPPED, EventKind.SUCCEEDED, EventKind.FAILED})


def _engine_ready(r: EngineReady, attempt: int) -> tuple[EventKind, dict]:
    return EventKind.ENGINE_READY, dict(attempt=attempt, resumed_from=r.resumed_from, step=r.step,
                                        skipped=list(r.skipped), universal=r.universal)


def _checkpoint_committed(r: CheckpointCommitted, attempt: int) -> tuple[EventKind, dict]:
    return EventKind.CHECKPOINT_COMMITTED, dict(uri=r.uri, step=r.step)


def _metrics(r: Progress | Evaluated, attempt: int) -> tuple[EventKind, dict]:
    """Every field, under its own name: the record's metric keys (jobs.lifecycle.PROGRESS_METRICS)."""
    return EventKind.PROGRESS, dict(metrics={f.name: getattr(r, f.name) for f in dataclasses.fields(r)})


def _straggler(r: StragglerFound, attempt: int) -> tuple[EventKind, dict]:
    return EventKind.STRAGGLER, dict(rank=r.rank, ratio=r.ratio, step=r.step, window=r.window)


# Rank 0's report (orchestrator.train.reports) -> the event the controller applies: one handler per class.
REPORT_EVENTS = {EngineReady: _engine_ready, CheckpointCommitted: _checkpoint_committed, Progress: _metrics,
                 Evaluated: _metrics, StragglerFound: _straggler}


def report_event(report: Report, attempt: int) -> tuple[EventKind, dict]:
    """The event kind and data for one report of rank 0, during worker group `attempt`."""
    handler = REPORT_EVENTS.get(type(report))
    if handler is None:
        raise TypeError(f"rank 0 sent a {type(report).__name__}, which the job's runner has no handler for "
                        f"(orchestrator.execution.runner.REPORT_EVENTS)")
    return handler(report, attempt)


class _EventLog:
    """The runner's append-only event list (thread-safe); sequence numbers start at 1."""

    def __init__(self):
        self.lock = threading.Condition()
        self.events: list[RunnerEvent] = []

    def emit(self, kind: EventKind, **data) -> int:
        """Append one event; its sequence number."""
        with self.lock:
            self.events.append(RunnerEvent(len(self.events) + 1, kind, data, time.time()))
            self.lock.notify_all()
            return len(self.events)

    def after(self, seq: int) -> list[RunnerEvent]:
        with self.lock:
            return self.events[seq:]

    def wait(self, seq: int, timeout: float) -> bool:
        """Block until an event after `seq` changes the job's state (not a log line, progress or a
        checkpoint: rank 0 reports every step), or `timeout` seconds; whether one did."""
        with self.lock:
            return self.lock.wait_for(lambda: any(e.kind in _STATE_EVENTS for e in self.events[seq:]), timeout)


class _Feed:
    """Feeds the job's W&B run from its metrics history in the store (a thread of the runner), and
    tells the controller where the run is."""

    def __init__(self, job: JobConfig, run: str, sink: WandbSink, emit):
        self.store, self.run, self.sink, self.emit = open_job_store(job), run, sink, emit
        self.told: dict = {}
        self.parts: dict[str, list[dict]] = {}  # history parts read so far (each poll fetches only new ones)
        self.stop = threading.Event()
        self.warned = False
        self.thread = threading.Thread(target=self._loop, name="orch-wandb-feed", daemon=True)
        self.thread.start()

    def _rows(self) -> list[dict] | None:
        try:
            return read_history(self.store, self.run, self.parts)["rows"]
        except Exception as e:  # noqa: BLE001 - read again at the next poll
            if not self.warned:
                log.warning("could not read the metrics history of %s: %s", self.run, e)
                self.warned = True
            return None

    def _tell(self) -> None:
        info = self.sink.info()
        if info != self.told:
            self.told = info
            self.emit(EventKind.PROGRESS, wandb=info)

    def _loop(self) -> None:
        while not self.stop.wait(HISTORY_POLL_S):
            rows = self._rows()
            if rows:
                self.sink.update(rows)
                self._tell()

    def close(self, outputs: tuple[ArtifactRef, ...] = (), exit_code: int = 0, results: dict | None = None) -> None:
        self.stop.set()
        self.thread.join()
        self.sink.finish(self._rows() or [], outputs, exit_code, results)
        self._tell()


class JobRunner:
    """The controller polls `events()`; rank 0 sends its reports to `report()` and polls `control()`
    every step; Ray Train's controller tells `decision()` why it starts the next worker group."""

    def __init__(self, record: dict, init_from: str | None, reason: str, ray_storage: str | None,
                 coordinator: bool = True):
        self.record = JobRecord.from_json(record)
        self.init_from = init_from
        self.ray_storage = ray_storage
        self.coordinator = coordinator  # (RayLauncher)
        self.log = _EventLog()
        self.lock = threading.Lock()
        self.next_reason: AttemptReason | None = AttemptReason(reason)  # of the next worker group
        self.world_size: int | None = None
        self.attempts = 0
        self.stop: dict | None = None  # the pending request: {"action": "cancel" | "preempt" | "scale", "id", "job"}
        self.seen_requests: set[str] = set()
        self.placement_groups: list = []
        self.coordinator_requests: list[str] = []  # "train-<run id>" of each Ray Train run
        self.feed: _Feed | None = None  # the W&B run, fed from the history (tracking on)
        self.watchdog: Watchdog | None = None  # every rank's heartbeat -> a stall (once the job's config is built)
        self.ended = threading.Event()
        self.seen = failures_of_this_run(self.record)  # the judge's memory (a relaunched runner keeps it)
        self.stalled: Failure | None = None  # the stall just handled: the next failure Ray Train sees is it
        self.refusal: str | None = None  # why the judge refused a restart (the job's one-line reason)
        # the quarantined nodes as the controller last said ({node id: until}), the last of our events it
        # had applied then, and our last event that may blame a node (a failure, a stall, a straggler)
        self.quarantine = threading.Condition()
        self.excluded: dict[str, float] = {}
        self.told_upto, self.blame_seq = -1, 0
        self.group_nodes: dict[int, tuple[str, str]] = {}  # rank -> (node id, address) of the latest worker group
        self.thread = threading.Thread(target=self._run, name=f"job-{self.record.id}", daemon=True)
        self.thread.start()

    # --------------------------------------------------------------------- called by rank 0
    def report(self, report: Report) -> None:
        """One typed report of rank 0 (orchestrator.train.reports) becomes one event for the
        controller (a new worker group calls `begin_attempt` first)."""
        kind, data = report_event(report, self.attempts)
        if kind is not EventKind.STRAGGLER:
            self.log.emit(kind, **data)
            return
        with self.lock:  # (rank 0 does not know the other ranks' nodes; their heartbeats do)
            data["node"] = self.watchdog.last_seen()[1].get(data["rank"]) if self.watchdog is not None else None
            data["node_id"] = self.watchdog.node_ids().get(data["rank"]) if self.watchdog is not None else None
        self._blamed(self.log.emit(kind, **data))  # (a straggler may blame its node: orchestrator.jobs.quarantine)

    def begin_attempt(self, world_size: int) -> str:
        """Rank 0 of a new worker group: the attempt is recorded; returns why it started."""
        return self._attempt_started(world_size).value

    def _attempt_started(self, world_size: int) -> AttemptReason:
        with self.lock:
            self.attempts += 1
            reason = self.next_reason
            if reason is None:  # Ray Train said nothing (another Ray): judge from the size
                elastic = bool(self.record.config.get("max_workers"))
                reason = AttemptReason.RESIZE if elastic and world_size != self.world_size else AttemptReason.FAILURE
            self.next_reason, self.world_size = None, world_size
            attempt = self.attempts
        self.log.emit(EventKind.ATTEMPT_STARTED, attempt=attempt, reason=reason.value, world_size=world_size)
        return reason

    def worker_nodes(self, nodes: dict[int, tuple[str, str]]) -> None:
        """Each rank's (node id, address) in the worker group just started (ReportWorkerNodes)."""
        with self.lock:
            self.group_nodes = dict(nodes)

    def heartbeat(self, beat: Beat) -> None:
        """Every rank's step and phase, about once a second (orchestrator.train.heartbeat)."""
        with self.lock:
            if self.watchdog is not None:
                self.watchdog.beat(beat, time.time())

    def control(self) -> str | None:
        """'stop' once a stop was requested: every rank checkpoints the current step and returns."""
        return "stop" if self.stop else None

    # ------------------------------------------------------ called by Ray Train's controller
    def decision(self, kind: str) -> None:
        """Why Ray Train starts the next worker group: 'failure' (a retry) or 'resize'. A resize
        decision also starts every group we start ourselves; then the reason is already set."""
        with self.lock:
            if self.watchdog is not None:
                self.watchdog.disarm()  # the group is being replaced: the next one is watched from its first beat
            if kind == "failure":
                self.next_reason = AttemptReason.FAILURE
                last = self.seen[-1] if self.seen else None
                self.log.emit(EventKind.RESTART_DECIDED, **({"class": last.cls.value, "ranks": list(last.ranks),
                                                             "nodes": list(last.nodes)} if last else {}))
            elif self.next_reason is None:
                self.next_reason = AttemptReason.RESIZE

    def coordinator_request(self, requester: str) -> None:
        """The run's request to Ray's AutoscalingCoordinator (from a Ray Train callback)."""
        self.coordinator_requests.append(requester)
        self.log.emit(EventKind.COORDINATOR_REQUEST, requester=requester)

    def placement_group(self, pg) -> None:
        """The placement group of the worker group now running (from a Ray Train callback)."""
        self.placement_groups.append(pg)
        self.log.emit(EventKind.WORKER_GROUP_PLACED, placement_group=pg.id.hex())

    def placement_exclusions(self, wait_s: float = QUARANTINE_WAIT_S) -> list[str]:
        """The nodes the next worker group must avoid (AvoidQuarantinedNodes asks before each group):
        first, up to `wait_s`, until the controller has judged our last failure, so a node that failure
        gets quarantined is already avoided by the group that follows it."""
        with self.quarantine:
            judged = self.quarantine.wait_for(lambda: self.told_upto >= self.blame_seq, wait_s)
            now = time.time()
            nodes = sorted(k for k, until in self.excluded.items() if until > now)
        if not judged:
            self._say(f"the controller did not say within {wait_s:g} s whether the last failure quarantines a "
                      f"node; the worker group is placed without that")
        return nodes

    def _blamed(self, seq: int) -> None:
        with self.quarantine:
            self.blame_seq = max(self.blame_seq, seq)

    # --------------------------------------------------------------- called by the controller
    def exclude_nodes(self, nodes: dict[str, float], upto: int | None) -> None:
        """The quarantined nodes ({node id: until}); `upto`: the last of our events the controller applied."""
        with self.quarantine:
            self.excluded = dict(nodes)
            if upto is not None:
                self.told_upto = max(self.told_upto, upto)
            self.quarantine.notify_all()

    def events(self, after_seq: int) -> list[RunnerEvent]:
        return self.log.after(after_seq)

    def wait_events(self, after_seq: int, timeout: float) -> bool:
        """Answers once an event after `after_seq` changes the job's state (or after `timeout` s):
        the controller sleeps on this between its passes, so it sees a job end at once, not a pass
        later."""
        return self.log.wait(after_seq, timeout)

    def request_stop(self, request: dict) -> None:
        """Cancel or scale; a request seen before (the controller re-sends after a restart) is ignored."""
        with self.lock:
            if request["id"] not in self.seen_requests:
                self.seen_requests.add(request["id"])
                self.stop = request

    def ping(self) -> int:
        return os.getpid()

    def release(self) -> int:
        """Before this runner is killed: free its worker group's resources at once."""
        freed = 0
        for pg in self.placement_groups:
            try:
                remove_placement_group(pg)
                freed += 1
            except Exception:  # noqa: BLE001 - already removed
                pass
        self.placement_groups.clear()
        cancel_coordinator_requests(self.coordinator_requests)
        self.coordinator_requests.clear()
        return freed

    # ------------------------------------------------------------------------------ the run
    def _say(self, line: str) -> None:
        self.log.emit(EventKind.LOG, line=line)

    def _job(self, config: dict) -> JobConfig:
        """The job's config, built once from its record's (a dict: the controller's durable record
        stores JSON); from here on it travels as this dataclass, to Ray tasks and to every worker."""
        job = job_config_from_dict(config)
        if job.data.kind == "sft" and not job.data.tokenizer_uri and self.init_from:
            # queued behind a job (`--after`): the data is tokenized with the weights' own tokenizer
            job = dataclasses.replace(job, data=dataclasses.replace(job.data, tokenizer_uri=self.init_from))
        return job

    def _run(self) -> None:
        # Ray Train and torch take seconds to import: in the background, while W&B opens and the
        # dataset is checked, instead of on the way to the first worker group.
        threading.Thread(target=_import_ray_train, name="import-ray-train", daemon=True).start()
        try:
            job = self._job(self.record.config)
            self._start_watchdog(job)
            self._start_feed(job)
            self._prepare(job)
            if job.kind == "eval":
                self._evaluate(job)
            else:
                self._fit_until_done(job)
        except OrchError as e:
            self._close_feed(exit_code=1)
            self.log.emit(EventKind.FAILED, reason=str(e), retryable=False)
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's reason
            log.debug("job %s failed", self.record.id, exc_info=True)
            self._close_feed(exit_code=1)
            retryable = failure_retryable(e) and not self.refusal
            self.log.emit(EventKind.FAILED, reason=self.refusal or worker_error_message(e), retryable=retryable,
                          traceback=traceback.format_exc())
        finally:
            self.ended.set()

    # ----------------------------------------------------------------------------- hangs
    def _start_watchdog(self, job: JobConfig) -> None:
        """The watchdog over the ranks' heartbeats, and the thread that asks it every second."""
        tr = job.trainer
        self.watchdog = Watchdog(StallPolicy(
            timeout_s=tr.stall_timeout_s, floor_s=tr.stall_floor_s, factor=tr.stall_factor,
            checkpoint_timeout_s=job.checkpoint.commit_timeout_s, silence_s=max(3 * tr.heartbeat_interval_s, 2.0)))
        threading.Thread(target=self._watch, args=(job,), name="orch-watchdog", daemon=True).start()

    def _watch(self, job: JobConfig) -> None:
        while not self.ended.wait(WATCHDOG_POLL_S):
            with self.lock:
                stall = self.watchdog.check(time.time())
                if stall is not None:
                    self.watchdog.disarm()  # handled once
            if stall is not None:
                try:
                    self._handle_stall(job, stall)
                except Exception:  # noqa: BLE001 - the watchdog goes on for the next group
                    log.exception("could not handle the stall of job %s", self.record.id)

    def _judge(self, error: BaseException) -> str | None:
        """Ray Train's failure policy asks (orchestrator.execution.train_extensions.FailFast): the failure
        is classified and recorded; a line when the job must not restart (a storm, a class over budget)."""
        with self.lock:
            stalled, self.stalled = self.stalled, None
            steps, nodes = self.watchdog.last_seen() if self.watchdog is not None else ({}, {})
            # where each rank ran, as the group's start said (the heartbeats may be an older group's, when
            # this one died before its first beat)
            node_ids = {**(self.watchdog.node_ids() if self.watchdog is not None else {}),
                        **{r: n for r, (n, _) in self.group_nodes.items()}}
            nodes = {**nodes, **{r: ip for r, (_, ip) in self.group_nodes.items()}}
            failure = classify(error, steps, nodes, stalled, node_ids)
            tr = self._job(self.record.config).trainer
            budget = RestartBudget({k: v for k, v in tr.max_restarts_per_class.items() if v is not None},
                                   tr.same_failure_limit)
            refusal = budget.refusal(self.seen, failure)
            self.seen.append(failure)
            self.refusal = self.refusal or refusal
        if failure.cls is not FailureClass.STALL:  # (a stall was told when it was found)
            self._blamed(self.log.emit(EventKind.WORKER_FAILED, **failure.to_json(time.time())))
        return refusal

    def _handle_stall(self, job: JobConfig, stall) -> None:
        """Name the stuck ranks, keep every rank's stacks, kill the stuck ones: Ray Train restarts the
        group from the last commit (a failure like a crash)."""
        from orchestrator.execution.hangs import handle_stall

        line = stall.line()
        self._say(f"stall: {line}")
        folder = join_uri(run_uri(job.storage.root, self.record.id), "hangs", stall.group)
        stuck = sorted(stall.stuck, key=lambda r: r.rank)
        with self.lock:
            nodes = tuple(sorted({r.node for r in stuck}))
            node_ids = tuple(sorted({r.node_id for r in stuck}))
            self.stalled = Failure(FailureClass.STALL, tuple(r.rank for r in stuck), nodes, stall.step, line, node_ids)
        killed = handle_stall(stall, open_job_store(job), folder)
        seq = self.log.emit(EventKind.STALLED, line=line, dumps=folder, killed=killed,
                            ranks=[r.rank for r in stuck], nodes=sorted({r.node for r in stuck}),
                            node_ids=list(node_ids), step=stall.step, phase=stuck[0].phase)
        self._blamed(seq)

    # --------------------------------------------------------------------------------- W&B
    def _start_feed(self, job: JobConfig) -> None:
        """The job's one W&B run (orchestrator.execution.tracking), unless tracking is off."""
        if job.tracking.backend == "none" or job.tracking.mode == "disabled":
            return
        rid = self.record.id
        parent, triggered = export_job_id(self.init_from), self.record.triggered
        uses = (ArtifactRef(f"model-{parent}", "model", self.init_from, {"job_id": parent}),) if parent else ()
        if triggered:  # started by a checkpoint of its source: that checkpoint (a version of its artifact)
            uses = (ArtifactRef(f"checkpoint-{triggered['source']}", "checkpoint", self.init_from,
                                {"job_id": triggered["source"], "step": triggered["step"]}),)
        facts = {"workers": job.workers, "max_workers": job.max_workers, "nodes": _alive_nodes(),
                 "accelerator": job.cluster.accelerator, "backend": job.cluster.backend,
                 "devices_per_worker": job.cluster.gpus_per_worker or job.cluster.cpus_per_worker,
                 "zero_stage": job.deepspeed.stage, "precision": job.deepspeed.precision}
        config = redact({**to_dict(job), "job_id": rid, "pipeline_id": self.record.pipeline_id,
                         "init_from": self.init_from, "cluster_facts": facts,
                         # (W&B charts a trigger's jobs against `source_step`: what pretraining had done)
                         **({"source_step": triggered["step"], "source_job": triggered["source"]}
                            if triggered else {})})
        sink = WandbSink(job.tracking, run_id=rid, name=f"{job.name}-{rid}", group=wandb_group(self.record),
                         job_type=job.kind, config=config, root_dir=job.tracking.dir or job.state_dir, uses=uses,
                         say=self._say)
        self.feed = _Feed(job, run_uri(job.storage.root, rid), sink, self.log.emit)

    def _close_feed(self, outputs: tuple[ArtifactRef, ...] = (), exit_code: int = 0,
                    results: dict | None = None) -> None:
        """The last rows, the outputs (and an eval job's results) into the W&B run, which is closed
        (before the job's end is told)."""
        feed, self.feed = self.feed, None
        if feed is not None:
            try:
                feed.close(outputs, exit_code, results)
            except Exception as e:  # noqa: BLE001 - W&B never fails a job
                self._say(f"W&B: could not close the run ({e})")

    def _prepare(self, job: JobConfig) -> None:
        """The job's dataset, then the checks that need it. A prepared dataset is only read here (its
        manifest); one still to prepare is prepared by the cluster's one preparer of its destination (an
        actor, on CPUs this runner does not hold)."""
        store = open_job_store(job)
        store.check(job.storage.root)
        lines: list[str] = []
        if prepared_dataset(store, job.data, progress=lines.append) is None:
            try:
                lines = prepare_dataset_once(job)
            except ray.exceptions.RayTaskError as e:  # a corpus file that cannot be read: its one line
                raise own_error(e) from None
        for line in lines:
            self._say(line)
        preflight.check_job_inputs(job, self.init_from)

    def _take_stop(self) -> dict | None:
        with self.lock:
            stop, self.stop = self.stop, None
            return stop

    def _fit_until_done(self, job: JobConfig) -> None:
        """Run worker groups until the job reaches max_steps, a cancel, or a failure; a scale
        request ends one group (after a checkpoint) and starts the next at the new size."""
        from orchestrator.execution.ray_train import fit  # (torch: only where a job runs, not in the controller)

        while True:
            stop = self._take_stop()
            if stop and stop["action"] in (Action.CANCEL, Action.PREEMPT):  # (both: commit, then stop)
                self._close_feed()
                self.log.emit(EventKind.STOPPED, checkpoint=self._final_state(job).get("uri"))
                return
            if stop and stop["action"] == Action.SCALE:
                job = self._job(stop["job"])  # the record's new config (the controller validated it)
                with self.lock:
                    self.next_reason = AttemptReason.SCALE
                self._say(f"restarting at {job.workers} workers from the last checkpoint")
            fit(self.record, job, self.init_from, self.ray_storage, self.coordinator, judge=self._judge)
            with self.lock:
                self.watchdog.disarm()
            state = self._final_state(job)
            if state.get("step") == job.trainer.max_steps:
                self._finish(job, state)
                return
            if not self.stop:
                raise CheckpointError(f"job {self.record.id} ended at step {state.get('step')} of "
                                      f"{job.trainer.max_steps} without a committed final checkpoint")
            self._say(f"stopped at step {state['step']} with a committed checkpoint ({self.stop['action']})")

    def _evaluate(self, job: JobConfig) -> None:
        """A job of kind eval: one worker group computes the numbers of the weights
        (orchestrator.train.evaluate) into the run's folder; they become the job's metrics. A cancel
        stops it (nothing to keep); a scale request is moot."""
        from orchestrator.execution.ray_train import fit  # (torch: only where a job runs, not in the controller)

        fit(self.record, job, self.init_from or job.init_from, self.ray_storage, self.coordinator)
        stop = self._take_stop()
        if stop and stop["action"] == Action.CANCEL:
            self._close_feed()
            self.log.emit(EventKind.STOPPED, checkpoint=None)
            return
        store = open_job_store(job)
        try:
            result = json.loads(store.get(join_uri(run_uri(job.storage.root, self.record.id), EVAL_RESULT)))
        except (StorageError, ValueError) as e:
            raise CheckpointError(f"eval job {self.record.id} ended without its results ({e})") from None
        metrics = {k: result.get(k) for k in ("eval_loss", "eval_perplexity", "qa_correct", "qa_questions")}
        metrics["step"] = result.get("step")
        said = [f"eval loss {metrics['eval_loss']:.4f}"] if metrics["eval_loss"] is not None else []
        if metrics["qa_questions"]:
            said.append(f"held-out QA exact match {metrics['qa_correct']}/{metrics['qa_questions']}")
        self._say(f"evaluated {result.get('weights')}: " + (", ".join(said) or "no metric"))
        self._close_feed(results={k: v for k, v in result.items() if k != "at"})
        self.log.emit(EventKind.SUCCEEDED, metrics=metrics)

    def _final_state(self, job: JobConfig) -> dict:
        """The committed checkpoint the worker group ended on (the store, not the best-effort stream)."""
        store, run = open_job_store(job), run_uri(job.storage.root, self.record.id)
        ref = latest_committed(store, run)
        if ref is None:
            return {}
        state = json.loads(store.get(join_uri(ref.uri, TRAINER_STATE)))
        return {**state, "uri": ref.uri, "ref_step": ref.step}

    def _finish(self, job: JobConfig, state: dict) -> None:
        """After the worker group ended well: export the final checkpoint's weights."""
        from orchestrator.execution.ray_train import export_weights  # (torch: only where a job runs)

        self._say(f"exporting the weights of {state['uri']}")
        export = export_weights(job, run_uri(job.storage.root, self.record.id), state["ref_step"], self.record.id)
        metrics = {"step": state.get("step"), "loss": state.get("last_loss"), "first_loss": state.get("first_loss"),
                   "eval_loss": state.get("eval_loss"), "tokens": state.get("tokens_seen"),
                   "qa_correct": state.get("qa_correct"), "qa_questions": state.get("qa_questions")}
        if state.get("qa_questions"):
            self._say(f"held-out QA exact match {state['qa_correct']}/{state['qa_questions']}")
        rid, meta = self.record.id, {"job_id": self.record.id, "step": state.get("step")}
        self._close_feed((ArtifactRef(f"model-{rid}", "model", export, meta),
                          ArtifactRef(f"checkpoint-{rid}", "checkpoint", state["uri"], meta)))
        self.log.emit(EventKind.SUCCEEDED, export=export, checkpoint=state["uri"], metrics=metrics)


def cancel_coordinator_requests(requesters: list[str]) -> None:
    """Cancel these requests to Ray's AutoscalingCoordinator (best effort: else they expire)."""
    if not requesters:
        return
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get([coordinator.cancel_request.remote(requester_id=r) for r in requesters], timeout=10)
    except Exception:  # noqa: BLE001 - they expire after 180 s
        log.warning("could not cancel the AutoscalingCoordinator requests %s", requesters, exc_info=True)


def failure_from_json(d: dict) -> Failure:
    """A failure as the job's record keeps it (`JobRecord.failures`)."""
    return Failure(FailureClass(d["class"]), tuple(d.get("ranks") or ()), tuple(d.get("nodes") or ()), d.get("step"),
                   d.get("line") or "")


def failures_of_this_run(record: JobRecord) -> list[Failure]:
    """The job's failures since its latest run was admitted: those before an `orch retry` (or `orch
    run --resume`) are not counted again (the user changed something); those before a relaunch of
    the runner in the same run are."""
    since = record.started_at() or 0.0
    return [failure_from_json(f) for f in record.failures if f.get("at", 0.0) >= since]


def _import_ray_train() -> None:
    try:
        import orchestrator.execution.ray_train  # noqa: F401
    except Exception:  # noqa: BLE001 - `fit` imports it again and reports what fails
        pass


def _alive_nodes() -> int | None:
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001 - a fact for the W&B config only
        return None
