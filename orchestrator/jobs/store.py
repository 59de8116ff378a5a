"""Durable job records in SQLite (one file in the state folder).

Every state change is written (and committed) before the controller acts on it, so a restarted
controller, or `orch status` from another process, sees exactly what happened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrator.constants import JOBS_DB
from orchestrator.errors import ConfigError, JobNotFound
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState, check_transition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    pipeline_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""

_COLUMNS = ("id", "seq", "pipeline_id", "name", "kind", "state", "priority", "created_at")


class JobStore:
    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / JOBS_DB
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            with self._connect() as db:
                db.executescript(_SCHEMA)
                db.execute("SELECT COUNT(*) FROM jobs").fetchone()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path} is not a readable job database ({e}); move it aside (mv {self.path} "
                              f"{self.path}.damaged) to start a new one: "
                              f"the checkpoints in the store are kept") from None

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
            db.commit()
        finally:
            db.close()

    @staticmethod
    def _row(record: JobRecord) -> tuple:
        body = record.to_json()
        return tuple(body[c] for c in _COLUMNS) + (json.dumps(body),)

    @staticmethod
    def _record(body: str) -> JobRecord:
        return JobRecord.from_json(json.loads(body))

    def add(self, records: list[JobRecord]) -> None:
        """Insert new records (one transaction: a pipeline is submitted whole or not at all)."""
        with self._lock, self._connect() as db:
            (top,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
            for i, r in enumerate(records, 1):
                r.seq = top + i
                r.history.append({"state": r.state.value, "at": time.time(), "reason": "submitted"})
                db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           self._row(r))

    def get(self, job_id: str) -> JobRecord:
        with self._connect() as db:
            row = db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r} in {self.path}; `orch status` lists the jobs")
        return self._record(row[0])

    def get_many(self, job_ids: list[str]) -> list[JobRecord]:
        """The records of `job_ids`, in that order, read on one connection (the controller's loop
        reads every job it drives each second: one connection per job cost seconds at 10,000 jobs)."""
        found: dict[str, JobRecord] = {}
        with self._connect() as db:
            for i in range(0, len(job_ids), 500):  # (SQLite limits the parameters of one query)
                chunk = job_ids[i:i + 500]
                marks = ", ".join("?" * len(chunk))
                for job_id, body in db.execute(f"SELECT id, body FROM jobs WHERE id IN ({marks})", chunk):
                    found[job_id] = self._record(body)
        missing = next((i for i in job_ids if i not in found), None)
        if missing is not None:
            raise JobNotFound(f"no job {missing!r} in {self.path}; `orch status` lists the jobs")
        return [found[i] for i in job_ids]

    def list(self, pipeline_id: str | None = None) -> list[JobRecord]:
        with self._connect() as db:
            if pipeline_id:
                rows = db.execute("SELECT body FROM jobs WHERE pipeline_id = ? ORDER BY seq", (pipeline_id,)).fetchall()
            else:
                rows = db.execute("SELECT body FROM jobs ORDER BY seq").fetchall()
        return [self._record(r[0]) for r in rows]

    def _write(self, db, record: JobRecord) -> None:
        db.execute(
            "UPDATE jobs SET state = ?, priority = ?, body = ? WHERE id = ?",
            (record.state.value, record.priority, json.dumps(record.to_json()), record.id),
        )

    def update(self, job_id: str, **fields) -> JobRecord:
        """Change non-state fields (metrics, checkpoint, ...); merges dicts given for `metrics`/`wandb`."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.path}")
            record = self._record(row[0])
            for k, v in fields.items():
                if k == "state":
                    raise ValueError("use transition() to change a job's state")
                if k in ("metrics", "wandb"):
                    getattr(record, k).update(v)
                else:
                    setattr(record, k, v)
            self._write(db, record)
            return record

    def transition(self, job_id: str, new: JobState, reason: str = "", **fields) -> JobRecord:
        """Move a job to `new` (checked against the state machine) and persist it at once."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.path}")
            record = self._record(row[0])
            check_transition(record.state, new)
            record.state = new
            record.history.append({"state": new.value, "at": time.time(), "reason": reason})
            for k, v in fields.items():
                setattr(record, k, v)
            self._write(db, record)
            return record

    # ------------------------------------------------------------------ cluster-wide settings
    def get_setting(self, key: str) -> dict | None:
        """A setting of the cluster kept beside the jobs (the queues' config, the usage ledger)."""
        with self._connect() as db:
            row = db.execute("SELECT body FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_setting(self, key: str, value: dict) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO settings (key, body) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET body = "
                       "excluded.body", (key, json.dumps(value)))
