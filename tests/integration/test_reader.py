"""The shard reader end to end: datasets prepared into a store, read back through `SplitReader`, its
bounded cache and its background prefetch. Every test runs on the local backend and on S3 (a real
moto server on loopback).

Run: .venv/bin/python -m pytest tests/integration/test_reader.py -q
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config.schema import DataConfig
from orchestrator.data import cache as cache_module
from orchestrator.data.cache import PARTIAL_SUFFIX, THREAD_PREFIX, RetryPolicy
from orchestrator.data.manifest import Manifest, load_manifest
from orchestrator.data.order import GlobalOrder, micro_batches, rank_slice
from orchestrator.data.prepare import prepare_dataset
from orchestrator.data.reader import IGNORE_INDEX, SplitReader
from orchestrator.errors import DatasetError, StorageError
from orchestrator.storage import LocalStore, ObjectStore, S3Store, join_uri, to_uri

SEED = 7
WINDOW = 3
SHARD_BYTES = 4096  # text shards of 2048 uint16 tokens
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01)


# ------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module", params=["local", "s3"])
def prepared(request, tmp_path_factory):
    """A text dataset (16 train shards of 4 KiB) and an sft dataset (loss masks), in one store."""
    if request.param == "local":
        store: ObjectStore = LocalStore()
        root = to_uri(tmp_path_factory.mktemp("reader-store"))
    else:
        server = request.getfixturevalue("s3_server")
        store = S3Store(endpoint_url=server.endpoint_url)
        root = f"s3://{server.make_bucket('reader')}/root"
    text = DataConfig(name="stories", kind="text", uri=f"{root}/datasets/stories", source="generated:stories",
                      seq_len=32, vocab_size=300, num_documents=200, shard_tokens=2048)
    sft = DataConfig(name="qa", kind="sft", uri=f"{root}/datasets/qa", source="generated:qa", seq_len=64,
                     num_documents=200, shard_tokens=2048, tokenizer_uri=text.uri)
    manifests = {"text": prepare_dataset(store, text), "sft": prepare_dataset(store, sft)}
    assert len(manifests["text"].splits["train"].shards) >= 12
    return dict(backend=request.param, store=store, root=root, uri={"text": text.uri, "sft": sft.uri},
                manifest=manifests)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())  # (readers other test modules left open exit when idle)
    yield
    alive = [t.name for t in set(threading.enumerate()) - before if t.name.startswith(THREAD_PREFIX)]
    assert not alive, f"download threads still running: {alive}"


class CountingStore:
    """A real store whose `get_range` calls are recorded; the first `fail_first` of them (or every
    one, with `fail_always`) fail with a transient StorageError. A fake only for the retry logic."""

    def __init__(self, store: ObjectStore, fail_first: int = 0, fail_always: bool = False, delay_s: float = 0.0):
        self.store, self.fail_first, self.fail_always, self.delay_s = store, fail_first, fail_always, delay_s
        self.calls: list[tuple[str, int, int]] = []
        self.failed = 0
        self._lock = threading.Lock()

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        with self._lock:
            self.calls.append((uri, start, end))
            fail = self.fail_always or self.failed < self.fail_first
            if fail:
                self.failed += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if fail:
            raise StorageError(f"injected: S3 SlowDown for {uri}")
        return self.store.get_range(uri, start, end)

    def __getattr__(self, name):
        return getattr(self.store, name)

    def fetched(self, uri: str) -> int:
        """How many times the object was fetched from its first byte."""
        return sum(1 for u, start, _ in self.calls if u == uri and start == 0)


def raw_split(store: ObjectStore, uri: str, m: Manifest, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Every sample of a split straight from the stored bytes: (tokens, mask), each (N, seq_len + 1)."""
    n = m.seq_len
    rows, masks = [], []
    for shard in m.splits[split].shards:
        tokens = np.frombuffer(store.get(join_uri(uri, shard.key)), dtype=m.np_dtype)
        if shard.mask_key:
            rows.append(tokens.reshape(-1, n + 1))
            masks.append(np.frombuffer(store.get(join_uri(uri, shard.mask_key)), dtype=np.uint8).reshape(-1, n + 1))
        else:
            rows.append(np.stack([tokens[i * n : i * n + n + 1] for i in range(shard.samples)]))
    return np.concatenate(rows), (np.concatenate(masks) if masks else None)


