"""Run one job as a Ray Train worker group (TorchTrainer + ScalingConfig + FailureConfig).

`RayLauncher.start` returns at once: a `JobRunner` actor prepares the job's data and runs
`TorchTrainer.fit()`; `poll` reads the progress that rank 0 streams to that actor.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.config.compose import job_config_from_dict
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.errors import DatasetError, OrchError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

log = logging.getLogger(__name__)


@dataclass
class Progress:
    status: str = "starting"  # starting | running | succeeded | failed | stopped (on request) | lost (runner died) | busy
    metrics: dict = field(default_factory=dict)
    checkpoint: str | None = None
    export: str | None = None
    wandb: dict = field(default_factory=dict)
    attempts: int = 0  # worker-group starts (restarts = attempts - 1)
    reason: str | None = None
    retryable: bool = True
    traceback: str | None = None  # of a failure, shown with --debug
    resumed: dict = field(default_factory=dict)  # the last resume: from, skipped (corrupt), universal, step
    ready_attempt: int = 0  # the latest attempt whose engine is built (and restored): it is training
    fits: int = 0  # worker groups the runner started on purpose (the first, and one per scale)
    fit_base: int = 0  # attempts made before the runner's latest worker group
    resizes: int = 0  # elastic resizes made by Ray Train (restarts that are no failure)


def worker_error_message(exc: BaseException) -> str:
    """One line from a Ray Train failure: the workers' own errors, merged over ranks."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        by_msg: dict[str, list[int]] = {}
        for rank, err in sorted(failures.items()):
            cause = getattr(err, "cause", None) or err
            text = str(cause).strip().splitlines()
            line = next((l for l in reversed(text) if l.strip()), type(cause).__name__)
            if isinstance(cause, OrchError):
                line = str(cause)
            by_msg.setdefault(f"{type(cause).__name__}: {line}" if not isinstance(cause, OrchError) else line, []).append(rank)
        return "; ".join(f"rank {', '.join(map(str, ranks))}: {msg}" for msg, ranks in by_msg.items())
    text = [l for l in str(exc).strip().splitlines() if l.strip()]
    return text[-1] if text else type(exc).__name__


def _prepare_remote():
    import ray

    @ray.remote(num_cpus=0)
    def prepare(job_dict: dict) -> list[str]:
        from orchestrator.data.prepare import ensure_dataset
        from orchestrator.workspace import open_job_store

        job = job_config_from_dict(job_dict)
        lines: list[str] = []
        ensure_dataset(open_job_store(job), job.data, progress=lines.append)
        return lines

    return prepare


def _export_remote():
    import ray

    @ray.remote(num_cpus=1)
    def export(job_dict: dict, run: str, step: int, job_id: str) -> str:
        from orchestrator.checkpoint.export import export_checkpoint
        from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri
        from orchestrator.workspace import local_scratch, open_job_store

        job = job_config_from_dict(job_dict)
        ref = CheckpointRef(step, checkpoint_uri(run, step), True)
        return export_checkpoint(open_job_store(job), run, ref, {"job_id": job_id, "kind": job.kind}, local_scratch(job_id))

    return export


def check_dataset_matches(job: JobConfig) -> None:
    """Fail before any worker starts if the dataset does not fit the model or the job."""
    from orchestrator.data.manifest import load_manifest
    from orchestrator.workspace import open_job_store

    manifest = load_manifest(open_job_store(job), job.data.uri)
    if manifest.vocab_size > job.model.vocab_size:
        raise DatasetError(
            f"dataset {job.data.uri} has a {manifest.vocab_size}-token tokenizer but model '{job.model.name}' has "
            f"vocab_size={job.model.vocab_size}; set model.vocab_size>={manifest.vocab_size} or prepare the data with a smaller vocabulary"
        )
    if manifest.seq_len != job.data.seq_len:
        raise DatasetError(
            f"dataset {job.data.uri} was prepared with seq_len={manifest.seq_len}, the job asks for data.seq_len={job.data.seq_len}; "
            f"use data.seq_len={manifest.seq_len} or a new data.name"
        )


def check_init_matches(job: JobConfig, init_from: str) -> None:
    """Fail before any worker starts if the weights to start from do not fit the job's model."""
    from orchestrator import artifacts

    source = artifacts.resolve(init_from, endpoint_url=job.storage.endpoint_url)
    theirs = artifacts.read_model_config(source)
    fields = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
    diff = [f"{f}={getattr(theirs, f)} (job: {getattr(job.model, f)})" for f in fields if getattr(theirs, f) != getattr(job.model, f)]
    if diff:
        from orchestrator.errors import CheckpointError

        raise CheckpointError(
            f"the model at {init_from} does not match model '{job.model.name}': {', '.join(diff)}; "
            f"choose the model preset (or model.* overrides) that matches it"
        )


