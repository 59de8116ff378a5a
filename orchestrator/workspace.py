"""Where a job's bytes live: its object store (datasets, checkpoints, exports) and node-local scratch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from orchestrator.config.schema import JobConfig
from orchestrator.constants import LOCAL_DIR_ENV
from orchestrator.storage import ObjectStore, open_store


def open_job_store(job: JobConfig) -> ObjectStore:
    """The object store that holds the job's data and runs (`storage.root`)."""
    return open_store(job.storage.root, endpoint_url=job.storage.endpoint_url, region=job.storage.region)


def local_scratch(job_id: str) -> Path:
    """Node-local scratch for staging, restores and the shard cache."""
    root = Path(os.environ.get(LOCAL_DIR_ENV) or Path(tempfile.gettempdir()) / "orch")
    return root / job_id