def expected_batch(raw, ids) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask = raw
    t = torch.from_numpy(tokens[np.asarray(ids)].astype(np.int64))
    x, y = t[:, :-1], t[:, 1:].clone()
    if mask is not None:
        y[torch.from_numpy(mask[np.asarray(ids)][:, 1:] == 0)] = IGNORE_INDEX
    return x, y


def reader(prepared, kind: str, cache_dir: Path, store=None, split: str = "train", **kw) -> SplitReader:
    kw.setdefault("retry", FAST_RETRY)
    return SplitReader(store or prepared["store"], prepared["uri"][kind], prepared["manifest"][kind], split,
                       cache_dir, **kw)


def shard_limit_mb(shards: float) -> float:
    return shards * SHARD_BYTES / (1 << 20)


def read_steps(make_reader, world: int, gbs: int, micro: int, cursor: int, steps: int):
    """Run `steps` steps at world size `world` (one reader per rank, each with its own cache) from
    `cursor`; return each step's global batch as (x, y) with the ranks' micro-batches joined in
    rank order, and the cursor after the last step."""
    readers = [make_reader(r) for r in range(world)]
    orders = [rd.order(SEED, WINDOW, gbs) for rd in readers]
    seen = []
    try:
        for _ in range(steps):
            parts = [xy for r in range(world) for xy in readers[r].read_rank_share(orders[r], cursor, r, world, micro)]
            seen.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
            cursor += gbs
    finally:
        for rd in readers:
            rd.close()
    return seen, cursor


