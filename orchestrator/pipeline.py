"""The embedded pipeline behind `orch run`: connect (or start) Ray, submit the jobs, drive them."""

from __future__ import annotations

import os
from typing import Callable

from orchestrator.cluster import capacity, check_storage_reachable, connect
from orchestrator.config.schema import JobConfig, RootConfig
from orchestrator.joblogs import EventLog
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.store import JobStore
from orchestrator.launcher import new_controller
from orchestrator.preflight import preflight
from orchestrator.storage import open_store


def run_pipeline(root: RootConfig, jobs: list[JobConfig], say: Callable[[str], None] = print,
                 verbose: bool = False, watch: Callable[[list[JobRecord]], None] | None = None) -> list[JobRecord]:
    """Run the pipeline's jobs to their end; `say` gets the log lines, `watch` the records after
    each pass of the controller (progress bars)."""
    store = open_store(root.storage.root, endpoint_url=root.storage.endpoint_url, region=root.storage.region)
    store.check(root.storage.root)  # fail fast on a missing bucket or bad credentials
    preflight(jobs)
    events = EventLog(root.state_dir)

    def say_and_keep(msg: str) -> None:  # (the jobs' lines also go to the state folder: `orch logs`)
        say(msg)
        events.write(msg)

    needed = max(j.workers * j.cluster.cpus_per_worker for j in jobs)
    with connect(root.cluster, needed_cpus=needed, verbose=verbose):
        check_storage_reachable(root)
        where = root.cluster.address or "an embedded local Ray cluster"
        say(f"connected to {where} ({', '.join(f'{k} {v:g}' for k, v in capacity().items())})")
        controller = new_controller(JobStore(root.state_dir), capacity, say_and_keep,
                                    ray_storage=os.path.join(root.state_dir, "ray_results"))
        records = controller.submit(jobs)
        say_and_keep(f"pipeline {records[0].pipeline_id} ({root.pipeline.name}): "
                     + " -> ".join(f"{r.id}" for r in records))
        for r in records:
            events.write(f"{r.id}: submitted ({r.kind}, {r.workers} workers)"
                         + (f" after {', '.join(r.depends_on)}" if r.depends_on else ""))
        ids = [r.id for r in records]
        try:
            return controller.run(ids, watch=watch)
        except BaseException:
            # The jobs of this command die with it: record that, so no job is left RUNNING forever.
            controller.abandon(ids, "orch run was interrupted before the job finished")
            raise
