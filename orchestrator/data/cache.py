"""A bounded node-local cache of whole shard files, filled by background download threads.

    cache = ShardCache(store, "/scratch/cache/<signature>", limit_bytes=1 << 30, workers=4)
    cache.register(files)                      # the files it may hold (adopts valid leftovers)
    cache.prefetch(next_files, priority=1)     # fetch in the background, best effort
    with cache.hold(files_of_this_batch) as held:
        tokens = np.memmap(held.paths[key], ...)   # pinned: never evicted while held
    cache.close()

Every file is fetched with ranged GETs in chunks into a temporary file, checked against the
manifest's sha256 (and size), then renamed into place. The bytes on disk (finished files and
downloads in flight) never exceed `limit_bytes`: before a download starts, room is made by evicting
the least recently used files that no batch holds. A prefetch never evicts a prefetched file that
is still waiting to be used, and is skipped (to be asked for again later) when there is no room; a
download a batch waits for may evict any file no batch holds.

A transient storage error (any `StorageError` but `ObjectNotFound`) is retried with exponential
backoff and jitter; a corrupt, truncated or over-long download is fetched once more, then reported
as a `DatasetError` naming the shard's URI.

The cache owns its folder: only one process may use a folder at a time (give each rank its own).
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.errors import DatasetError, StorageError
from orchestrator.storage import ObjectNotFound, ObjectStore
from orchestrator.storage.digest import file_matches, sha256_hasher

MiB = 1 << 20
CHUNK_BYTES = 8 * MiB  # bytes per ranged GET
PARTIAL_SUFFIX = ".part"  # in-flight downloads: .<name>.<uuid>.part next to the final file
DEMAND = -1  # queue priority of a file a batch is waiting for (prefetches use 0, 1, 2, ...)
THREAD_PREFIX = "orch-shard-fetch"  # names of the download threads
MAPS_KEPT = 64  # files kept memory-mapped between holds (each map holds a file descriptor)
IDLE_EXIT_S = 10.0  # a download thread with nothing to do this long exits (a new one starts on demand)


@dataclass(frozen=True)
class ShardFile:
    """One file of a prepared dataset, as the manifest describes it."""

    key: str  # path relative to the dataset URI; also its path under the cache folder
    uri: str  # full URI in the object store
    size: int  # bytes
    sha256: str


@dataclass(frozen=True)
class RetryPolicy:
    """How a ranged GET is retried after a transient storage error: exponential backoff, jitter."""

    attempts: int = 5  # tries per ranged GET, the first one included
    base_delay_s: float = 0.25  # the wait before the first retry is 1/2..1 of this
    max_delay_s: float = 8.0  # ceiling of one wait

    def __post_init__(self):
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"invalid retry policy {self}: need attempts >= 1 and delays >= 0")

    def delay_s(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): half fixed, half random."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))
        return cap / 2 + random.uniform(0, cap / 2)


@dataclass
class Held:
    """What `ShardCache.hold` yields, by file key: each held file's local path and its bytes, memory-
    mapped. The maps are valid only inside the hold: copy what you need out of them."""

    paths: dict[str, Path]
    bytes: dict[str, np.ndarray]  # uint8, read-only; `.view(dtype)` for tokens
    wait_s: float  # how long the hold waited for downloads (and checks) to finish


@dataclass
class CacheStats:
    downloads: int = 0  # files fetched and verified
    bytes_downloaded: int = 0
    retries: int = 0  # ranged GETs retried after a transient error
    refetches: int = 0  # whole files fetched again after a failed check
    evictions: int = 0
    prefetch_skipped: int = 0  # prefetches dropped for lack of room
    adopted: int = 0  # valid files found in the folder when registered


# Entry states.
_ABSENT, _QUEUED, _RESERVING, _DOWNLOADING, _READY = "absent", "queued", "reserving", "downloading", "ready"


class _Closed(Exception):
    """The cache was closed while a download ran."""


@dataclass(eq=False)
class _Entry:
    file: ShardFile
    path: Path
    state: str = _ABSENT
    pins: int = 0  # holds (batches being assembled) that need this file
    fresh: bool = False  # fetched ahead and not yet used: other prefetches may not evict it
    seq: int = -1  # the queue item that is current for this entry
    priority: int = 0
    error: BaseException | None = None
    error_sticks: bool = False  # a bad shard stays bad; a transient failure is tried again
    data: np.ndarray | None = None  # the file memory-mapped, while ready and once held; dropped on eviction


@dataclass
class _Budget:
    limit: int
    used: int = 0  # bytes of ready files and of downloads in flight (reserved in full)
    lru: OrderedDict = field(default_factory=OrderedDict)  # ready entries, least recently used first


class ShardCache:
    """Whole shard files in a local folder, at most `limit_bytes` of them, fetched by `workers`
    background threads. Thread-safe."""

    def __init__(self, store: ObjectStore, folder: str | os.PathLike, limit_bytes: int, *, workers: int = 4,
                 retry: RetryPolicy = RetryPolicy(), chunk_bytes: int = CHUNK_BYTES):
        if limit_bytes <= 0 or workers < 1 or chunk_bytes < 1:
            raise ValueError(f"invalid shard cache: limit_bytes={limit_bytes}, workers={workers}, "
                             f"chunk_bytes={chunk_bytes}")
        self.store, self.folder = store, Path(folder)
        self.workers, self.retry, self.chunk_bytes = workers, retry, chunk_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._budget = _Budget(limit_bytes)
        self._entries: dict[str, _Entry] = {}
        self._mapped: OrderedDict[str, _Entry] = OrderedDict()  # entries with `data`, least recently held first
        self._queue: list[tuple[int, int, str]] = []  # (priority, seq, key), a heap
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # entry states changed (batches and reservations wait)
        self._work = threading.Condition(self._lock)  # the queue got work, or the cache closes (threads wait)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread_ids = itertools.count()

    # ------------------------------------------------------------------------------ public
    @property
    def limit_bytes(self) -> int:
        return self._budget.limit

    @property
    def used_bytes(self) -> int:
        """Bytes of ready files plus downloads in flight."""
        with self._lock:
            return self._budget.used

    def path(self, key: str) -> Path:
        return self.folder / key

    def is_ready(self, key: str) -> bool:
        """Whether `key` is downloaded and verified (and so on disk)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.state == _READY

    def register(self, files: Iterable[ShardFile]) -> None:
        """Declare files the cache may hold. Valid copies left in the folder by an earlier run are
        kept (each is checked against its sha256 once, here); broken ones and stale partial
        downloads are deleted; the oldest are evicted if they exceed the limit."""
        found = []
        with self._lock:
            new = [f for f in files if f.key not in self._entries]
            for f in new:
                self._entries[f.key] = _Entry(f, self.path(f.key))
            for f in new:
                path = self.path(f.key)
                if path.is_file():
                    found.append((path.stat().st_mtime_ns, f))
            _remove_partials(self.folder, {f.key for f in new})
        for _, f in sorted(found, key=lambda t: t[0]):  # oldest first: they are evicted first
            path = self.path(f.key)
            if file_matches(path, f.size, f.sha256):
                with self._lock:
                    entry = self._entries[f.key]
                    entry.state = _READY
                    self._budget.used += f.size
                    self._budget.lru[f.key] = entry
                    self.stats.adopted += 1
            else:
                path.unlink(missing_ok=True)
        with self._lock:
            self._make_room(0, demand=True)  # a smaller limit than the last run's: trim

    def prefetch(self, files: Iterable[ShardFile], priority: int = 0) -> None:
        """Fetch `files` in the background (lower `priority` first); best effort."""
        if priority < 0:
            raise ValueError(f"prefetch priority {priority} must be >= 0")
        with self._lock:
            self._check_open()
            for f in files:
                entry = self._entry(f)
                if entry.state == _ABSENT and not entry.error_sticks:
                    entry.error = None
                    self._schedule(entry, priority)
                elif entry.state == _QUEUED and priority < entry.priority:
                    self._schedule(entry, priority)

    @contextmanager
    def hold(self, files: Iterable[ShardFile]) -> Iterator[Held]:
        """Wait until every file is on disk and verified, and keep them there until the block ends."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_open()
            entries = list({f.key: self._entry(f) for f in files}.values())
            need = sum(e.file.size for e in entries)
            if need > self._budget.limit:
                raise DatasetError(
                    f"one batch reads {len(entries)} shard files of {need / MiB:.2f} MB in all, more than the shard "
                    f"cache holds (data.cache_limit_mb={self._budget.limit / MiB:g}); raise data.cache_limit_mb to "
                    f"at least {need / MiB:.2f}"
                )
            for e in entries:
                e.pins += 1
            try:
                self._wait_ready(entries)
                for e in entries:
                    self._map(e)
            except BaseException:
                self._unpin(entries)
                raise
        try:
            yield Held({e.file.key: e.path for e in entries}, {e.file.key: e.data for e in entries},
                       time.perf_counter() - t0)
        finally:
            with self._lock:
                self._unpin(entries)

    def close(self) -> None:
        """Stop the download threads (downloads in flight are abandoned) and wait for them."""
        self._stop.set()
        with self._lock:
            self._cond.notify_all()
            self._work.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()

    def __enter__(self) -> "ShardCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ bookkeeping (lock held)
    def _check_open(self) -> None:
        if self._stop.is_set():
            raise RuntimeError(f"the shard cache at {self.folder} is closed")

    def _entry(self, f: ShardFile) -> _Entry:
        entry = self._entries.get(f.key)
        if entry is None:
            entry = self._entries[f.key] = _Entry(f, self.path(f.key))
        elif entry.file != f:
            raise ValueError(f"shard cache at {self.folder}: {f.key} is registered as {entry.file}, not {f}")
        return entry

    def _schedule(self, entry: _Entry, priority: int) -> None:
        entry.state, entry.priority, entry.seq = _QUEUED, priority, next(self._seq)
        heapq.heappush(self._queue, (priority, entry.seq, entry.file.key))
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._run_worker, name=f"{THREAD_PREFIX}-{next(self._thread_ids)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._work.notify()

    def _wait_ready(self, entries: list[_Entry]) -> None:
        while True:
            pending = False
            for e in entries:
                if e.state == _READY and e.data is None and not e.path.is_file():  # deleted behind our back
                    self._drop(e)
                if e.state == _READY:
                    continue
                if e.error is not None and e.state == _ABSENT:
                    err = e.error
                    if not e.error_sticks:
                        e.error = None  # reported once; the next batch tries again
                    raise err
                if e.state == _ABSENT:
                    self._schedule(e, DEMAND)
                elif e.state == _QUEUED and e.priority != DEMAND:
                    self._schedule(e, DEMAND)
                pending = True
            if not pending:
                for e in entries:
                    e.fresh = False
                    self._budget.lru.move_to_end(e.file.key)
                return
            self._cond.wait()
            self._check_open()

    def _map(self, entry: _Entry) -> None:
        """Memory-map a held file (kept for the next holds, up to MAPS_KEPT files)."""
        if entry.data is None:
            entry.data = _map(entry.path, entry.file.size)
        self._mapped[entry.file.key] = entry
        self._mapped.move_to_end(entry.file.key)
        if len(self._mapped) > MAPS_KEPT:
            for old in list(self._mapped.values()):
                if len(self._mapped) <= MAPS_KEPT:
                    break
                if old.pins == 0:
                    self._unmap(old)

    def _unmap(self, entry: _Entry) -> None:
        entry.data = None  # unmaps the file: holds copy samples out, so nothing else refers to it
        self._mapped.pop(entry.file.key, None)

    def _unpin(self, entries: list[_Entry]) -> None:
        for e in entries:
            e.pins -= 1
        self._cond.notify_all()

    def _make_room(self, size: int, demand: bool) -> bool:
        """Evict until `size` more bytes fit; False (evicting nothing) if they cannot."""
        b = self._budget
        missing = b.used + size - b.limit
        if missing <= 0:
            return True
        idle = [e for e in b.lru.values() if e.pins == 0]
        victims = [e for e in idle if not e.fresh]  # least recently used first
        if demand:  # then prefetched files, the one wanted furthest ahead first
            victims += sorted((e for e in idle if e.fresh), key=lambda e: -e.priority)
        chosen = []
        for e in victims:
            if missing <= 0:
                break
            chosen.append(e)
            missing -= e.file.size
        if missing > 0:
            return False
        for e in chosen:
            self._evict(e)
        return True

    def _evict(self, entry: _Entry) -> None:
        entry.path.unlink(missing_ok=True)
        self._drop(entry)
        self.stats.evictions += 1

    def _drop(self, entry: _Entry) -> None:
        del self._budget.lru[entry.file.key]
        self._budget.used -= entry.file.size
        entry.state, entry.fresh = _ABSENT, False
        self._unmap(entry)

    def _reserve(self, entry: _Entry) -> bool:
        """Make room for the entry's download. False: a prefetch found no room (it is dropped)."""
        entry.state = _RESERVING
        while True:
            demand = entry.pins > 0
            if self._make_room(entry.file.size, demand):
                self._budget.used += entry.file.size
                entry.state = _DOWNLOADING
                return True
            if not demand:
                entry.state = _ABSENT
                self.stats.prefetch_skipped += 1
                self._cond.notify_all()
                return False
            in_flight = any(e.state == _DOWNLOADING and e.pins == 0 for e in self._entries.values())
            if not in_flight:  # only other batches' files are in the way
                entry.state, entry.error, entry.error_sticks = _ABSENT, DatasetError(
                    f"the shard cache (data.cache_limit_mb={self._budget.limit / MiB:g}) is too small for the batches "
                    f"being read at once; raise data.cache_limit_mb"), False
                self._cond.notify_all()
                return False
            self._cond.wait()  # prefetches in flight become evictable when they finish
            if self._stop.is_set():
                entry.state = _ABSENT
                return False

    # ------------------------------------------------------------------------------ download threads
    def _run_worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    if not self._work.wait(IDLE_EXIT_S) and not self._queue and not self._stop.is_set():
                        # Idle: exit, so a cache nobody closes holds no threads for long.
                        self._threads.remove(threading.current_thread())
                        return
                if self._stop.is_set():
                    return
                _, seq, key = heapq.heappop(self._queue)
                entry = self._entries[key]
                if entry.state != _QUEUED or entry.seq != seq or not self._reserve(entry):
                    continue
            try:
                self._download(entry.file)
                error, sticks = None, False
            except _Closed:
                error, sticks = None, False
            except DatasetError as err:
                error, sticks = err, True
            except StorageError as err:
                error, sticks = err, False
            except OSError as err:
                error, sticks = DatasetError(
                    f"cannot write {entry.file.key} into the shard cache at {self.folder} ({err.strerror or err}); "
                    f"free space there or lower data.cache_limit_mb"), False
            except Exception as err:  # a bug: report it to the batch waiting, keep the thread alive
                error, sticks = err, False
            with self._lock:
                if error is None and not self._stop.is_set():
                    entry.state, entry.fresh = _READY, True
                    self._budget.lru[entry.file.key] = entry
                    self.stats.downloads += 1
                    self.stats.bytes_downloaded += entry.file.size
                else:
                    entry.state = _ABSENT
                    self._budget.used -= entry.file.size
                    self.path(entry.file.key).unlink(missing_ok=True)
                    if error is not None and (sticks or entry.pins > 0):
                        entry.error, entry.error_sticks = error, sticks
                self._cond.notify_all()

    def _download(self, f: ShardFile) -> None:
        """Fetch `f` into place, checked; one more try after a bad copy, then a DatasetError."""
        dest = self.path(f.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            if attempt:
                with self._lock:
                    self.stats.refetches += 1
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
            try:
                problem = self._fetch(f, tmp)
                if problem is None:
                    os.replace(tmp, dest)
                    return
            finally:
                tmp.unlink(missing_ok=True)
        raise DatasetError(f"shard {f.uri} {problem}; prepare the dataset again")

    def _fetch(self, f: ShardFile, tmp: Path) -> str | None:
        """Write the object into `tmp` chunk by chunk; what is wrong with it, or None."""
        digest, got = sha256_hasher(), 0
        with open(tmp, "wb") as out:
            while True:
                end = min(got + self.chunk_bytes, f.size)
                # The last request asks for one byte more: an object longer than the manifest says is
                # as wrong as a shorter one, and would otherwise pass the sha256 of its first bytes.
                data = self._get_range(f.uri, got, end + 1 if end == f.size else end)
                if len(data) > end - got:
                    return f"is corrupt: it is longer than the manifest's {f.size} bytes"
                if not data:
                    break
                out.write(data)
                digest.update(data)
                got += len(data)
                if got == f.size:
                    break
        if got < f.size:
            return f"is truncated: it holds {got} bytes, the manifest says {f.size}"
        actual = digest.hexdigest()
        if actual != f.sha256:
            return f"is corrupt: sha256 {actual[:12]}... does not match the manifest's {f.sha256[:12]}..."
        return None

    def _get_range(self, uri: str, start: int, end: int) -> bytes:
        """One ranged GET, retried after transient errors with exponential backoff and jitter."""
        for attempt in range(1, self.retry.attempts + 1):
            if self._stop.is_set():
                raise _Closed()
            try:
                return self.store.get_range(uri, start, end)
            except ObjectNotFound:
                raise DatasetError(f"shard {uri} is missing from the store; prepare the dataset again") from None
            except StorageError as err:
                if attempt == self.retry.attempts:
                    raise StorageError(f"reading shard {uri} failed {attempt} times, last: {err}") from err
                with self._lock:
                    self.stats.retries += 1
                if self._stop.wait(self.retry.delay_s(attempt)):
                    raise _Closed() from None
        raise AssertionError("unreachable")


def _map(path: Path, size: int) -> np.ndarray:
    if size == 0:  # an empty file cannot be mapped
        return np.empty(0, dtype=np.uint8)
    return np.memmap(os.fspath(path), dtype=np.uint8, mode="r", shape=(size,))


def _remove_partials(folder: Path, keys: set[str]) -> None:
    """Delete partial downloads of `keys` left by a process that stopped mid-download."""
    names_by_dir: dict[Path, set[str]] = {}
    for key in keys:
        path = folder / key
        names_by_dir.setdefault(path.parent, set()).add(path.name)
    for parent, names in names_by_dir.items():
        try:
            items = list(os.scandir(parent))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in items:
            if item.name.startswith(".") and item.name.endswith(PARTIAL_SUFFIX):
                name = item.name[1:].rsplit(".", 2)[0]
                if name in names:
                    Path(item.path).unlink(missing_ok=True)