RUNNER_PREFIX = "orch-job-"


class JobRunner:
    """One job's driver, as a Ray actor: prepares its data, runs `TorchTrainer.fit()` (again after a
    requested stop for a new worker count), exports the final weights, and holds the progress that
    rank 0 streams to it. The controller polls `snapshot()`; rank 0 polls `control()` every step.

    Under the persistent controller it is a named, detached actor (`orch-job-<id>`): it outlives a
    controller crash, a restarted controller re-attaches to it by name, and the name guarantees one
    runner per job. When it dies, Ray tears down the worker group it owns.
    """

    def __init__(self, record: dict, init_from: str | None, ray_storage: str | None):
        import os

        d = dict(record)
        d["state"] = JobState(d["state"])
        self.record = JobRecord(**d)
        self.init_from = init_from
        self.ray_storage = ray_storage
        self.lock = threading.Lock()
        self.data: dict = {"status": "starting", "attempts": 0, "ready_attempt": 0, "fits": 0, "resizes": 0, "lines": [],
                           "pid": os.getpid()}
        self.elastic = bool(self.record.config.get("max_workers"))
        self.stop: dict | None = None  # {"why": "cancel" | "scale", "job": new config for a scale}
        self.placement_groups: list = []
        self.thread = threading.Thread(target=self._run, name=f"job-{self.record.id}", daemon=True)
        self.thread.start()

    # --------------------------------------------------------------------- called by rank 0
    def update(self, fields: dict) -> None:
        with self.lock:
            if fields.get("event") == "attempt":
                previous = self.data.get("world_size")
                self.data["attempts"] += 1
                # Ray Train grew or shrank an elastic group (not a failure, and not a `scale`).
                if (self.elastic and previous is not None and fields.get("world_size") != previous
                        and self.data["attempts"] - self.data.get("fit_base", 0) > 1):
                    self.data["resizes"] += 1
            if fields.get("event") in ("ready", "resumed"):
                self.data["ready_attempt"] = self.data["attempts"]
            self.data.update({k: v for k, v in fields.items() if k != "event"})

    def control(self) -> str | None:
        """'stop' once a stop was requested: every rank checkpoints the current step and returns."""
        return "stop" if self.stop else None

    # --------------------------------------------------------------- called by the controller
    def snapshot(self) -> dict:
        with self.lock:
            return {**self.data, "lines": list(self.data["lines"])}

    def request_stop(self, why: str, job: dict | None = None) -> None:
        with self.lock:
            self.stop = {"why": why, "job": job}

    def ping(self) -> int:
        return self.data["pid"]

    def placement_group(self, pg) -> None:
        """The placement group of the worker group now running (from a Ray Train callback)."""
        self.placement_groups.append(pg)

    def release(self) -> int:
        """Before this runner is killed: free its worker group's resources at once."""
        from ray.util.placement_group import remove_placement_group

        freed = 0
        for pg in self.placement_groups:
            try:
                remove_placement_group(pg)
                freed += 1
            except Exception:  # noqa: BLE001 - already removed
                pass
        self.placement_groups.clear()
        return freed

    # ------------------------------------------------------------------------------ the run
    def _say(self, line: str) -> None:
        with self.lock:
            self.data["lines"].append(line)

    def _set(self, **fields) -> None:
        with self.lock:
            self.data.update(fields)

    def _run(self) -> None:
        import ray

        record, init_from = self.record, self.init_from
        job = job_config_from_dict(record.config)
        if job.data.kind == "sft" and not job.data.tokenizer_uri and init_from:
            import dataclasses

            # queued behind a job (`--after`): the data is tokenized with the weights' own tokenizer
            job = dataclasses.replace(job, data=dataclasses.replace(job.data, tokenizer_uri=init_from))
        try:
            from orchestrator.workspace import open_job_store

            open_job_store(job).check(job.storage.root)
            for line in ray.get(_prepare_remote().remote(to_dict(job))):
                self._say(line)
            check_dataset_matches(job)
            if init_from:
                check_init_matches(job, init_from)
            self._set(status="running")
            while True:
                with self.lock:
                    stop = self.stop
                if stop and stop["why"] == "cancel":
                    self._set(status="stopped")
                    return
                if stop and stop["why"] == "scale":
                    job = job_config_from_dict(stop["job"])
                    with self.lock:
                        self.stop = None
                    self._say(f"restarting at {job.workers} workers from the last checkpoint")
                with self.lock:
                    self.data["fits"] += 1
                    self.data["fit_base"] = self.data["attempts"]  # attempts before this worker group
                self._fit(record, job, init_from)
                state = self._final_state(record, job)
                if state.get("step") == job.trainer.max_steps:
                    self._finish(record, job, state)
                    self._set(status="succeeded")
                    return
                with self.lock:
                    stop = self.stop
                if not stop:
                    from orchestrator.errors import CheckpointError

                    raise CheckpointError(f"job {record.id} ended at step {state.get('step')} of {job.trainer.max_steps} "
                                          f"without a committed final checkpoint")
                self._say(f"stopped at step {state['step']} with a committed checkpoint ({stop['why']})")
        except OrchError as e:
            self._set(status="failed", reason=str(e), retryable=False)
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's reason
            log.debug("job %s failed", record.id, exc_info=True)
            self._set(status="failed", reason=worker_error_message(e), traceback=traceback.format_exc())

    def _final_state(self, record: JobRecord, job: JobConfig) -> dict:
        """The committed checkpoint the worker group ended on (the store, not the best-effort stream)."""
        import json

        from orchestrator.checkpoint.layout import latest_committed, run_uri
        from orchestrator.constants import TRAINER_STATE
        from orchestrator.storage import join_uri
        from orchestrator.workspace import open_job_store

        store, run = open_job_store(job), run_uri(job.storage.root, record.id)
        ref = latest_committed(store, run)
        if ref is None:
            return {}
        state = json.loads(store.get(join_uri(ref.uri, TRAINER_STATE)))
        self._set(checkpoint=ref.uri, step=state.get("step"), loss=state.get("last_loss"))
        return {**state, "uri": ref.uri, "ref_step": ref.step}

    def _finish(self, record: JobRecord, job: JobConfig, state: dict) -> None:
        """After the worker group ended well: export the final checkpoint's weights."""
        import ray

        from orchestrator.checkpoint.layout import run_uri

        self._say(f"exporting the weights of {state['uri']}")
        export = ray.get(_export_remote().remote(to_dict(job), run_uri(job.storage.root, record.id), state["ref_step"], record.id))
        self._set(checkpoint=state["uri"], export=export, step=state["step"], loss=state.get("last_loss"),
                  first_loss=state.get("first_loss"), eval_loss=state.get("eval_loss"), tokens=state.get("tokens_seen"))

    def _fit(self, record: JobRecord, job: JobConfig, init_from: str | None) -> None:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig

        from orchestrator.checkpoint.layout import run_uri
        from orchestrator.train.loop import train_worker

        # W&B files: the state folder on an embedded cluster (this machine), else node-local scratch
        # on rank 0's node (or tracking.dir); online runs upload as they go, offline ones with `wandb sync`.
        wandb_root = job.tracking.dir or (job.state_dir if not job.cluster.address else None)
        me = ray.get_runtime_context().current_actor
        spec = dict(job_id=record.id, run_uri=run_uri(job.storage.root, record.id), group=record.pipeline_id,
                    init_from=init_from, reporter=me, wandb_root=wandb_root)
        trainer = _trainer_class(me)(
            train_worker,
            train_loop_config={"job": to_dict(job), "spec": spec},
            scaling_config=ScalingConfig(
                num_workers=(job.workers, job.max_workers) if job.max_workers else job.workers,
                elastic_resize_monitor_interval_s=job.cluster.elastic_resize_interval_s,
                use_gpu=job.cluster.gpus_per_worker > 0,
                resources_per_worker=job.resources_per_worker(),
                placement_strategy=job.cluster.placement_strategy,
            ),
            torch_config=TorchConfig(backend=job.cluster.backend),
            run_config=RunConfig(
                name=f"{record.id}-{int(time.time())}",
                storage_path=self.ray_storage,
                failure_config=FailureConfig(max_failures=job.max_failures),
            ),
        )
        trainer.fit()


