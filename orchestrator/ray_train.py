"""The Ray Train run of one job, and the Ray tasks around it (preparing its data, exporting its
weights). Used inside the job's runner actor.

`fit` builds a TorchTrainer (ScalingConfig, FailureConfig) whose workers run
`orchestrator.train.loop.train_worker`. It uses Ray Train V2 internals (callbacks that report the
worker group's placement group and the reason of each restart), so the Ray version is pinned in
pyproject.toml and checked when a launcher starts (`orchestrator.launcher.check_ray_version`).
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.checkpoint.export import export_checkpoint
from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri, run_uri
from orchestrator.config.compose import job_config_from_dict
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.constants import EXPORT_IN_RUNNER_MAX_PARAMS, RAY_TRAIN_HEALTH_CHECK_ENV, RAY_TRAIN_HEALTH_CHECK_S
from orchestrator.data.prepare import ensure_dataset
from orchestrator.errors import ClusterError
from orchestrator.jobs.record import JobRecord, wandb_group
from orchestrator.runner import worker_causes
from orchestrator.train.warm import start_imports
from orchestrator.workspace import local_scratch, open_job_store

log = logging.getLogger(__name__)

def prepare_remote():
    """A Ray task that prepares a job's dataset if needed; returns its progress lines."""
    @ray.remote(num_cpus=0)
    def prepare(job_dict: dict) -> list[str]:
        job = job_config_from_dict(job_dict)
        store = open_job_store(job)
        store.check(job.storage.root)
        lines: list[str] = []
        ensure_dataset(store, job.data, progress=lines.append)
        return lines

    return prepare


def export_remote():
    """A Ray task (1 CPU) that consolidates a committed checkpoint into the run's export."""
    return ray.remote(num_cpus=1)(_export)


def _export(job_dict: dict, run: str, step: int, job_id: str) -> str:
    from model.registry import family_of

    job = job_config_from_dict(job_dict)
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
        return _export(to_dict(job), run, step, job_id)
    return ray.get(export_remote().remote(to_dict(job), run, step, job_id))


def fit(record: JobRecord, job: JobConfig, init_from: str | None, ray_storage: str | None,
        coordinator: bool = True) -> None:
    """One Ray Train run of the job (until max_steps, a requested stop, or failures beyond
    `max_failures`); called in the job's runner actor, to which rank 0 reports. `coordinator=False`:
    no elastic job shares the cluster, so only this job's own needs count (JobConfig.needs_coordinator)."""
    from orchestrator.train.loop import train_worker  # (torch, deepspeed: only in the runner, not orch's controller)

    # (W&B is written by the runner from the job's metrics history: orchestrator.tracking.)
    # Ray Train hands this variable from this process's environment to its controller; a user's wins.
    os.environ.setdefault(RAY_TRAIN_HEALTH_CHECK_ENV, RAY_TRAIN_HEALTH_CHECK_S)
    me = ray.get_runtime_context().current_actor
    spec = dict(job_id=record.id, run_uri=run_uri(job.storage.root, record.id), group=wandb_group(record),
                init_from=init_from, reporter=me)
    trainer = _trainer_class(me, job.cluster.accelerator, coordinator=coordinator or job.needs_coordinator)(
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
        run_config=RunConfig(name=f"{record.id}-{int(time.time())}", storage_path=ray_storage,
                             failure_config=FailureConfig(max_failures=job.max_failures)),
    )
    trainer.fit()


