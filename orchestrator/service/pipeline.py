"""The embedded pipeline behind `orch run`: connect (or start) Ray, submit the jobs, drive them.

Each `orch run` holds a lock file per pipeline it drives (`<state_dir>/orch-run/<pipeline id>.lock`)
for as long as it runs: the file marks the pipeline as one of `orch run`'s, and a lock nobody holds
says that no live process drives it (after a reboot or a SIGKILL, where no `finally` recorded the
interruption), so a later `orch run --resume` may continue it (orchestrator.jobs.retry).
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.config.schema import JobConfig, RootConfig
from orchestrator.config.typed import to_dict
from orchestrator.constants import JOBS_DB, RUN_LOCKS_DIR
from orchestrator.errors import ClusterError
from orchestrator.execution.launcher import new_controller
from orchestrator.execution.preflight import preflight
from orchestrator.joblogs import EventLog
from orchestrator.jobs.controller import new_pipeline_id
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.retry import ABANDONED, Resumable, find_resumable
from orchestrator.jobs.store import JobStore
from orchestrator.raycluster.connect import capacity, check_storage_reachable, connect, embedded
from orchestrator.storage import open_store


@dataclass
class Plan:
    """One pipeline `orch run` drives: composed now, and the earlier one it continues (if any)."""

    root: RootConfig
    jobs: list[JobConfig]
    overrides: list[str] = field(default_factory=list)  # a sweep's combination
    resume: Resumable | None = None


def _locks(state_dir: str) -> Path:
    return Path(state_dir) / RUN_LOCKS_DIR


@contextmanager
def driving(state_dir: str, pipeline_id: str):
    """Hold the pipeline's lock file while this process drives it (the OS drops it when the process dies)."""
    path = _locks(state_dir) / f"{pipeline_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"pipeline {pipeline_id} is being run by another `orch run` (it holds {path}); "
                               f"wait for it, or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _driven(path: Path) -> bool:
    """Whether a live process holds this lock file."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def find_interrupted(root: RootConfig, jobs: list[JobConfig]) -> tuple[Resumable | None, str]:
    """The newest earlier `orch run` pipeline of the state folder with these resolved job configs
    that did not finish (and no live process drives), else None and why not."""
    if not os.path.exists(os.path.join(root.state_dir, JOBS_DB)) or not _locks(root.state_dir).is_dir():
        return None, f"no earlier `orch run` in {root.state_dir}"
    drivers = {p.stem: _driven(p) for p in _locks(root.state_dir).glob("*.lock")}
    now = {j.name: json.loads(json.dumps(to_dict(j))) for j in jobs}  # as the records hold them (JSON)
    return find_resumable(JobStore(root.state_dir).list(), now, drivers)


def run_pipelines(plans: list[Plan], say: Callable[[str], None] = print, verbose: bool = False,
                  sweep_id: str | None = None, watch: Callable[[list[JobRecord]], None] | None = None
                  ) -> list[JobRecord]:
    """Drive the plans' pipelines on one cluster until every job has ended; their final records.
    New pipelines are submitted together (a sweep's: its id their W&B group), so the controller runs
    them side by side when their workers fit, else in turn; a plan with `resume` continues it.
    `say` gets the log lines (also kept in the state folder: `orch logs`), `watch` the records after
    each pass of the controller (progress bars)."""
    root = plans[0].root
    for plan in plans:
        store = open_store(plan.root.storage.root, endpoint_url=plan.root.storage.endpoint_url,
                           region=plan.root.storage.region)
        store.check(plan.root.storage.root)  # fail fast on a missing bucket or bad credentials
        preflight(plan.jobs)
    events = EventLog(root.state_dir)

    def say_and_keep(msg: str) -> None:  # (the jobs' lines also go to the state folder: `orch logs`)
        say(msg)
        events.write(msg)

    needed = max(j.workers * j.cluster.cpus_per_worker for plan in plans for j in plan.jobs)
    with connect(root.cluster, needed_cpus=needed, verbose=verbose), ExitStack() as held:
        check_storage_reachable(root)
        where = root.cluster.address or "an embedded local Ray cluster"
        say(f"connected to {where} ({', '.join(f'{k} {v:g}' for k, v in capacity().items())})")
        # (on its own embedded cluster with no elastic job, no job needs Ray's AutoscalingCoordinator)
        coordinator = not embedded(root.cluster) or any(j.needs_coordinator for plan in plans for j in plan.jobs)
        controller = new_controller(JobStore(root.state_dir), capacity, say_and_keep, coordinator=coordinator,
                                    ray_storage=os.path.join(root.state_dir, "ray_results"))
        pipelines: list[list[JobRecord]] = []
        for plan in plans:  # continued ones first: they hold the lock before their jobs are queued again
            if plan.resume:
                held.enter_context(driving(root.state_dir, plan.resume.pipeline_id))
                records = controller.resume(plan.resume.pipeline_id, "continued by `orch run --resume`")
                say_and_keep(f"pipeline {plan.resume.pipeline_id} continues ({plan.resume.describe()})")
                pipelines.append(records)
        new = [plan for plan in plans if not plan.resume]
        if new:
            pids = [new_pipeline_id() for _ in new]
            for pid in pids:
                held.enter_context(driving(root.state_dir, pid))
            sweep = {"id": sweep_id, "overrides": [p.overrides for p in new]} if sweep_id else None
            for plan, records in zip(new, controller.submit_sweep([p.jobs for p in new], sweep=sweep,
                                                                  pipeline_ids=pids)):
                tag = f" [sweep {sweep_id}: {' '.join(plan.overrides)}]" if sweep_id else ""
                say_and_keep(f"pipeline {records[0].pipeline_id} ({plan.root.pipeline.name}): "
                             + _stages(records) + tag)
                for r in records:
                    events.write(f"{r.id}: submitted ({r.kind}, {r.workers} workers)"
                                 + (f" after {', '.join(r.depends_on)}" if r.depends_on else ""))
                pipelines.append(records)
        ids = [r.id for records in pipelines for r in records]
        try:
            return controller.run(ids, watch=watch)
        except BaseException:
            # The jobs of this command die with it: record that, so no job is left RUNNING forever.
            controller.abandon(ids, ABANDONED)
            raise


def _stages(records) -> str:
    """The pipeline's jobs in the order they can run: "a -> b, c" when b and c both wait for a."""
    depth: dict[str, int] = {}
    for r in records:  # (in submission order: a job's dependencies come before it)
        depth[r.id] = 1 + max((depth.get(d, -1) for d in r.depends_on), default=-1)
    levels = sorted(set(depth.values()))
    return " -> ".join(", ".join(r.id for r in records if depth[r.id] == level) for level in levels)
