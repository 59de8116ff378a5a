"""orch's extensions of Ray Train V2, one module-level class per hook, each testable alone.

Read from Ray 2.60's `ray/train/v2` (`api/data_parallel_trainer.py`: `_create_default_callbacks`,
`_initialize_and_run_controller`; `_internal/execution/callback.py`; `failure_handling/failure_policy.py`;
`scaling_policy/fixed.py`). These are internals of one Ray release: pyproject.toml pins it and
`orchestrator.execution.launcher.check_ray_version` checks it; importing this module on another Ray
raises ImportError, which `orchestrator.execution.ray_train` turns into one line.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision, FailurePolicy
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from orchestrator.constants import QUARANTINE_WAIT_S
from orchestrator.execution.failures import retryable
from orchestrator.train.warm import start_imports

log = logging.getLogger(__name__)


class ReportPlacementGroup(WorkerGroupCallback):
    """Tells the job's runner each worker group's placement group (it removes it itself when the
    job is stopped at once, `orch cancel --now`: Ray Train's own cleaner is dropped, see OrchTrainer)."""

    def __init__(self, runner):
        self.runner = runner

    def after_worker_group_start(self, worker_group) -> None:
        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            self.runner.placement_group.remote(pg)
        except Exception:  # noqa: BLE001 - best effort: only `cancel --now` uses it
            log.warning("could not report the worker group's placement group", exc_info=True)


class ReportWorkerNodes(WorkerGroupCallback):
    """Tells the job's runner (and waits) each rank's node, Ray id and address, as soon as a worker group
    has started: a rank that dies before its first heartbeat still blames its node (the quarantine,
    orchestrator.jobs.quarantine). Read from Ray 2.60's `Worker.metadata` and `.distributed_context`."""

    def __init__(self, runner):
        self.runner = runner

    def after_worker_group_start(self, worker_group) -> None:
        try:
            workers = worker_group.get_worker_group_state().workers
            nodes = {w.distributed_context.world_rank: (w.metadata.node_id, w.metadata.node_ip) for w in workers}
            ray.get(self.runner.worker_nodes.remote(nodes), timeout=10)
        except Exception:  # noqa: BLE001 - the heartbeats still name the nodes of the ranks that beat
            log.warning("could not report the worker group's nodes", exc_info=True)


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


class ReportCoordinatorRequest(ControllerCallback):
    """Tells the job's runner the requester id under which Ray Train's scaling policy registers the
    run's workers with the AutoscalingCoordinator (`train-<run id>`, from `ScalingPolicy.after_controller_start`
    in Ray 2.60): the runner, or the launcher for a dead runner, cancels it when the job is stopped at
    once; else it holds the workers' room for AUTOSCALING_REQUESTS_EXPIRE_TIME_S (180 s), during which
    an elastic job cannot start or grow into it."""

    def __init__(self, runner):
        self.runner = runner

    def after_controller_start(self, train_run_context) -> None:
        try:
            self.runner.coordinator_request.remote(f"train-{train_run_context.run_id}")
        except Exception:  # noqa: BLE001 - best effort: the request still expires
            log.warning("could not report the run's AutoscalingCoordinator request", exc_info=True)


NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its node id (Ray 2.60, ray._private.label_utils)


class AvoidQuarantinedNodes(ControllerCallback):
    """Keeps every worker group of the run off the quarantined nodes (orchestrator.jobs.quarantine):
    a label selector `ray.io/node-id: !in(ID,...)` on each worker's placement group bundle.

    Ray 2.60's `TrainController._start_worker_group` asks each ControllerCallback's
    `on_controller_start_worker_group` for a label selector before *every* worker group it starts: the
    first and each restart after a failure, inside the same Ray Train run. Chosen over ending the run
    and starting a new one from the last commit (the path a controller restart takes) because the
    restart stays Ray Train's own (its max_failures counting, its RESTARTING state, its seconds: no
    new run, no second controller start) and because it runs right after the failure policy judged the
    failure: the runner waits there until the orch controller has applied that failure (and maybe
    quarantined its node; JobRunner.placement_exclusions), so the very next group avoids the node."""

    def __init__(self, runner):
        self.runner = runner

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int) -> dict[str, str] | None:
        try:
            nodes = ray.get(self.runner.placement_exclusions.remote(QUARANTINE_WAIT_S), timeout=QUARANTINE_WAIT_S + 20)
        except Exception:  # noqa: BLE001 - placed as Ray likes rather than not at all
            log.warning("could not ask the job's runner for the quarantined nodes", exc_info=True)
            return None
        return node_selector(nodes)