def _trainer_class(runner, accelerator: str, coordinator: bool = True):
    """TorchTrainer without Ray Train's PlacementGroupCleaner (and its datasets callback), with two
    callbacks that tell `runner` each worker group's placement group and why Ray Train starts the
    next group.

    The cleaner (a detached helper) asks the state API whether the Train controller is alive and
    takes "not found" for dead: on a loaded node it removed the placement group of a live run under
    our feet (seen on a 3-raylet cluster on 2 cores). Instead the runner learns each worker group's
    placement group and removes it itself when the job is stopped at once (`orch cancel --now`)."""
    try:  # (internals of one Ray release: imported where used, so another Ray fails with one line)
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
        from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision, FailurePolicy
    except ImportError as e:
        raise ClusterError(f"this Ray has no Ray Train V2 internals orch relies on ({e}); "
                           f"install the Ray version pyproject.toml names") from None

    class ReportPlacementGroup(WorkerGroupCallback):
        def __init__(self, runner):
            self.runner = runner

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self.runner.placement_group.remote(pg)
            except Exception:  # noqa: BLE001 - best effort: only `cancel --now` uses it
                log.warning("could not report the worker group's placement group", exc_info=True)

    class ReportDecisions(ControllerCallback):
        """Tells the runner (and waits, so it knows before the next group's rank 0 reports) why the
        next worker group starts: a retry after a failure, or a resize."""

        def __init__(self, runner):
            self.runner = runner

        def _tell(self, kind: str) -> None:
            try:
                ray.get(self.runner.decision.remote(kind), timeout=10)
            except Exception:  # noqa: BLE001 - the runner then judges from the group's size
                log.warning("could not tell the job's runner about a %s decision", kind, exc_info=True)

        def before_controller_execute_failure_decision(self, failure_decision) -> None:
            if failure_decision == FailureDecision.RETRY:
                self._tell("failure")

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            self._tell("resize")

    class FailFast(FailurePolicy):
        """Ray Train's own policy, except that a worker error no restart can fix (an `OrchError`
        with `retryable=False`: a corrupt shard, revoked credentials, a full disk) fails the run at
        once instead of using up `max_failures`."""

        def __init__(self, inner):
            super().__init__(inner.failure_config)
            self.inner = inner

        def make_decision(self, training_failed_error):
            if any(not getattr(e, "retryable", True) for e in worker_causes(training_failed_error)):
                return FailureDecision.RAISE
            return self.inner.make_decision(training_failed_error)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            # (orch reads its own shards, never a Ray Dataset: the datasets callback would start a
            # DatasetManager actor, one more process importing Ray Data, with every worker group)
            dropped = (PlacementGroupCleanerCallback, DatasetsCallback)
            callbacks = [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]
            return callbacks + _warm_imports(accelerator) + [ReportPlacementGroup(runner), ReportDecisions(runner)]

        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = FailFast(kwargs["failure_policy"])
            return _run_controller_here(kwargs, coordinator)

    if not all(hasattr(TorchTrainer, m) for m in ("_create_default_callbacks", "_initialize_and_run_controller")):
        raise ClusterError("this Ray's TorchTrainer has no _create_default_callbacks; install the Ray version "
                           "pyproject.toml names")
    return Trainer


def _without_coordinator(policy):
    """Ray Train's fixed-size policy without its AutoscalingCoordinator requests (JobConfig.needs_coordinator);
    any other policy as it is."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class FixedWithoutCoordinator(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    return FixedWithoutCoordinator(policy.scaling_config) if type(policy) is FixedScalingPolicy else policy


def _run_controller_here(kwargs: dict, coordinator: bool = True):
    """Ray Train's controller, run in this process (the job's runner, a thread of its own) instead
    of in an actor of its own: that actor would be one more Python process importing Ray Train on
    the way to every job's first step (2-3 s when cores are few) and one more process polling
    during the run. Nothing is lost by it: the runner already owns the controller's lifetime (an
    actor the runner creates dies with it, and its workers with it) and orch's workers never call
    the controller (they report to the runner)."""
    import asyncio

    from ray.train.v2._internal.execution.controller import TrainController

    if not coordinator:
        kwargs["scaling_policy"] = _without_coordinator(kwargs["scaling_policy"])

    async def run():
        controller = TrainController(**kwargs)
        await controller.run()
        return controller.get_result()

    return asyncio.run(run())


def _warm_imports(accelerator: str) -> list:
    """A worker group callback: each new worker starts importing DeepSpeed and the loop while Ray
    Train sets it up (orchestrator.train.warm), by a call queued before the train context's. CPU
    only: on a GPU, DeepSpeed's import may initialise CUDA before Ray Train has set the worker's
    CUDA_VISIBLE_DEVICES and device, which must come first."""
    if accelerator != "cpu":
        return []
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class WarmImports(WorkerGroupCallback):
        def __init__(self, accelerator: str):
            self.accelerator = accelerator

        def before_init_train_context(self, workers) -> dict:
            for worker in workers:
                try:
                    worker.execute_async(start_imports, self.accelerator)
                except Exception:  # noqa: BLE001 - an optimisation only
                    log.debug("could not start the worker's imports early", exc_info=True)
            return {}

    return [WarmImports(accelerator)]
