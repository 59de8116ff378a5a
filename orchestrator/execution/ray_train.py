"""The Ray Train run of one job, and the Ray tasks around it (preparing its data, exporting its
weights). Used inside the job's runner actor.

`fit` builds a TorchTrainer (ScalingConfig, FailureConfig) whose workers run
`orchestrator.train.loop.train_worker`. It uses Ray Train V2 internals (callbacks that report the
worker group's placement group and the reason of each restart), so the Ray version is pinned in
pyproject.toml and checked when a launcher starts (`orchestrator.execution.launcher.check_ray_version`).
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig

from orchestrator.checkpoint.export import export_checkpoint
from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri, run_uri
from orchestrator.config.schema import JobConfig
from orchestrator.constants import EXPORT_IN_RUNNER_MAX_PARAMS, RAY_TRAIN_HEALTH_CHECK_ENV, RAY_TRAIN_HEALTH_CHECK_S
from orchestrator.errors import ClusterError
from orchestrator.jobs.record import JobRecord
from orchestrator.workspace import local_scratch, open_job_store

log = logging.getLogger(__name__)


def export_remote():
    """A Ray task (1 CPU) that consolidates a committed checkpoint into the run's export."""
    return ray.remote(num_cpus=1)(_export)


def _export(job: JobConfig, run: str, step: int, job_id: str) -> str:
    from model.registry import family_of

    ref = CheckpointRef(step, checkpoint_uri(run, step), True)
    return export_checkpoint(open_job_store(job), run, ref, {"job_id": job_id, "kind": job.kind},
                             local_scratch(job_id), family_of(job.model).tied_weights(job.model))


def export_weights(job: JobConfig, run: str, step: int, job_id: str) -> str:
    """Export the weights of the run's checkpoint at `step`. A model of up to
    EXPORT_IN_RUNNER_MAX_PARAMS is exported here, in the runner, which has torch loaded already: a
    Ray task would spend seconds starting a process and importing torch and DeepSpeed for work of
    milliseconds. A larger one goes to a 1-CPU Ray task, which Ray may place on any node with room:
    consolidating loads the fp32 weights and optimizer moments (about 16 bytes a parameter), which
    the runner's node (the head, on a cluster) may not hold."""
    from model.registry import family_of

    if family_of(job.model).count_parameters(job.model) <= EXPORT_IN_RUNNER_MAX_PARAMS:
        return _export(job, run, step, job_id)
    return ray.get(export_remote().remote(job, run, step, job_id))


def fit(record: JobRecord, job: JobConfig, init_from: str | None, ray_storage: str | None,
        coordinator: bool = True, judge=None) -> None:
    """One Ray Train run of the job (until max_steps, a requested stop, or failures beyond
    `max_failures`); called in the job's runner actor, to which rank 0 reports. `coordinator=False`:
    no elastic job shares the cluster, so only this job's own needs count (JobConfig.needs_coordinator).
    `judge(error)`: called in this process on every failure of a worker group; a line: do not restart."""
    from orchestrator.train.evaluate import eval_worker  # (torch, deepspeed: not in orch's controller)
    from orchestrator.train.loop import RunSpec, train_worker

    # (W&B is written by the runner from the job's metrics history: orchestrator.execution.tracking.)
    # Ray Train hands this variable from this process's environment to its controller; a user's wins.
    os.environ.setdefault(RAY_TRAIN_HEALTH_CHECK_ENV, RAY_TRAIN_HEALTH_CHECK_S)
    me = ray.get_runtime_context().current_actor
    spec = RunSpec(job_id=record.id, run_uri=run_uri(job.storage.root, record.id), init_from=init_from, reporter=me)
    trainer = _trainer_class()(
        eval_worker if job.kind == "eval" else train_worker,
        runner=me, accelerator=job.cluster.accelerator, coordinator=coordinator or job.needs_coordinator, judge=judge,
        train_loop_config={"job": job, "spec": spec},  # (pickled by Ray as they are: train_worker reads them)
        scaling_config=ScalingConfig(
            num_workers=(job.workers, job.max_workers) if job.max_workers else job.workers,
            elastic_resize_monitor_interval_s=job.cluster.elastic_resize_interval_s,
            use_gpu=job.cluster.gpus_per_worker > 0,
            resources_per_worker=job.resources_per_worker(),
            placement_strategy=job.cluster.placement_strategy,
        ),
        # a wedged collective raises after trainer.collective_timeout_s (above the stall timeout: the
        # watchdog names the stuck rank first), instead of torch's 30 minutes
        torch_config=TorchConfig(backend=job.cluster.backend, timeout_s=int(job.trainer.collective_timeout_s)),
        run_config=RunConfig(name=f"{record.id}-{int(time.time())}", storage_path=ray_storage,
                             failure_config=FailureConfig(max_failures=job.max_failures)),
    )
    trainer.fit()


def _trainer_class():
    """orch's TorchTrainer (orchestrator.execution.train_extensions), or one line when this Ray lacks the
    Ray Train V2 internals it extends."""
    try:
        from orchestrator.execution.train_extensions import OrchTrainer
    except ImportError as e:
        raise ClusterError(f"this Ray has no Ray Train V2 internals orch relies on ({e}); "
                           f"install the Ray version pyproject.toml names") from None
    return OrchTrainer
