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
    from orchestrator.workspace import open_job_store

    from orchestrator.data.prepare import ensure_dataset

    for job in jobs:
        check_no_secrets(job)
    for job in jobs:
        if try_load_manifest(open_job_store(job), job.data.uri) is not None:
            check_dataset_matches(job)
        elif not job.data.source and not any(j.data.uri == job.data.uri and j.data.source for j in jobs):
            ensure_dataset(open_job_store(job), job.data)  # raises: nothing there, nothing to make it from
        if job.init_from:
            check_init_matches(job, job.init_from)
        if job.resume_from:
            check_resume_source(job)


def check_resume_source(job: JobConfig) -> None:
    """`resume_from` must hold a committed checkpoint."""
    from orchestrator.checkpoint.layout import latest_committed
    from orchestrator.constants import COMMIT_MARKER
    from orchestrator.errors import CheckpointError
    from orchestrator.storage import join_uri
    from orchestrator.workspace import open_job_store

    store, src = open_job_store(job), job.resume_from.rstrip("/")
    if not store.exists(join_uri(src, COMMIT_MARKER)) and latest_committed(store, src) is None:
        raise CheckpointError(f"resume_from={job.resume_from} holds no committed checkpoint; give a "
                              f".../checkpoints/step-N URI or a run URI with checkpoints")


def check_no_secrets(job: JobConfig) -> None:
    """Refuse a config that holds the value of a secret environment variable: job records, W&B
    and checkpoints store configs, and secrets must live in the environment only."""
    from orchestrator.config.typed import to_dict
    from orchestrator.constants import SECRET_ENV_VARS
    from orchestrator.errors import ConfigError

    secrets = {name: os.environ[name] for name in SECRET_ENV_VARS if len(os.environ.get(name, "")) >= 8}

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, str):
            for name, secret in secrets.items():
                if secret in value:
                    raise ConfigError(f"config key '{path}' holds the value of {name}; secrets belong in environment "
                                      f"variables only, never in a config: remove it from the override or conf/")

    walk(to_dict(job), "")


def check_storage_reachable(root: RootConfig) -> None:
    """A local-folder store only works when every node sees the same folder: one machine, or a
    shared mount (storage.shared=true)."""
    import ray

    from orchestrator.errors import ConfigError

    if root.storage.backend != "local" or root.storage.shared:
        return
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 or root.cluster.autoscaling:
        raise ConfigError(
            f"storage=local writes to {root.storage.root} on this machine, which the other nodes of the cluster "
            f"({len(hosts)} hosts) cannot read; use storage=s3 storage.root=s3://BUCKET/PREFIX, or storage.shared=true "
            f"if that folder is a mount every node has"
        )


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
        check_storage_reachable(root)
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
