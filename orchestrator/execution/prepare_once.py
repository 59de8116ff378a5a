"""Preparing a job's dataset on the cluster, once per destination: jobs that need the same dataset
(one `data.uri`, e.g. the jobs of a sweep) would otherwise tokenize into the same folder at once,
and one's clearing of leftovers deletes the shards the other's manifest names. Kept apart from
`ray_train` so that the actor's process imports the data code only, not Ray Train."""

from __future__ import annotations

import hashlib

import ray

from orchestrator.config.schema import JobConfig
from orchestrator.data.prepare import ensure_dataset
from orchestrator.workspace import open_job_store

PREPARE_ACTOR_PREFIX = "orch-prepare-"


class _Preparer:
    """Prepares the dataset of one destination, one call at a time: a second call waits, finds the
    manifest and uses it."""

    def prepare(self, job: JobConfig) -> list[str]:
        store = open_job_store(job)
        store.check(job.storage.root)
        lines: list[str] = []
        ensure_dataset(store, job.data, progress=lines.append)
        return lines


def prepare_dataset_once(job: JobConfig) -> list[str]:
    """Prepare the job's dataset if needed, in the one actor of the cluster (named after `data.uri`,
    in the caller's namespace) that prepares that destination; its progress lines. The actor is
    owned by the first runner that asked and ends with it; a call queued behind it when it ends asks
    a new one, which finds the dataset prepared or prepares it."""
    name = PREPARE_ACTOR_PREFIX + hashlib.sha256(job.data.uri.encode()).hexdigest()[:16]
    for attempt in range(2):
        actor = ray.remote(num_cpus=0, max_concurrency=1)(_Preparer).options(name=name, get_if_exists=True).remote()
        try:
            return ray.get(actor.prepare.remote(job))
        except ray.exceptions.ActorDiedError:
            if attempt:
                raise