def disk_bytes(folder: Path) -> int:
    """Bytes of the files in one folder, from a single directory listing (files deleted meanwhile
    are skipped), so the sum never counts a file that was already gone when another appeared."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for e in entries:
        try:
            total += e.stat().st_size
        except FileNotFoundError:
            pass
    return total


def copy_dataset(prepared, kind: str, name: str) -> str:
    """A private copy of a prepared dataset (same manifest), safe to damage; returns its URI."""
    store, src = prepared["store"], prepared["uri"][kind]
    dst = f"{prepared['root']}/copies/{name}"
    for info in store.list(src + "/"):
        store.put(dst + info.uri[len(src):], store.get(info.uri))
    assert load_manifest(store, dst) == prepared["manifest"][kind]
    return dst


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("kind", ["text", "sft"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_sample_reads_back_as_stored(prepared, tmp_path, kind, split):
    m, store = prepared["manifest"][kind], prepared["store"]
    raw = raw_split(store, prepared["uri"][kind], m, split)
    with reader(prepared, kind, tmp_path / "cache", split=split) as rd:
        assert rd.num_samples == m.splits[split].samples == len(raw[0])
        ids = np.random.default_rng(0).permutation(rd.num_samples)  # every sample, shards interleaved
        for chunk in np.array_split(ids, max(1, len(ids) // 16)):
            x, y = rd.batch(chunk)
            ex, ey = expected_batch(raw, chunk)
            assert x.dtype == y.dtype == torch.int64 and tuple(x.shape) == (len(chunk), m.seq_len)
            assert torch.equal(x, ex) and torch.equal(y, ey)
        if kind == "sft":
            assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
        tokens, mask = rd.sample(int(ids[0]))
        np.testing.assert_array_equal(tokens, raw[0][ids[0]])
        assert (mask is None) == (kind == "text")


def test_samples_are_copies_that_outlive_their_shard_in_the_cache(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    raw = raw_split(prepared["store"], prepared["uri"]["text"], m, "train")
    first = m.splits["train"].shards[0]
    with reader(prepared, "text", tmp_path / "cache", cache_limit_mb=shard_limit_mb(1)) as rd:
        tokens, _ = rd.sample(3)
        base = tokens
        while base is not None:  # no memory map under it
            assert not isinstance(base, (np.memmap, mmap.mmap))
            base = getattr(base, "base", None)
        rd.sample(first.samples)  # shard 1 replaces shard 0 in a one-shard cache
        assert rd.cache.stats.evictions == 1 and not rd.cache.path(first.key).exists()
        np.testing.assert_array_equal(tokens, raw[0][3])


def test_a_cached_file_deleted_behind_the_caches_back_is_fetched_again(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    raw = raw_split(prepared["store"], prepared["uri"]["text"], m, "train")
    with reader(prepared, "text", tmp_path / "cache", prefetch_batches=1) as rd:
        rd.prefetch([0])
        key = m.splits["train"].shards[0].key
        deadline = time.monotonic() + 20
        while not rd.cache.is_ready(key):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rd.cache.path(key).unlink()  # e.g. a cleaner of temporary folders
        np.testing.assert_array_equal(rd.sample(5)[0], raw[0][5])
        assert rd.cache.stats.downloads == 2


# ------------------------------------------------------------------------------ elastic determinism
@pytest.mark.parametrize("kind,gbs", [("text", 16), ("sft", 8)])
def test_global_batches_are_identical_for_every_world_size_over_an_epoch(prepared, tmp_path, kind, gbs):
    m = prepared["manifest"][kind]
    raw = raw_split(prepared["store"], prepared["uri"][kind], m, "train")
    steps = m.splits["train"].samples // gbs  # a whole epoch
    order = GlobalOrder([s.samples for s in m.splits["train"].shards], SEED, WINDOW, gbs)
    runs = {}
    for world in (1, 2, 4):
        micro = 2 if world == 4 else 4  # different gradient accumulation too
        runs[world], _ = read_steps(lambda r, world=world: reader(prepared, kind, tmp_path / f"w{world}-r{r}",
                                                                  prefetch_batches=2,
                                                                  cache_limit_mb=shard_limit_mb(10)),
                                    world, gbs, micro, cursor=0, steps=steps)
    for step in range(steps):
        ex, ey = expected_batch(raw, order.batch(step * gbs))
        for world, seen in runs.items():
            x, y = seen[step]
            assert torch.equal(x, ex) and torch.equal(y, ey), f"W={world} step {step} differs"


@pytest.mark.parametrize("w_before,w_after", [(2, 4), (4, 1)])
def test_resuming_from_a_cursor_at_another_world_size_continues_the_sequence(prepared, tmp_path, w_before, w_after):
    gbs, micro = 16, 2
    m = prepared["manifest"]["text"]
    per_epoch_steps = m.splits["train"].samples // gbs
    total = per_epoch_steps + 6  # into the second epoch

    def make(tag):
        return lambda r: reader(prepared, "text", tmp_path / f"{tag}-r{r}", prefetch_batches=3,
                                cache_limit_mb=shard_limit_mb(8))

    uninterrupted, _ = read_steps(make("all"), 1, gbs, micro, cursor=0, steps=total)
    stop = per_epoch_steps - 2  # a restart shortly before the epoch ends
    before, cursor = read_steps(make("before"), w_before, gbs, micro, cursor=0, steps=stop)
    assert cursor == stop * gbs  # the whole saved state
    after, _ = read_steps(make("after"), w_after, gbs, micro, cursor=cursor, steps=total - stop)  # fresh caches
    for step, ((x, y), (ux, uy)) in enumerate(zip(before + after, uninterrupted, strict=True)):
        assert torch.equal(x, ux) and torch.equal(y, uy), f"step {step} differs after resuming at W={w_after}"


# ------------------------------------------------------------------------------ bad shards
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_a_damaged_shard_is_fetched_twice_then_named(prepared, tmp_path, damage):
    uri = copy_dataset(prepared, "text", f"damaged-{damage}")
    m, store = prepared["manifest"]["text"], prepared["store"]
    bad = m.splits["train"].shards[1]
    bad_uri = join_uri(uri, bad.key)
    data = bytearray(store.get(bad_uri))
    if damage == "flip":
        data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data += b"\x00\x01"
    store.put(bad_uri, bytes(data))
    counting = CountingStore(store)
    cache = tmp_path / "cache"
    with SplitReader(counting, uri, m, "train", cache, retry=FAST_RETRY) as rd:
        rd.batch([0])  # shard 0 is intact
        with pytest.raises(DatasetError) as info:
            rd.batch([0, m.splits["train"].shards[0].samples])  # the first sample of shard 1
        message = str(info.value)
        assert bad_uri in message and "prepare the dataset again" in message and "\n" not in message
        assert {"flip": "is corrupt: sha256", "truncate": "is truncated", "extend": "is corrupt"}[damage] in message
        assert counting.fetched(bad_uri) == 2  # retried once, then reported
        # A bad shard stays bad: asking again reports it without fetching it a third time.
        with pytest.raises(DatasetError, match="prepare the dataset again"):
            rd.sample(m.splits["train"].shards[0].samples)
        assert counting.fetched(bad_uri) == 2
    folder = cache / m.signature / "train"
    assert not (folder / Path(bad.key).name).exists()  # the bad copy is not kept
    assert not [p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_missing_shard_is_named_without_retrying(prepared, tmp_path):
    uri = copy_dataset(prepared, "text", "missing-shard")
    m, store = prepared["manifest"]["text"], prepared["store"]
    gone = join_uri(uri, m.splits["train"].shards[2].key)
    store.delete(gone)
    counting = CountingStore(store)
    with SplitReader(counting, uri, m, "train", tmp_path / "cache", retry=FAST_RETRY) as rd:
        with pytest.raises(DatasetError, match=f"shard {gone} is missing"):
            rd.sample(sum(s.samples for s in m.splits["train"].shards[:2]))
    assert counting.fetched(gone) == 1


# ------------------------------------------------------------------------------ transient errors
def test_transient_errors_are_retried_with_backoff(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    flaky = CountingStore(prepared["store"], fail_first=2)  # FAST_RETRY: 3 attempts per ranged GET
    raw = raw_split(prepared["store"], prepared["uri"]["text"], m, "train")
    with reader(prepared, "text", tmp_path / "cache", store=flaky) as rd:
        x, y = rd.batch([0, 1, 200])
        assert rd.cache.stats.retries == 2 and flaky.failed == 2
    ex, ey = expected_batch(raw, [0, 1, 200])
    assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_storage_error_that_persists_is_reported_then_tried_again(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    flaky = CountingStore(prepared["store"], fail_always=True)
    with reader(prepared, "text", tmp_path / "cache", store=flaky) as rd:
        with pytest.raises(StorageError) as info:
            rd.sample(0)
        first = join_uri(prepared["uri"]["text"], m.splits["train"].shards[0].key)
        assert first in str(info.value) and "failed 3 times" in str(info.value)
        assert len(flaky.calls) == 3
        flaky.fail_always = False  # the store recovers: the next read works (the error does not stick)
        tokens, _ = rd.sample(0)
        assert len(tokens) == m.seq_len + 1


def test_backoff_grows_exponentially_with_jitter():
    policy = RetryPolicy(attempts=6, base_delay_s=1.0, max_delay_s=8.0)
    for retry, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0)]:
        delays = [policy.delay_s(retry) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert max(delays) - min(delays) > cap / 10  # jittered, not fixed


# ------------------------------------------------------------------------------ bounded cache
@pytest.mark.parametrize("prefetch", [0, 3])
def test_the_cache_never_exceeds_its_limit(prepared, tmp_path, prefetch):
    m = prepared["manifest"]["text"]
    shards = m.splits["train"].shards
    limit_shards = 4  # the train split is 4x larger than the cache
    assert len(shards) >= 3 * limit_shards
    limit = int(shard_limit_mb(limit_shards) * (1 << 20))
    raw = raw_split(prepared["store"], prepared["uri"]["text"], m, "train")
    gbs, micro = 8, 2
    folder = tmp_path / "cache" / m.signature / "train"
    peak, stop = [0], threading.Event()

    def watch():  # samples the folder while downloads run in the background
        while not stop.is_set():
            peak[0] = max(peak[0], disk_bytes(folder))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with reader(prepared, "text", tmp_path / "cache", cache_limit_mb=shard_limit_mb(limit_shards),
                    prefetch_batches=prefetch) as rd:
            order = rd.order(SEED, WINDOW, gbs)
            steps = 2 * order.samples_per_epoch // gbs  # two epochs
            for step in range(steps):
                cursor = step * gbs
                got = rd.read_rank_share(order, cursor, 0, 1, micro)
                for (x, y), ids in zip(got, micro_batches(order.batch(cursor), micro), strict=True):
                    ex, ey = expected_batch(raw, ids)
                    assert torch.equal(x, ex) and torch.equal(y, ey)
                assert disk_bytes(folder) <= limit, f"step {step}"
                assert rd.cache.used_bytes <= limit
            stats = rd.cache.stats
    finally:
        stop.set()
        watcher.join()
    assert 0 < peak[0] <= limit
    assert stats.evictions > 0 and stats.downloads > len(shards)  # it did cycle through the split


def test_one_batch_larger_than_the_cache_names_the_setting(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    starts = np.cumsum([0] + [s.samples for s in m.splits["train"].shards])
    with reader(prepared, "text", tmp_path / "cache", cache_limit_mb=shard_limit_mb(2.5)) as rd:
        rd.batch(starts[:2])  # two shards fit
        with pytest.raises(DatasetError) as info:
            rd.batch(starts[:3])  # three do not
    message = str(info.value)
    assert "data.cache_limit_mb" in message and f"{3 * SHARD_BYTES / (1 << 20):.2f}" in message and "\n" not in message


def test_train_and_val_share_one_cache_and_its_limit(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    limit = int(shard_limit_mb(3) * (1 << 20))
    with reader(prepared, "text", tmp_path / "cache", cache_limit_mb=shard_limit_mb(3)) as train:
        val = reader(prepared, "text", None, split="val", cache=train.cache)
        for i in range(0, train.num_samples, 50):
            train.sample(i)
            val.sample(i % val.num_samples)
            on_disk = sum(disk_bytes(tmp_path / "cache" / m.signature / s) for s in ("train", "val"))
            assert on_disk <= limit and train.cache.used_bytes <= limit
        val.close()  # does not close the shared cache
        train.sample(0)


def test_a_restart_reuses_valid_cached_shards(prepared, tmp_path):
    m = prepared["manifest"]["text"]
    with reader(prepared, "text", tmp_path / "cache") as rd:
        rd.batch(range(rd.num_samples))
        assert rd.cache.stats.downloads == len(m.splits["train"].shards)
    counting = CountingStore(prepared["store"])
    with reader(prepared, "text", tmp_path / "cache", store=counting) as rd:
        assert rd.cache.stats.adopted == len(m.splits["train"].shards)
        rd.batch(range(rd.num_samples))
    assert counting.calls == []  # nothing fetched again
    # A smaller limit on the next start trims the folder to fit.
    with reader(prepared, "text", tmp_path / "cache", cache_limit_mb=shard_limit_mb(3)) as rd:
        assert rd.cache.used_bytes <= 3 * SHARD_BYTES
        assert disk_bytes(tmp_path / "cache" / m.signature / "train") <= 3 * SHARD_BYTES


# ------------------------------------------------------------------------------ prefetch
def test_prefetch_downloads_the_next_batches_of_this_rank_ahead(prepared, tmp_path):
    gbs, micro, world, rank, ahead = 16, 4, 2, 1, 3
    counting = CountingStore(prepared["store"])
    with reader(prepared, "text", tmp_path / "cache", store=counting, prefetch_batches=ahead) as rd:
        order = rd.order(SEED, WINDOW, gbs)

        def files(step):
            return rd.files_of(rank_slice(order.batch(step * gbs), rank, world))

        # A step just before the order moves on to new shards (the next window).
        step = next(s for s in range(order.samples_per_epoch // gbs)
                    if {f.key for k in range(1, ahead + 1) for f in files(s + k)} - {f.key for f in files(s)})
        rd.read_rank_share(order, step * gbs, rank, world, micro)
        upcoming = {f.key: f for k in range(1, ahead + 1) for f in files(step + k)}
        new = [f for key, f in upcoming.items() if key not in {f.key for f in files(step)}]
        assert new
        deadline = time.monotonic() + 20
        while not all(rd.cache.is_ready(key) for key in upcoming):
            assert time.monotonic() < deadline, "prefetch did not download the next batches' shards"
            time.sleep(0.01)
        for key in upcoming:  # on disk before they are asked for
            assert rd.cache.path(key).is_file()
        assert all(counting.fetched(f.uri) == 1 for f in new)
        calls, waited = len(counting.calls), rd.wait_s
        for k in range(1, ahead + 1):
            rd.read_rank_share(order, (step + k) * gbs, rank, world, micro)
        # Those steps found their shards ready: nothing was fetched on their account.
        assert not [c for c in counting.calls[calls:] if c[0] in {f.uri for f in upcoming.values()}]
        assert rd.wait_s - waited < 0.5


def test_without_prefetch_nothing_is_downloaded_ahead(prepared, tmp_path):
    gbs, micro = 16, 4
    with reader(prepared, "text", tmp_path / "cache", prefetch_batches=0) as rd:
        order = rd.order(SEED, WINDOW, gbs)
        rd.read_rank_share(order, 0, 0, 1, micro)
        now = {f.key for f in rd.files_of(order.batch(0))}
        later = [f for k in range(1, order.samples_per_epoch // gbs) for f in rd.files_of(order.batch(k * gbs))
                 if f.key not in now]
        time.sleep(0.2)
        assert later and not any(rd.cache.is_ready(f.key) for f in later)


def test_close_stops_downloads_in_flight_and_leaves_no_partial_files(prepared, tmp_path):
    slow = CountingStore(prepared["store"], delay_s=0.2)
    m = prepared["manifest"]["text"]
    rd = reader(prepared, "text", tmp_path / "cache", store=slow, prefetch_batches=4)
    rd.prefetch(range(rd.num_samples))  # every shard, four at a time, slowly
    time.sleep(0.05)
    t0 = time.perf_counter()
    rd.close()
    assert time.perf_counter() - t0 < 2
    folder = tmp_path / "cache" / m.signature / "train"
    assert not [p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    with pytest.raises(RuntimeError, match="closed"):
        rd.sample(0)


def test_download_threads_of_a_reader_left_open_exit_when_idle(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "IDLE_EXIT_S", 0.05)
    rd = reader(prepared, "text", tmp_path / "cache", download_workers=3)
    rd.sample(0)
    mine = list(rd.cache._threads)
    assert len(mine) == 3
    for t in mine:
        t.join(timeout=5)
        assert not t.is_alive()
    tokens, _ = rd.sample(rd.num_samples - 1)  # in another shard: new threads start on demand
    assert len(tokens) == prepared["manifest"]["text"].seq_len + 1
    assert rd.cache.stats.downloads == 2
    rd.close()
