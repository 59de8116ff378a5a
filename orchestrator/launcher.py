"""Run one job as a Ray Train worker group (TorchTrainer + ScalingConfig + FailureConfig).

`RayLauncher.start` returns at once; the job's data preparation and `TorchTrainer.fit()` run in a
background thread, and `poll` reports progress that rank 0 streams to a small progress actor.
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

log = logging.getLogger(__name__)


@dataclass
class Progress:
    status: str = "starting"  # starting | running | succeeded | failed
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


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        """Receives rank 0's reports (fire-and-forget) and hands snapshots to the launcher."""

        def __init__(self):
            self.data: dict = {"attempts": 0}

        def update(self, fields: dict) -> None:
            if fields.get("event") == "attempt":
                self.data["attempts"] += 1
            if fields.get("event") in ("ready", "resumed"):
                self.data["ready_attempt"] = self.data["attempts"]
            self.data.update({k: v for k, v in fields.items() if k != "event"})

        def snapshot(self) -> dict:
            return dict(self.data)

    return ProgressSink


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
        from orchestrator.train.loop import open_job_store

        job = job_config_from_dict(job_dict)
        lines: list[str] = []
        ensure_dataset(open_job_store(job), job.data, progress=lines.append)
        return lines

    return prepare


def _export_remote():
    import ray

    @ray.remote(num_cpus=1)
    def export(job_dict: dict, run: str, step: int, job_id: str) -> str:
        from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri
        from orchestrator.checkpoint.manager import export_checkpoint
        from orchestrator.train.loop import local_scratch, open_job_store

        job = job_config_from_dict(job_dict)
        ref = CheckpointRef(step, checkpoint_uri(run, step), True)
        return export_checkpoint(open_job_store(job), run, ref, {"job_id": job_id, "kind": job.kind}, local_scratch(job_id))

    return export


def check_dataset_matches(job: JobConfig) -> None:
    """Fail before any worker starts if the dataset does not fit the model or the job."""
    from orchestrator.data.manifest import load_manifest
    from orchestrator.train.loop import open_job_store

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


class RunHandle:
    def __init__(self, record: JobRecord):
        self.record = record
        self.progress = Progress()
        self.sink = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()


class RayLauncher:
    """Starts jobs on the connected Ray cluster."""

    def __init__(self, say: Callable[[str], None] = print, ray_storage: str | None = None):
        self.say = say
        self.ray_storage = ray_storage

    def start(self, record: JobRecord, init_from: str | None) -> RunHandle:
        handle = RunHandle(record)
        handle.thread = threading.Thread(target=self._run, args=(handle, init_from), name=f"job-{record.id}", daemon=True)
        handle.thread.start()
        return handle

    def poll(self, handle: RunHandle) -> Progress:
        import ray

        if handle.sink is not None and handle.progress.status in ("running", "succeeded", "failed"):
            try:
                snap = ray.get(handle.sink.snapshot.remote(), timeout=10)
                self._merge(handle, snap)
            except Exception:  # the sink is best-effort: a slow poll must not fail the job
                pass
        with handle.lock:
            return Progress(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in handle.progress.__dict__.items()})

    @staticmethod
    def _merge(handle: RunHandle, snap: dict) -> None:
        with handle.lock:
            p = handle.progress
            for key in ("step", "loss", "first_loss", "eval_loss", "tokens"):
                if key in snap:
                    p.metrics[key] = snap[key]
            p.checkpoint = snap.get("checkpoint", p.checkpoint)
            p.export = snap.get("export", p.export)
            p.attempts = snap.get("attempts", p.attempts)
            p.ready_attempt = snap.get("ready_attempt", p.ready_attempt)
            if snap.get("resumed_from"):
                p.resumed = {"from": snap["resumed_from"], "skipped": snap.get("skipped", []),
                             "universal": snap.get("universal", False), "attempt": snap.get("attempts")}
            for key in ("wandb_run_id", "wandb_dir"):
                if snap.get(key):
                    p.wandb[key.removeprefix("wandb_")] = snap[key]

    def _run(self, handle: RunHandle, init_from: str | None) -> None:
        import ray

        record = handle.record
        job = job_config_from_dict(record.config)
        try:
            from orchestrator.train.loop import open_job_store

            open_job_store(job).check(job.storage.root)
            for line in ray.get(_prepare_remote().remote(to_dict(job))):
                self.say(f"{record.id}: {line}")
            check_dataset_matches(job)
            if init_from:
                check_init_matches(job, init_from)
            handle.sink = _progress_actor().remote()
            with handle.lock:
                handle.progress.status = "running"
            self._fit(record, job, handle, init_from)
            self._merge(handle, ray.get(handle.sink.snapshot.remote()))
            self._finish(record, job, handle)
            with handle.lock:
                handle.progress.status = "succeeded"
        except OrchError as e:
            with handle.lock:
                handle.progress.status, handle.progress.reason, handle.progress.retryable = "failed", str(e), False
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's reason
            log.debug("job %s failed", record.id, exc_info=True)
            with handle.lock:
                handle.progress.status = "failed"
                handle.progress.reason = worker_error_message(e)
                handle.progress.traceback = traceback.format_exc()
        finally:
            if handle.sink is not None:
                try:
                    self._merge(handle, ray.get(handle.sink.snapshot.remote(), timeout=10))
                except Exception:
                    pass

    def _finish(self, record: JobRecord, job: JobConfig, handle: RunHandle) -> None:
        """After the worker group ended well: take the job's results from the store (not from the
        best-effort progress stream) and export the final checkpoint's weights."""
        import json

        import ray

        from orchestrator.checkpoint.layout import latest_committed, run_uri
        from orchestrator.constants import TRAINER_STATE
        from orchestrator.errors import CheckpointError
        from orchestrator.storage import join_uri
        from orchestrator.train.loop import open_job_store

        store, run = open_job_store(job), run_uri(job.storage.root, record.id)
        ref = latest_committed(store, run)
        state = json.loads(store.get(join_uri(ref.uri, TRAINER_STATE))) if ref else {}
        if not ref or state.get("step") != job.trainer.max_steps:
            raise CheckpointError(f"job {record.id} ended without a committed final checkpoint in {run}")
        self.say(f"{record.id}: exporting the weights of {ref.uri}")
        export = ray.get(_export_remote().remote(to_dict(job), run, ref.step, record.id))
        with handle.lock:
            p = handle.progress
            p.checkpoint, p.export = ref.uri, export
            p.metrics.update({"step": state["step"], "loss": state.get("last_loss"), "first_loss": state.get("first_loss"),
                              "eval_loss": state.get("eval_loss"), "tokens": state.get("tokens_seen")})

    def _fit(self, record: JobRecord, job: JobConfig, handle: RunHandle, init_from: str | None) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from orchestrator.checkpoint.layout import run_uri
        from orchestrator.train.loop import train_worker

        # W&B files: the state folder on an embedded cluster (this machine), else node-local scratch
        # on rank 0's node (or tracking.dir); online runs upload as they go, offline ones with `wandb sync`.
        wandb_root = job.tracking.dir or (job.state_dir if not job.cluster.address else None)
        spec = dict(job_id=record.id, run_uri=run_uri(job.storage.root, record.id), group=record.pipeline_id,
                    init_from=init_from, reporter=handle.sink, wandb_root=wandb_root)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": to_dict(job), "spec": spec},
            scaling_config=ScalingConfig(
                num_workers=job.workers,
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
