"""The embedded pipeline behind `orch run`: connect (or start) Ray, submit the jobs, drive them."""

from __future__ import annotations

import os
from typing import Callable

from orchestrator.config.schema import JobConfig, RootConfig
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.store import JobStore


def preflight(jobs: list[JobConfig]) -> None:
    """Checks that need the store, made before anything starts: a dataset that is already prepared
    must fit the model, and weights to start from must match the model's architecture."""
    from orchestrator.data.manifest import try_load_manifest
    from orchestrator.launcher import check_dataset_matches, check_init_matches
    from orchestrator.train.loop import open_job_store

    for job in jobs:
        if try_load_manifest(open_job_store(job), job.data.uri) is not None:
            check_dataset_matches(job)
        if job.init_from:
            check_init_matches(job, job.init_from)


def run_pipeline(root: RootConfig, jobs: list[JobConfig], say: Callable[[str], None] = print,
                 verbose: bool = False) -> list[JobRecord]:
    from orchestrator.cluster import capacity, connect
    from orchestrator.controller import Controller
    from orchestrator.launcher import RayLauncher
    from orchestrator.storage import open_store

    store = open_store(root.storage.root, endpoint_url=root.storage.endpoint_url, region=root.storage.region)
    store.check(root.storage.root)  # fail fast on a missing bucket or bad credentials
    preflight(jobs)
    needed = max(j.workers * j.cluster.cpus_per_worker for j in jobs)
    with connect(root.cluster, needed_cpus=needed, verbose=verbose):
        where = root.cluster.address or "an embedded local Ray cluster"
        say(f"connected to {where} ({', '.join(f'{k} {v:g}' for k, v in capacity().items())})")
        controller = Controller(JobStore(root.state_dir), RayLauncher(say=say, ray_storage=os.path.join(root.state_dir, "ray_results")),
                                capacity=capacity, say=say)
        records = controller.submit(jobs)
        say(f"pipeline {records[0].pipeline_id} ({root.pipeline.name}): "
            + " -> ".join(f"{r.id}" for r in records))
        ids = [r.id for r in records]
        try:
            return controller.run(ids)
        except BaseException:
            # The jobs of this command die with it: record that, so no job is left RUNNING forever.
            controller.abandon(ids, "orch run was interrupted before the job finished")
            raise
