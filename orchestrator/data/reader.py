"""Read samples of a prepared dataset: shard files fetched from the store into a bounded local cache
(`orchestrator.data.cache`), checked against the manifest's sha256, then memory-mapped.

Which samples to read is decided by `orchestrator.data.order`: this module turns global sample ids
into (inputs, targets) tensors, and, given the order, fetches the shards of the next steps ahead.

    train = SplitReader.from_config(store, job.data, manifest, "train", cache_dir)
    order = train.order(seed, job.data.shuffle_window, global_batch_size)
    micro = train.read_rank_share(order, cursor, rank, world_size, micro_batch_size)  # [(x, y), ...]
    train.wait_s  # seconds spent waiting for shard downloads so far
    train.close()
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import numpy as np
import torch

from orchestrator.config.schema import DataConfig
from orchestrator.data.cache import MiB, RetryPolicy, ShardCache, ShardFile
from orchestrator.data.manifest import Manifest
from orchestrator.data.order import GlobalOrder, micro_batches, rank_slice
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectStore, join_uri

IGNORE_INDEX = -100  # same as model.gpt.IGNORE_INDEX; targets the loss skips

# The reading settings' defaults live in DataConfig, in one place.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}
_DEFAULT_RETRY = RetryPolicy()  # immutable (a frozen dataclass), so one instance serves every reader


class SplitReader:
    """Random access to the samples of one split of a dataset, through a bounded shard cache.

    `cache_dir`: the shard cache lives in `cache_dir/<dataset signature>`, owned by this reader (one
    process per folder: give each rank its own). Or pass `cache=` another reader's `cache` to share
    one folder and one size limit (e.g. the train and val splits of one dataset).
    """

    def __init__(
        self,
        store: ObjectStore,
        dataset_uri: str,
        manifest: Manifest,
        split: str,
        cache_dir: str | os.PathLike | None = None,
        *,
        cache: ShardCache | None = None,
        cache_limit_mb: float = _DEFAULTS["cache_limit_mb"],
        prefetch_batches: int = _DEFAULTS["prefetch_batches"],
        download_workers: int = _DEFAULTS["download_workers"],
        retry: RetryPolicy = _DEFAULT_RETRY,
    ):
        self.store = store
        self.uri = dataset_uri
        self.manifest = manifest
        self.split = manifest.split(split, dataset_uri)
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches={prefetch_batches} must be >= 0 (data.prefetch_batches)")
        self.prefetch_batches = prefetch_batches
        self.samples_per_shard: tuple[int, ...] = tuple(s.samples for s in self.split.shards)
        self._starts = np.cumsum((0,) + self.samples_per_shard)
        self._files = [self._shard_files(i) for i in range(len(self.split.shards))]
        if cache is None:
            if cache_dir is None:
                raise ValueError("SplitReader needs a cache_dir or a cache")
            cache = ShardCache(store, Path(cache_dir) / manifest.signature, int(cache_limit_mb * MiB),
                               workers=download_workers, retry=retry)
            self._owns_cache = True
        else:
            self._owns_cache = False
        self.cache = cache
        self.cache.register(f for files in self._files for f in files)
        self._lock = threading.Lock()
        self._wait_s = 0.0
        self._prefetched: dict = {}  # (order, rank, world) -> the last cursor whose shards were asked for

    @classmethod
    def from_config(cls, store: ObjectStore, cfg: DataConfig, manifest: Manifest, split: str,
                    cache_dir: str | os.PathLike | None = None, *, cache: ShardCache | None = None) -> "SplitReader":
        """A reader with the data config's cache limit, prefetch depth and download threads."""
        return cls(store, cfg.uri, manifest, split, cache_dir, cache=cache, cache_limit_mb=cfg.cache_limit_mb,
                   prefetch_batches=cfg.prefetch_batches, download_workers=cfg.download_workers)

    def _shard_files(self, i: int) -> tuple[ShardFile, ...]:
        info = self.split.shards[i]
        itemsize = self.manifest.np_dtype.itemsize
        if info.bytes != info.tokens * itemsize:
            raise DatasetError(f"shard {join_uri(self.uri, info.key)}: the manifest says {info.tokens} "
                               f"{self.manifest.dtype} tokens but {info.bytes} bytes; prepare the dataset again")
        files = (ShardFile(info.key, join_uri(self.uri, info.key), info.bytes, info.sha256),)
        if (self.manifest.kind == "sft") != bool(info.mask_key):
            raise DatasetError(f"shard {join_uri(self.uri, info.key)} of a {self.manifest.kind} dataset "
                               f"{'lacks' if info.mask_key is None else 'has'} a loss mask; prepare the dataset again")
        if info.mask_key:  # sft: a uint8 loss mask, one byte per token
            files += (ShardFile(info.mask_key, join_uri(self.uri, info.mask_key), info.tokens, info.mask_sha256),)
        return files

    # ------------------------------------------------------------------------------ properties
    @property
    def num_samples(self) -> int:
        return int(self._starts[-1])

    @property
    def wait_s(self) -> float:
        """Seconds this reader's `batch`/`sample` calls have waited for shard files, in all."""
        with self._lock:
            return self._wait_s

    def order(self, seed: int, shuffle_window: int, global_batch_size: int) -> GlobalOrder:
        """The global order of this split's samples (see `orchestrator.data.order`)."""
        return GlobalOrder(self.samples_per_shard, seed, shuffle_window, global_batch_size)

    def shards_of(self, indices) -> np.ndarray:
        """The shard (manifest position) of each sample id."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < 0) | (idx >= self.num_samples)
        if bad.any():
            raise IndexError(f"sample {int(idx[bad][0])} is outside split of {self.num_samples} samples at {self.uri}")
        return np.searchsorted(self._starts, idx, side="right") - 1

    def files_of(self, indices) -> list[ShardFile]:
        """The files the samples `indices` are read from, in order of first use."""
        shards = dict.fromkeys(self.shards_of(indices).tolist())
        return [f for s in shards for f in self._files[s]]

    # ------------------------------------------------------------------------------ reading
    def _gather(self, indices) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens, mask) of the samples, each (B, seq_len + 1); mask is None for text datasets."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard = self.shards_of(idx)
        local = idx - self._starts[shard]
        n = self.manifest.seq_len
        tokens = np.empty((len(idx), n + 1), dtype=self.manifest.np_dtype)
        sft = self.manifest.kind == "sft"
        mask = np.empty((len(idx), n + 1), dtype=np.uint8) if sft else None
        used = np.unique(shard)
        with self.cache.hold(f for s in used.tolist() for f in self._files[s]) as held:
            for s in used.tolist():
                rows = np.flatnonzero(shard == s)
                files = self._files[s]
                # Fancy indexing copies the rows out of the map, so nothing refers to the file once
                # the hold ends and the cache may evict (and unmap) it.
                data = held.bytes[files[0].key].view(self.manifest.np_dtype)
                if sft:
                    tokens[rows] = data.reshape(-1, n + 1)[local[rows]]
                    mask[rows] = held.bytes[files[1].key].reshape(-1, n + 1)[local[rows]]
                else:  # sample i of a text shard: tokens [i * n, i * n + n + 1), overlapping by one
                    tokens[rows] = data[local[rows, None] * n + np.arange(n + 1)]
                del data
        with self._lock:
            self._wait_s += held.wait_s
        return tokens, mask

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `index` of the split: seq_len + 1 tokens (and its loss mask for sft), copies."""
        tokens, mask = self._gather([index])
        return tokens[0], (None if mask is None else mask[0])

    def batch(self, indices) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
        """(inputs, targets), each (B, seq_len) int64; masked targets are IGNORE_INDEX."""
        tokens, mask = self._gather(indices)
        tokens = tokens.astype(np.int64)
        x, y = tokens[:, :-1], tokens[:, 1:].copy()
        if mask is not None:
            y[mask[:, 1:] == 0] = IGNORE_INDEX
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    def prefetch(self, indices, priority: int = 0) -> None:
        """Fetch the shards of samples `indices` in the background (lower `priority` first)."""
        self.cache.prefetch(self.files_of(indices), priority)

    def read_rank_share(self, order: GlobalOrder, cursor: int, rank: int, world_size: int,
                        micro_batch_size: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        """Rank `rank`'s micro-batches of the global batch at `cursor`, as (inputs, targets).

        First asks for the shards of this rank's share of the next `prefetch_batches` global
        batches in the background, so they download while this step computes.
        """
        gbs = order.global_batch_size
        share = rank_slice(order.batch(cursor), rank, world_size)
        parts = micro_batches(share, micro_batch_size)
        if self.prefetch_batches:
            # Ask only for batches not asked for at the previous step (a sliding window); start
            # over after a jump (a resume, or another order).
            key = (id(order), rank, world_size,
                   self.cache.stats.prefetch_skipped)  # skipped for lack of room: ask again
            last = self._prefetched.get(key)
            if last is None or not cursor <= last <= cursor + self.prefetch_batches * gbs:
                self.prefetch(share, 0)
                last = cursor
            for ahead in range(last + gbs, cursor + self.prefetch_batches * gbs + 1, gbs):
                self.prefetch(rank_slice(order.batch(ahead), rank, world_size), (ahead - cursor) // gbs)
            self._prefetched = {key: cursor + self.prefetch_batches * gbs}
        return [self.batch(mb) for mb in parts]

    def close(self) -> None:
        """Stop the download threads of the cache this reader owns."""
        if self._owns_cache:
            self.cache.close()

    def __enter__(self) -> "SplitReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

