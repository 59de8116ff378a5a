"""Run jobs on Ray: each job in a `JobRunner` actor that owns one Ray Train run (TorchTrainer,
ScalingConfig, FailureConfig) at a time.

`RayLauncher.start` returns at once; `poll` reads the runner's events after a sequence number.
`fit` builds and runs the Ray Train run inside the runner. The runner subclasses nothing of Ray
Train, but `fit` uses Ray Train V2 internals (callbacks that report the worker group's placement
group and the reason of each restart), so the Ray version is pinned and checked at start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from orchestrator.config.compose import job_config_from_dict
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.errors import ClusterError
from orchestrator.jobs.events import AttemptReason, RunnerPoll, RunnerStatus
from orchestrator.jobs.record import JobRecord
from orchestrator.runner import RUNNER_PREFIX, JobRunner

log = logging.getLogger(__name__)

# The Ray versions the tests ran on (pyproject.toml pins the same range): Ray Train V2 internals.
RAY_TESTED = ((2, 60), (2, 60))


def check_ray_version(version: str | None = None) -> None:
    """One line, before anything starts, when another Ray is installed."""
    if version is None:
        import ray  # (ray: only where a cluster is used)

        version = ray.__version__
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    low, high = RAY_TESTED
    if not low <= major_minor <= high:
        raise ClusterError(
            f"orch needs Ray {low[0]}.{low[1]}.x (it uses Ray Train V2 internals that change between releases), "
            f"found Ray {version}; install it with: pip install 'ray[default,train]=={low[0]}.{low[1]}.*'"
        )


def prepare_remote():
    """A Ray task that prepares a job's dataset if needed; returns its progress lines."""
    import ray  # (ray: only inside a cluster)

    @ray.remote(num_cpus=0)
    def prepare(job_dict: dict) -> list[str]:
        from orchestrator.data.prepare import ensure_dataset
        from orchestrator.workspace import open_job_store

        job = job_config_from_dict(job_dict)
        store = open_job_store(job)
        store.check(job.storage.root)
        lines: list[str] = []
        ensure_dataset(store, job.data, progress=lines.append)
        return lines

    return prepare


def export_remote():
    """A Ray task (1 CPU) that consolidates a committed checkpoint into the run's export."""
    import ray  # (ray: only inside a cluster)

    @ray.remote(num_cpus=1)
    def export(job_dict: dict, run: str, step: int, job_id: str) -> str:
        from orchestrator.checkpoint.export import export_checkpoint
        from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri
        from orchestrator.workspace import local_scratch, open_job_store

        job = job_config_from_dict(job_dict)
        ref = CheckpointRef(step, checkpoint_uri(run, step), True)
        return export_checkpoint(open_job_store(job), run, ref, {"job_id": job_id, "kind": job.kind},
                                 local_scratch(job_id))

    return export


def fit(record: JobRecord, job: JobConfig, init_from: str | None, ray_storage: str | None) -> None:
    """One Ray Train run of the job (until max_steps, a requested stop, or failures beyond
    `max_failures`); called in the job's runner actor, to which rank 0 reports."""
    import ray  # (ray, ray.train: only inside the runner actor)
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
        run_config=RunConfig(name=f"{record.id}-{int(time.time())}", storage_path=ray_storage,
                             failure_config=FailureConfig(max_failures=job.max_failures)),
    )
    trainer.fit()


