"""A job's logs: its events (what the controller said about it) and its workers' own output.

    <state_dir>/logs/<job id>.log      the job's events, one timestamped line each (and controller.log: all)
    <run>/logs/attempt-<ms>/rank-<R>/<n>.log        what rank R of one worker group printed, one part per upload
    <run>/logs/attempt-<ms>/rank-<R>/traceback.log  the traceback that ended rank R, if one did

Events are written by whoever drives the job (the persistent controller, or `orch run`'s embedded
one); the workers' parts by each Ray Train worker (`orchestrator.train.output`), into the run's
folder in the store, so they outlive the cluster. A worker group (an attempt) is named by the time
its rank 0 started, so attempts sort by name. Every line of a part is `<unix time> <text>`; a part
is never rewritten. `orch logs` reads both and interleaves them by time (`Interleaver`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EVENTS_DIR = "logs"  # in the state folder
CONTROLLER_LOG = "controller.log"
WORKER_LOGS_DIR = "logs"  # in a run's folder of the store
TRACEBACK = "traceback.log"
_PART = re.compile(r"/attempt-(\d+)/rank-(\d+)/(\d+|traceback)\.log$")
_EVENT_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(\.\d+)? ")


# ---------------------------------------------------------------------------------- layout
def worker_logs_uri(run: str) -> str:
    from orchestrator.storage import join_uri

    return join_uri(run, WORKER_LOGS_DIR)


def rank_logs_uri(run: str, attempt: str, rank: int) -> str:
    from orchestrator.storage import join_uri

    return join_uri(worker_logs_uri(run), f"attempt-{attempt}", f"rank-{rank}")


@dataclass(frozen=True, order=True)
class PartName:
    attempt: str  # the worker group: its rank 0's start time in ms (names sort in time order)
    rank: int
    seq: int  # -1 for the traceback


def part_name(uri: str) -> PartName | None:
    """Which attempt, rank and part a worker log object is (None: not one)."""
    m = _PART.search(uri)
    if m is None:
        return None
    return PartName(m.group(1), int(m.group(2)), -1 if m.group(3) == "traceback" else int(m.group(3)))


def stamp(t: float, text: str) -> str:
    """One line of a part."""
    return f"{t:.3f} {text}\n"


# ------------------------------------------------------------------------------------ lines
@dataclass(frozen=True)
class Line:
    t: float  # unix time
    text: str  # as shown (an event line with its timestamp, a worker line after its prefix)


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def parse_part(text: str, prefix: str) -> list[Line]:
    """A part's lines (`<unix time> <text>`), each shown after `prefix`; a line without a time
    (none is written so) keeps the previous one."""
    out, t = [], 0.0
    for raw in text.splitlines():
        head, _, rest = raw.partition(" ")
        try:
            t, body = float(head), rest
        except ValueError:
            body = raw
        out.append(Line(t, f"{prefix}{body}"))
    return out


def parse_events(text: str) -> list[Line]:
    """The lines of a job's event file (`YYYY-mm-dd HH:MM:SS[.mmm] text`), shown as written; a line
    without a time (the rest of a multi-line message) keeps the time of the one before."""
    out, t = [], 0.0
    for raw in text.splitlines():
        m = _EVENT_TIME.match(raw)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + float(m.group(2) or 0)
        out.append(Line(t, raw))
    return out


class Interleaver:
    """Lines from several sources, given out in time order. `take(until)` gives the lines up to a
    time (those later may still be overtaken by a line not uploaded yet) or, with None, all."""

    def __init__(self):
        self.pending: list[tuple[float, int, str]] = []  # (time, arrival, text): ties keep arrival order
        self.n = 0

    def add(self, lines: list[Line]) -> None:
        for line in lines:
            self.n += 1
            self.pending.append((line.t, self.n, line.text))

    def take(self, until: float | None = None) -> list[str]:
        self.pending.sort(key=lambda p: (p[0], p[1]))
        k = len(self.pending) if until is None else next(
            (i for i, p in enumerate(self.pending) if p[0] > until), len(self.pending))
        out, self.pending = self.pending[:k], self.pending[k:]
        return [p[2] for p in out]


# ----------------------------------------------------------------------------------- events
class EventLog:
    """The state folder's event files: every line in controller.log, a job's also in <job>.log
    (a message `<job id>: ...` is the job's)."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir) / EVENTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def write(self, msg: str) -> None:
        line = f"{format_time(time.time())} {msg}\n"
        job_id, sep, _ = msg.partition(": ")
        with self.lock:
            with open(self.dir / CONTROLLER_LOG, "a") as f:
                f.write(line)
            if sep and job_id and "/" not in job_id and " " not in job_id and job_id not in (".", ".."):
                with open(self.dir / f"{job_id}.log", "a") as f:
                    f.write(line)


def read_events(state_dir: str | os.PathLike[str], job_id: str, offset: int = 0) -> tuple[str, int]:
    """The text of a job's event file from byte `offset` on, and the offset after it."""
    path = Path(state_dir) / EVENTS_DIR / f"{job_id}.log"
    if not path.exists():
        return "", offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # whole lines only: the rest is still being written
    return data[:end].decode(errors="replace"), offset + end


# ----------------------------------------------------------------------------------- workers
class WorkerLogReader:
    """Reads a run's worker logs from the store, each part once: rank `rank`'s output and every
    other rank's traceback, each line shown as `<time> [rank R] text` (`[attempt N rank R]` after
    the first worker group)."""

    def __init__(self, store, run: str, rank: int):
        self.store, self.run, self.rank = store, run, rank
        self.seen: set[str] = set()
        self.ranks: set[int] = set()  # ranks with output, seen so far

    @staticmethod
    def _prefix(name: PartName, attempts: list[str]) -> str:
        n = attempts.index(name.attempt) + 1  # (a later attempt sorts after: the numbers stay)
        return f"[rank {name.rank}] " if n == 1 else f"[attempt {n} rank {name.rank}] "

    def read(self) -> list[Line]:
        """The lines of the parts written since the last read."""
        parts = [(n, o.uri) for o in self.store.list(worker_logs_uri(self.run) + "/")
                 if (n := part_name(o.uri)) is not None]
        attempts = sorted({n.attempt for n, _ in parts})
        self.ranks |= {n.rank for n, _ in parts}
        out: list[Line] = []
        for name, uri in sorted(parts):
            if uri in self.seen or (name.rank != self.rank and name.seq >= 0):
                continue
            if name.rank == self.rank and name.seq < 0:
                continue  # its traceback is in its own output too
            text = self.store.get(uri).decode(errors="replace")
            self.seen.add(uri)
            prefix = self._prefix(name, attempts)
            if name.seq < 0:
                prefix += "traceback: "
            out += [Line(line.t, f"{format_time(line.t)} {line.text}") for line in parse_part(text, prefix)]
        return out


# ------------------------------------------------------------------------------------- view
def show_logs(read, open_workers, emit, *, follow: bool = False, events_only: bool = False,
              warn=None, poll_s: float = 1.0, lag_s: float | None = None, clock=time.time, sleep=time.sleep) -> None:
    """`orch logs`: the job's events and its workers' lines, interleaved by time, through `emit`.

    `read(offset)` -> {"text": events from byte `offset`, "offset", "terminal", "record"};
    `open_workers(record)` -> a `WorkerLogReader`. With `follow`, read again every `poll_s` until
    the job is terminal; a line is shown once it is `lag_s` old (a worker uploads every
    WORKER_LOG_UPLOAD_S: an earlier line of it may still come), all of them at the end. A store
    that cannot be read costs the workers' lines (one `warn`), never the events."""
    from orchestrator.constants import WORKER_LOG_UPLOAD_S

    lag_s = WORKER_LOG_UPLOAD_S + 2 * poll_s if lag_s is None else lag_s
    offset, workers, merged, failed, ended, listed = 0, None, Interleaver(), False, False, None
    while True:
        out = read(offset)
        offset = out["offset"]
        merged.add(parse_events(out["text"]))
        done = not follow or ended
        # (the store is listed once per upload interval: a worker's new part comes no more often)
        if not events_only and not failed and (done or listed is None or clock() - listed >= WORKER_LOG_UPLOAD_S):
            listed = clock()
            try:
                workers = workers or open_workers(out["record"])
                merged.add(workers.read())
            except Exception as e:  # noqa: BLE001 - the events are still worth showing
                from orchestrator.errors import ConfigError

                if isinstance(e, ConfigError):
                    raise
                failed = True
                if warn is not None:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    warn(f"the workers' output could not be read ({type(e).__name__}: {first}); the events only")
        for line in merged.take(None if done else clock() - lag_s):
            emit(line)
        if done:
            return
        ended = out["terminal"]  # (one more read: the lines said as it ended)
        sleep(poll_s)
