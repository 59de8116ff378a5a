"""A job's metrics history in its run folder of the object store: the project's own record of what
the model did, one row per logged step, whatever `tracking` says. W&B, `orch status` and the tests
read it.

    <run>/metrics/parts/a<attempt>-<n>.jsonl   what one attempt's rank 0 appended, one small object per flush
    <run>/metrics/history.json                 the compacted history, rewritten when a checkpoint commits

Every worker group (an attempt) numbers itself one past the highest attempt in the store and
writes a header (the step it resumed from). An attempt that resumed from step N supersedes every
row of earlier attempts after N (those steps are trained again): `resolve` keeps exactly one row
per step, the one the model's surviving line of training produced. A row killed before it was
written is one a later attempt writes again, since no checkpoint after it was committed without it.

A row: {"step", "attempt", "world_size", "time", "metrics": {name: value}, "events": [...]}; events
mark what happened at that step: start/restart/resize/scale/resume (the first row of an attempt) and
checkpoint (a commit). The row of an attempt's first step also has "startup": when each of its
start-up stages ended (worker process start, train function, data, engine + restore, first batch,
first step; unix times), which bench/overhead.py reads.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from orchestrator.storage import ObjectNotFound, ObjectStore, join_uri

log = logging.getLogger(__name__)

HISTORY_DIR = "metrics"
PARTS_DIR = "parts"
COMPACTED = "history.json"


def history_uri(run: str) -> str:
    return join_uri(run, HISTORY_DIR)


def _part_attempt(uri: str) -> int:
    """The attempt of a part object `.../a00003-000012.jsonl`."""
    return int(uri.rsplit("/", 1)[-1].split("-")[0][1:])


# ------------------------------------------------------------------------------ pure resolution
def resolve(starts: dict[int, int], rows: list[dict]) -> list[dict]:
    """One row per step, sorted: a row of attempt `a` survives only if no later attempt resumed
    from before its step; rows of one attempt at the same step are merged (a train row, then the
    eval row and the checkpoint event of that step). `starts`: attempt -> the step it resumed from."""
    def superseded(a: int, step: int) -> bool:
        return any(b > a and step > s for b, s in starts.items())

    merged: dict[int, dict] = {}
    for row in sorted(rows, key=lambda r: r["attempt"]):  # (stable: a part's order is kept)
        a, step = row["attempt"], row["step"]
        if superseded(a, step):
            continue
        have = merged.get(step)
        if have is None or have["attempt"] < a:
            merged[step] = {**row, "metrics": dict(row.get("metrics") or {}), "events": list(row.get("events") or [])}
        else:
            have["metrics"].update(row.get("metrics") or {})
            have["events"] += row.get("events") or []
            for key, value in row.items():  # (e.g. "startup": when the attempt's start-up stages ended)
                have.setdefault(key, value)
    return [merged[s] for s in sorted(merged)]


def losses(rows: list[dict], key: str = "train/loss") -> dict[int, float]:
    """{step: value} of one metric over resolved rows."""
    return {r["step"]: r["metrics"][key] for r in rows if key in r["metrics"]}


# ------------------------------------------------------------------------------------ reading
def _read_parts(store: ObjectStore, run: str, cache: dict[str, list[dict]] | None = None
                ) -> tuple[dict[str, list[dict]], dict[int, int], list[dict], dict]:
    """({part uri: its items} read, attempt starts, rows, compacted document) of a run's history in
    the store. `cache`: parts read before (a part is never rewritten), kept to those still listed."""
    prefix = join_uri(history_uri(run), PARTS_DIR) + "/"
    uris = sorted(o.uri for o in store.list(prefix) if o.uri.endswith(".jsonl"))
    try:
        base = json.loads(store.get(join_uri(history_uri(run), COMPACTED)))
    except ObjectNotFound:
        base = {"through": 0, "starts": {}, "rows": []}
    starts = {int(a): s for a, s in base.get("starts", {}).items()}
    rows = list(base.get("rows", []))
    read: dict[str, list[dict]] = {}
    for uri in uris:
        if cache is not None and uri in cache:
            read[uri] = cache[uri]
            continue
        try:
            text = store.get(uri).decode()
        except ObjectNotFound:  # compacted away since listed: its rows are in a newer base
            base["missing"] = True
            continue
        read[uri] = [json.loads(line) for line in text.splitlines() if line.strip()]
    for items in read.values():
        for item in items:
            if item.get("header"):
                starts[item["attempt"]] = item["start"]
            else:
                rows.append(item)
    if cache is not None:
        cache.clear()
        cache.update(read)
    return read, starts, rows, base


def read_history(store: ObjectStore, run: str, cache: dict[str, list[dict]] | None = None) -> dict:
    """{"uri", "attempts": {attempt: resumed from step}, "rows": one per step}. `cache`: a dict the
    caller keeps between reads, so that a poll fetches only the parts written since the last one."""
    for _ in range(3):  # a part compacted away after the base was read: read again
        _read, starts, rows, base = _read_parts(store, run, cache)
        if not base.get("missing"):
            break
    return {"uri": history_uri(run), "attempts": {str(a): s for a, s in sorted(starts.items())},
            "rows": resolve(starts, rows)}


def next_attempt(store: ObjectStore, run: str) -> int:
    """One past the highest attempt in the run's history (1 for a new run)."""
    _read, starts, rows, _base = _read_parts(store, run)
    seen = list(starts) + [r["attempt"] for r in rows]
    return max(seen, default=0) + 1