def _trainer_class(runner=None):
    """TorchTrainer without Ray Train's PlacementGroupCleaner, telling `runner` its placement group.

    That detached helper (Ray >= 2.5x) asks the state API whether the Train controller is alive and
    takes "not found" for dead: on a loaded node it removed the placement group of a live run under
    our feet (seen on a 3-raylet cluster on 2 cores). Instead the runner learns each worker group's
    placement group and removes it itself when the job is stopped at once (`orch cancel --now`)."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class ReportPlacementGroup(WorkerGroupCallback):
        def __init__(self, runner):
            self.runner = runner

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self.runner.placement_group.remote(pg)
            except Exception:  # noqa: BLE001 - best effort: only `cancel --now` uses it
                log.warning("could not report the worker group's placement group", exc_info=True)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = [c for c in super()._create_default_callbacks()
                         if not isinstance(c, PlacementGroupCleanerCallback)]
            return callbacks + ([ReportPlacementGroup(runner)] if runner is not None else [])

    return Trainer


@dataclass
class RunHandle:
    job_id: str
    actor: object
    lines_seen: int = 0
    fits_base: int = 0


class RayLauncher:
    """Starts each job as a `JobRunner` actor on the connected Ray cluster.

    `detached=True` (the persistent controller) makes runners named and detached, so they survive
    the controller; `orch run` keeps them owned by its own process, so they end with it.
    """

    def __init__(self, say: Callable[[str], None] = print, ray_storage: str | None = None, detached: bool = False,
                 namespace: str | None = None, node_id: str | None = None):
        self.say = say
        self.ray_storage = ray_storage
        self.detached = detached
        self.namespace = namespace
        self.node_id = node_id  # pin runners to this node (the controller's), where state_dir lives

    def _options(self, record: JobRecord) -> dict:
        opts: dict = dict(num_cpus=0, max_concurrency=16, max_restarts=0)
        if self.detached:
            opts.update(name=RUNNER_PREFIX + record.id, namespace=self.namespace, lifetime="detached")
        if self.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node_id, soft=True)
        return opts

    def start(self, record: JobRecord, init_from: str | None) -> RunHandle:
        import ray

        if self.detached:
            existing = self.attach(record)
            if existing is not None:  # never two runners for one job
                return existing
        actor = ray.remote(JobRunner).options(**self._options(record)).remote(record.to_json(), init_from, self.ray_storage)
        return RunHandle(record.id, actor)

    def attach(self, record: JobRecord) -> RunHandle | None:
        """The job's live runner, if there is one (after a controller restart)."""
        import ray

        try:
            actor = ray.get_actor(RUNNER_PREFIX + record.id, namespace=self.namespace)
            seen = len(ray.get(actor.snapshot.remote(), timeout=30)["lines"])
        except Exception:  # noqa: BLE001 - no runner, or a dead one
            return None
        return RunHandle(record.id, actor, lines_seen=seen)  # its earlier lines are in the job's log already

    def poll(self, handle: RunHandle) -> Progress:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            snap = ray.get(handle.actor.snapshot.remote(), timeout=30)
        except GetTimeoutError:
            return Progress(status="busy")
        except RayActorError as e:
            return Progress(status="lost", reason=f"the job's runner died ({str(e).strip().splitlines()[0][:200]})")
        for line in snap["lines"][handle.lines_seen:]:
            self.say(f"{handle.job_id}: {line}")
        handle.lines_seen = len(snap["lines"])
        p = Progress(status=snap["status"], checkpoint=snap.get("checkpoint"), export=snap.get("export"),
                     attempts=snap.get("attempts", 0), reason=snap.get("reason"), retryable=snap.get("retryable", True),
                     traceback=snap.get("traceback"), ready_attempt=snap.get("ready_attempt", 0))
        p.fits, p.fit_base, p.resizes = snap.get("fits", 0), snap.get("fit_base", 0), snap.get("resizes", 0)
        for key in ("step", "loss", "first_loss", "eval_loss", "tokens", "world_size"):
            if snap.get(key) is not None:
                p.metrics[key] = snap[key]
        if snap.get("resumed_from"):
            p.resumed = {"from": snap["resumed_from"], "skipped": snap.get("skipped", []),
                         "universal": snap.get("universal", False), "attempt": snap.get("attempts")}
        for key in ("wandb_run_id", "wandb_dir"):
            if snap.get(key):
                p.wandb[key.removeprefix("wandb_")] = snap[key]
        return p

    def request_stop(self, handle: RunHandle, why: str, job: dict | None = None) -> None:
        import ray

        ray.get(handle.actor.request_stop.remote(why, job), timeout=30)

    def kill(self, handle: RunHandle) -> None:
        """Stop the job now: its runner dies, and with it the worker group it owns."""
        import ray

        try:
            ray.get(handle.actor.release.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead runner has nothing to release
            pass
        self.release(handle)

    def release(self, handle: RunHandle) -> None:
        """Drop a runner (frees its name); the worker group it owns goes with it."""
        import ray

        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
