"""What a job left in its store, read from its record: the store itself, the metrics history (one
row per logged step, exact after any resume) and the workers' output. `orch status`, `orch logs`,
`orch report` and bench/gpu.py read them here."""

from __future__ import annotations

from orchestrator.checkpoint.layout import run_uri
from orchestrator.errors import ConfigError
from orchestrator.jobs.record import JobRecord
from orchestrator.storage import ObjectStore, open_store


def record_store(config: dict) -> ObjectStore:
    """The object store of a job, from its frozen config (a record's `config`)."""
    storage = config.get("storage") or {}
    return open_store(storage["root"], endpoint_url=storage.get("endpoint_url"), region=storage.get("region"))


def record_run_uri(config: dict, job_id: str) -> str:
    return run_uri((config.get("storage") or {}).get("root", ""), job_id)


def metrics_history(record: JobRecord, unreachable: dict | None = None) -> dict:
    """The job's metrics history from its run folder in the store: one row per logged step (what
    the model produced, after any resume), with the attempts and their markers. `unreachable`:
    stores that failed before (by root and endpoint), not asked again."""
    from orchestrator.train.history import history_uri, read_history

    storage = record.config.get("storage") or {}
    run = record_run_uri(record.config, record.id)
    where = (storage.get("root"), storage.get("endpoint_url"))
    unreachable = {} if unreachable is None else unreachable
    if where in unreachable:
        return {"uri": history_uri(run), "error": unreachable[where]}
    try:
        return read_history(record_store(record.config), run)
    except Exception as e:  # noqa: BLE001 - status shows what it can
        first = (str(e).strip().splitlines() or [""])[0][:200]
        unreachable[where] = f"{type(e).__name__}: {first}"
        return {"uri": history_uri(run), "error": unreachable[where]}


def worker_log_reader(record: dict, rank: int):
    """A reader of the job's workers' output in its run folder of the store (`orchestrator.joblogs`)."""
    from orchestrator.joblogs import WorkerLogReader

    most = record["config"].get("max_workers") or record["config"]["workers"]
    if rank >= most:
        raise ConfigError(f"job {record['id']} runs at most {most} worker(s) (ranks 0-{most - 1}), got --rank {rank}")
    return WorkerLogReader(record_store(record["config"]), record_run_uri(record["config"], record["id"]), rank)