# ------------------------------------------------------------------------------------ writing
class HistoryWriter:
    """Rank 0's recorder: one attempt's rows into the store, each flush its own small object.

    It has the tracker's methods (log, summary, finish) so the training loop logs through it; a
    failed write is retried with the next flush (training goes on: a warning, once)."""

    def __init__(self, store: ObjectStore, run: str, *, world_size: int, start_step: int, reason: str,
                 clock=time.time, background: bool = False):
        self.store, self.run, self.world_size, self.clock = store, run, world_size, clock
        self.attempt = next_attempt(store, run)
        self.start_step = start_step
        self._lock = threading.Lock()  # the pending rows
        self._io = threading.RLock()  # writes to the store: one part at a time, in order; compaction
        self._pending: list[dict] = [{"header": True, "attempt": self.attempt, "start": start_step,
                                      "world_size": world_size, "reason": reason, "time": clock()}]
        self._events: list[dict] = [{"kind": reason, "from_step": start_step, "world_size": world_size}]
        self._n = 0
        self._warned = False
        self.last_step = start_step
        self.flush()
        # background: rows are written by a thread (woken by each row, and every FLUSH_S), so the
        # training step never waits for the store; a commit (compact) and finish write what is pending.
        self._wake = threading.Event()
        self._closed = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._flusher, name="orch-history", daemon=True)
            self._thread.start()

    FLUSH_S = 5.0

    def _flusher(self) -> None:
        while not self._closed:
            self._wake.wait(self.FLUSH_S)
            self._wake.clear()
            self.flush()

    # the tracker's methods
    def log(self, metrics: dict[str, float], step: int) -> None:
        self.append(step, metrics)

    def summary(self, values: dict) -> None:
        self.append(self.last_step, values)

    def finish(self, exit_code: int = 0) -> None:
        if self._thread is not None:
            self._closed = True
            self._wake.set()
            self._thread.join(timeout=60)
        self.flush()

    def append(self, step: int, metrics: dict | None = None, events: list[dict] | None = None,
               **fields) -> None:
        """A row (or more values, events or other `fields` for a step already logged), written at once
        (by the flusher thread in the background)."""
        with self._lock:
            evs = list(events or [])
            if self._events and metrics:  # the attempt's marker goes on its first row of metrics
                evs, self._events = self._events + evs, []
            self._pending.append({**fields, "step": step, "attempt": self.attempt, "world_size": self.world_size,
                                  "time": self.clock(), "metrics": dict(metrics or {}), "events": evs})
            self.last_step = max(self.last_step, step)
        if self._thread is not None:
            self._wake.set()
        else:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one new part (a failed write keeps them for the next flush)."""
        with self._io:
            with self._lock:
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._n += 1
                uri = join_uri(history_uri(self.run), PARTS_DIR, f"a{self.attempt:05d}-{self._n:06d}.jsonl")
            body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in batch).encode()
            try:
                self.store.put(uri, body)
            except Exception as e:  # noqa: BLE001 - the history must never stop training
                with self._lock:
                    self._pending = batch + self._pending
                self._warn(f"could not write metrics history to {uri} ({e}); retrying with the next row")

    def compact(self, through: int) -> None:
        """At a checkpoint commit of step `through`: one compacted history of the rows up to it, and
        the parts it replaces removed (earlier attempts' all, this attempt's up to `through`)."""
        with self._io:
            self.flush()
            try:
                read, starts, rows, _base = _read_parts(self.store, self.run)
                kept = [r for r in resolve(starts, rows) if r["step"] <= through]
                doc = {"through": through, "starts": {str(a): s for a, s in sorted(starts.items())}, "rows": kept}
                self.store.put(join_uri(history_uri(self.run), COMPACTED), json.dumps(doc).encode())
                for uri, items in read.items():
                    if self._consumed(uri, items, through):
                        self.store.delete(uri)
            except Exception as e:  # noqa: BLE001 - parts stay; the next commit compacts them
                self._warn(f"could not compact the metrics history at step {through} ({e})")

    def _consumed(self, uri: str, items: list[dict], through: int) -> bool:
        """Whether the compacted history holds everything of part `uri` (a header is in its starts)."""
        if _part_attempt(uri) < self.attempt:
            return True
        return all(i.get("header") or i["step"] <= through for i in items)

    def _warn(self, msg: str) -> None:
        if not self._warned:
            log.warning(msg)
            self._warned = True


class NullHistory:
    """What ranks other than 0 log through."""

    last_step = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass

    def append(self, step: int, metrics: dict | None = None, events: list[dict] | None = None, **fields) -> None:
        pass

    def compact(self, through: int) -> None:
        pass
