"""Start, poll, stop and find jobs' runners on Ray: each job runs in a `JobRunner` actor that owns
its Ray Train run (`orchestrator.execution.ray_train`).

`RayLauncher.start` returns at once; `poll` reads the runner's events after a sequence number.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray._raylet import PlacementGroupID
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config.compose import job_config_from_dict
from orchestrator.errors import ClusterError
from orchestrator.execution.runner import RUNNER_PREFIX, JobRunner, cancel_coordinator_requests
from orchestrator.jobs.controller import Controller
from orchestrator.jobs.events import AttemptReason, EventKind, RunnerPoll, RunnerStatus
from orchestrator.jobs.quarantine import NodeSlot
from orchestrator.jobs.record import JobRecord

# The Ray versions the tests ran on (pyproject.toml pins the same range): Ray Train V2 internals.
RAY_TESTED = ((2, 60), (2, 60))


def check_ray_version(version: str | None = None) -> None:
    """One line, before anything starts, when another Ray is installed."""
    version = version or ray.__version__
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    low, high = RAY_TESTED
    if not low <= major_minor <= high:
        raise ClusterError(
            f"orch needs Ray {low[0]}.{low[1]}.x (it uses Ray Train V2 internals that change between releases), "
            f"found Ray {version}; install it with: pip install 'ray[default,train]=={low[0]}.{low[1]}.*'"
        )


@dataclass
class RunHandle:
    job_id: str
    actor: object
    placement_groups: list[str] = field(default_factory=list)  # hex ids its worker groups reported
    coordinator_requests: list[str] = field(default_factory=list)  # its runs' AutoscalingCoordinator requests


class RayLauncher:
    """Starts each job as a `JobRunner` actor on the connected Ray cluster.

    `detached=True` (the persistent controller) makes runners named and detached, so they survive
    the controller; `orch run` keeps them owned by its own process, so they end with it.
    `coordinator=False` (`orch run` on its embedded cluster with no elastic job): only elastic jobs
    and jobs on an autoscaling cluster register with Ray's AutoscalingCoordinator
    (`JobConfig.needs_coordinator`); where elastic jobs may share the cluster, every job must.
    """

    def __init__(self, ray_storage: str | None = None, detached: bool = False, namespace: str | None = None,
                 node_id: str | None = None, coordinator: bool = True):
        check_ray_version()
        self.ray_storage = ray_storage
        self.coordinator = coordinator
        self.detached = detached
        self.namespace = namespace
        self.node_id = node_id  # pin runners to this node (the controller's), where state_dir lives

    def _options(self, record: JobRecord) -> dict:
        opts: dict = dict(num_cpus=0, max_concurrency=16, max_restarts=0)
        if self.detached:
            opts.update(name=RUNNER_PREFIX + record.id, namespace=self.namespace, lifetime="detached")
        if self.node_id:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node_id, soft=True)
        return opts

    def start(self, record: JobRecord, init_from: str | None, reason: AttemptReason) -> RunHandle:
        if self.detached:
            existing = self.attach(record)
            if existing is not None:  # never two runners for one job
                return existing
        actor = ray.remote(JobRunner).options(**self._options(record)).remote(
            record.to_json(), init_from, reason.value, self.ray_storage, self.coordinator)
        return RunHandle(record.id, actor)

    def attach(self, record: JobRecord) -> RunHandle | None:
        """The job's live runner, if there is one (after a controller restart)."""
        try:
            actor = ray.get_actor(RUNNER_PREFIX + record.id, namespace=self.namespace)
            ray.get(actor.ping.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - no runner, or a dead one
            return None
        return RunHandle(record.id, actor)

    def poll(self, handle: RunHandle, after_seq: int) -> RunnerPoll:
        try:
            events = ray.get(handle.actor.events.remote(after_seq), timeout=30)
        except GetTimeoutError:
            return RunnerPoll(RunnerStatus.BUSY)
        except RayActorError as e:
            return RunnerPoll(RunnerStatus.LOST,
                              reason=f"the job's runner died ({str(e).strip().splitlines()[0][:200]})")
        handle.placement_groups += [e.data["placement_group"] for e in events
                                    if e.kind is EventKind.WORKER_GROUP_PLACED and e.data["placement_group"]
                                    not in handle.placement_groups]
        handle.coordinator_requests += [e.data["requester"] for e in events if e.kind is EventKind.COORDINATOR_REQUEST
                                        and e.data["requester"] not in handle.coordinator_requests]
        return RunnerPoll(RunnerStatus.ALIVE, tuple(events))

    def wait(self, polls: list[tuple[RunHandle, int]], timeout: float) -> None:
        """Sleep up to `timeout` s; return as soon as one runner has an event after its sequence
        number in `polls` that changes its job's state (or has died)."""
        # Futures, not ray.wait: a signal handler's SystemExit(143) raised inside ray.wait comes out
        # as SystemExit(1) (seen with Ray 2.60); a futures wait is plain Python and keeps it.
        futures = [handle.actor.wait_events.remote(seq, timeout).future() for handle, seq in polls]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            time.sleep(timeout)

    def request_stop(self, handle: RunHandle, request: dict) -> None:
        ray.get(handle.actor.request_stop.remote(request), timeout=30)

    def exclude(self, handle: RunHandle, nodes: dict[str, float], upto: int | None) -> None:
        """Tell the runner the quarantined nodes (not waited for: a busy runner takes it when it can)."""
        handle.actor.exclude_nodes.remote(nodes, upto)

    def kill(self, handle: RunHandle) -> None:
        """Stop the job now: free its worker group's placement group, then kill the runner (the
        worker group it owns goes with it, and its name is free again)."""
        try:
            ray.get(handle.actor.release.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead runner releases nothing: free what it reported
            for pg_id in handle.placement_groups:  # (created under `orch run`, they outlive their runner)
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
                except Exception:  # noqa: BLE001 - already removed
                    pass
            cancel_coordinator_requests(handle.coordinator_requests)  # (else they hold the room for 180 s)
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def new_controller(store, capacity: Callable[[], dict[str, float]], say: Callable[[str], None], queues=None,
                   **launcher_options):
    """A `Controller` on the connected Ray cluster (used by `orch run` and the controller actor). Where
    every job registers with Ray's AutoscalingCoordinator (RayLauncher's `coordinator`), the actor is
    created now, in the background."""
    launcher = RayLauncher(**launcher_options)
    if launcher.coordinator:
        threading.Thread(target=warm_coordinator, name="warm-coordinator", daemon=True).start()
    return Controller(store, launcher, capacity=capacity, say=say, validate=job_config_from_dict, queues=queues,
                      nodes=alive_nodes)


def alive_nodes() -> list[NodeSlot]:
    """The cluster's alive nodes with their total CPU/GPU (the quarantine keeps every job able to fit)."""
    return [NodeSlot(n["NodeID"], n.get("NodeManagerAddress", "?"),
                     {k: float(v) for k, v in (n.get("Resources") or {}).items() if k in ("CPU", "GPU")})
            for n in ray.nodes() if n.get("Alive")]


def warm_coordinator() -> None:
    """Ray Train's controller creates the AutoscalingCoordinator actor when a cluster has none, on
    the way to the run's first worker group: one more process start and Ray Data's imports (3 s
    seen on 2 cores). The controller creates it ahead, in the background, whenever a job may need
    it (`orch run` decides from its jobs); it is detached, so later jobs find it."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - Ray Train creates it itself when it needs it
        pass