def _trainer_class(runner):
    """TorchTrainer without Ray Train's PlacementGroupCleaner, with two callbacks that tell `runner`
    each worker group's placement group and why Ray Train starts the next group.

    The cleaner (a detached helper) asks the state API whether the Train controller is alive and
    takes "not found" for dead: on a loaded node it removed the placement group of a live run under
    our feet (seen on a 3-raylet cluster on 2 cores). Instead the runner learns each worker group's
    placement group and removes it itself when the job is stopped at once (`orch cancel --now`)."""
    from ray.train.torch import TorchTrainer  # (ray: only inside the runner actor)

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
        from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
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
            import ray

            try:
                ray.get(self.runner.decision.remote(kind), timeout=10)
            except Exception:  # noqa: BLE001 - the runner then judges from the group's size
                log.warning("could not tell the job's runner about a %s decision", kind, exc_info=True)

        def before_controller_execute_failure_decision(self, failure_decision) -> None:
            if failure_decision == FailureDecision.RETRY:
                self._tell("failure")

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            self._tell("resize")

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = [c for c in super()._create_default_callbacks()
                         if not isinstance(c, PlacementGroupCleanerCallback)]
            return callbacks + [ReportPlacementGroup(runner), ReportDecisions(runner)]

    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        raise ClusterError("this Ray's TorchTrainer has no _create_default_callbacks; install the Ray version "
                           "pyproject.toml names")
    return Trainer


@dataclass
class RunHandle:
    job_id: str
    actor: object


class RayLauncher:
    """Starts each job as a `JobRunner` actor on the connected Ray cluster.

    `detached=True` (the persistent controller) makes runners named and detached, so they survive
    the controller; `orch run` keeps them owned by its own process, so they end with it.
    """

    def __init__(self, ray_storage: str | None = None, detached: bool = False, namespace: str | None = None,
                 node_id: str | None = None):
        check_ray_version()
        self.ray_storage = ray_storage
        self.detached = detached
        self.namespace = namespace
        self.node_id = node_id  # pin runners to this node (the controller's), where state_dir lives

    def _options(self, record: JobRecord) -> dict:
        opts: dict = dict(num_cpus=0, max_concurrency=16, max_restarts=0)
        if self.detached:
            opts.update(name=RUNNER_PREFIX + record.id, namespace=self.namespace, lifetime="detached")
        if self.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # (ray: see above)

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node_id, soft=True)
        return opts

    def start(self, record: JobRecord, init_from: str | None, reason: AttemptReason) -> RunHandle:
        import ray  # (ray: only where a cluster is used)

        if self.detached:
            existing = self.attach(record)
            if existing is not None:  # never two runners for one job
                return existing
        actor = ray.remote(JobRunner).options(**self._options(record)).remote(
            record.to_json(), init_from, reason.value, self.ray_storage)
        return RunHandle(record.id, actor)

    def attach(self, record: JobRecord) -> RunHandle | None:
        """The job's live runner, if there is one (after a controller restart)."""
        import ray  # (ray: only where a cluster is used)

        try:
            actor = ray.get_actor(RUNNER_PREFIX + record.id, namespace=self.namespace)
            ray.get(actor.ping.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - no runner, or a dead one
            return None
        return RunHandle(record.id, actor)

    def poll(self, handle: RunHandle, after_seq: int) -> RunnerPoll:
        import ray  # (ray: only where a cluster is used)
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            events = ray.get(handle.actor.events.remote(after_seq), timeout=30)
        except GetTimeoutError:
            return RunnerPoll(RunnerStatus.BUSY)
        except RayActorError as e:
            return RunnerPoll(RunnerStatus.LOST,
                              reason=f"the job's runner died ({str(e).strip().splitlines()[0][:200]})")
        return RunnerPoll(RunnerStatus.ALIVE, tuple(events))

    def request_stop(self, handle: RunHandle, request: dict) -> None:
        import ray  # (ray: only where a cluster is used)

        ray.get(handle.actor.request_stop.remote(request), timeout=30)

    def kill(self, handle: RunHandle) -> None:
        """Stop the job now: free its worker group's placement group, then kill the runner (the
        worker group it owns goes with it, and its name is free again)."""
        import ray  # (ray: only where a cluster is used)

        try:
            ray.get(handle.actor.release.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead runner has nothing to release
            pass
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def new_controller(store, capacity: Callable[[], dict[str, float]], say: Callable[[str], None], **launcher_options):
    """A `Controller` on the connected Ray cluster (used by `orch run` and the controller actor)."""
    from orchestrator.controller import Controller

    return Controller(store, RayLauncher(**launcher_options), capacity=capacity, say=say, validate=job_config_from_dict)