def node_selector(node_ids: list[str]) -> dict[str, str] | None:
    """The label selector that keeps a worker off the nodes `node_ids` (None: no node to avoid)."""
    return {NODE_ID_LABEL: f"!in({','.join(node_ids)})"} if node_ids else None


class FailFast(FailurePolicy):
    """Ray Train's own policy, except that a worker error no restart can fix (an `OrchError` with
    `retryable=False`: a corrupt shard, revoked credentials, a full disk) fails the run at once
    instead of using up `max_failures`, and so does a failure the job's `judge` refuses to restart
    (the runner: it classifies every failure, and stops a restart storm or a class over its budget)."""

    def __init__(self, inner: FailurePolicy, judge=None):
        super().__init__(inner.failure_config)
        self.inner, self.judge = inner, judge

    def make_decision(self, training_failed_error):
        refusal = self.judge(training_failed_error) if self.judge is not None else None
        if refusal or not retryable(training_failed_error):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class FixedWithoutCoordinator(FixedScalingPolicy):
    """Ray Train's fixed-size policy without its AutoscalingCoordinator requests, for a job on a
    cluster that no elastic job shares (`JobConfig.needs_coordinator`)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def without_coordinator(policy):
    """The fixed-size policy as FixedWithoutCoordinator; any other policy as it is."""
    return FixedWithoutCoordinator(policy.scaling_config) if type(policy) is FixedScalingPolicy else policy


class WarmImports(WorkerGroupCallback):
    """Each new worker starts importing DeepSpeed and the loop while Ray Train sets it up
    (orchestrator.train.warm), by a call queued before the train context's. CPU only (`for_accelerator`):
    on a GPU, DeepSpeed's import may initialise CUDA before Ray Train has set the worker's
    CUDA_VISIBLE_DEVICES and device, which must come first."""

    def __init__(self, accelerator: str):
        self.accelerator = accelerator

    @staticmethod
    def for_accelerator(accelerator: str) -> list:
        return [WarmImports(accelerator)] if accelerator == "cpu" else []

    def before_init_train_context(self, workers) -> dict:
        for worker in workers:
            try:
                worker.execute_async(start_imports, self.accelerator)
            except Exception:  # noqa: BLE001 - an optimisation only
                log.debug("could not start the worker's imports early", exc_info=True)
        return {}


class OrchTrainer(TorchTrainer):
    """TorchTrainer without Ray Train's PlacementGroupCleaner (and its datasets callback), with
    the callbacks above, FailFast around the failure policy, and Ray Train's controller run in this
    process (the job's runner).

    The cleaner (a detached helper) asks the state API whether the Train controller is alive and
    takes "not found" for dead: on a loaded node it removed the placement group of a live run under
    our feet (seen on a 3-raylet cluster on 2 cores). The runner learns each worker group's
    placement group instead and removes it itself when the job is stopped at once."""

    def __init__(self, *args, runner, accelerator: str, coordinator: bool = True, judge=None, **kwargs):
        self.runner, self.accelerator, self.coordinator, self.judge = runner, accelerator, coordinator, judge
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        # (orch reads its own shards, never a Ray Dataset: the datasets callback would start a
        # DatasetManager actor, one more process importing Ray Data, with every worker group)
        dropped = (PlacementGroupCleanerCallback, DatasetsCallback)
        callbacks = [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]
        return [*callbacks, *WarmImports.for_accelerator(self.accelerator), ReportPlacementGroup(self.runner),
                ReportWorkerNodes(self.runner),
                ReportDecisions(self.runner), AvoidQuarantinedNodes(self.runner),
                *([ReportCoordinatorRequest(self.runner)] if self.coordinator else [])]

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = FailFast(kwargs["failure_policy"], self.judge)
        if not self.coordinator:
            kwargs["scaling_policy"] = without_coordinator(kwargs["scaling_policy"])
        return run_controller_here(kwargs)


def run_controller_here(kwargs: dict):
    """Ray Train's controller, run in this process (the job's runner, a thread of its own) instead
    of in an actor of its own: that actor would be one more Python process importing Ray Train on
    the way to every job's first step (2-3 s when cores are few) and one more process polling
    during the run. Nothing is lost by it: the runner already owns the controller's lifetime (an
    actor the runner creates dies with it, and its workers with it) and orch's workers never call
    the controller (they report to the runner)."""
    from ray.train.v2._internal.execution.controller import TrainController

    async def run():
        controller = TrainController(**kwargs)
        await controller.run()
        return controller.get_result()

    return asyncio.run(run())
