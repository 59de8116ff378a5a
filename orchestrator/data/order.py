"""The global order of training samples: pure functions of (shard sizes, seed, epoch, shuffle window).

Each epoch shuffles the order of the shards, then cuts that order into windows of `shuffle_window`
consecutive shards and shuffles the samples within each window. A reader therefore needs at most
`shuffle_window` shards at a time, and reads each of them mostly once, front to back in windows,
while samples still mix across shards. Window `w` of epoch `e` has its own random stream, so one
window can be computed without the rest of the epoch (an epoch of a huge dataset is never built
whole).

Nothing here depends on the number of workers. Global batch `b` is the same samples, in the same
order, for every world size W; rank r of W takes a contiguous slice of it, and gradient
accumulation splits that slice into micro-batches. The reader's whole state is one integer, the
cursor: how many samples of the global order have been consumed (epoch = cursor // samples per
epoch). Resuming from it at any W continues the exact sequence of global batches.

Sample ids number the samples of a split shard by shard, in manifest order (as `SplitReader` does):
shard i holds ids [sum(counts[:i]), sum(counts[:i + 1])).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

# Random streams of one epoch: the shard shuffle and each window's sample shuffle. Distinct tags
# keep the streams apart (numpy pads short seed lists with zeros, so [seed, epoch] would equal
# [seed, epoch, 0]).
_SHARD_STREAM = 1
_WINDOW_STREAM = 2
_WINDOWS_KEPT = 16  # windows a GlobalOrder keeps computed (the current batch's and prefetched ones)


def _counts(samples_per_shard: Sequence[int]) -> np.ndarray:
    counts = np.asarray(samples_per_shard, dtype=np.int64).reshape(-1)
    if counts.size == 0 or (counts < 0).any():
        raise ValueError(f"samples per shard must be a non-empty list of counts >= 0, got {list(samples_per_shard)!r}")
    return counts


def shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the shards."""
    return np.random.default_rng([seed, epoch, _SHARD_STREAM]).permutation(num_shards)


def _window_ids(counts: np.ndarray, starts: np.ndarray, shards: np.ndarray, seed: int, epoch: int,
                window: int) -> np.ndarray:
    ids = np.concatenate([np.arange(starts[s], starts[s] + counts[s], dtype=np.int64) for s in shards])
    return np.random.default_rng([seed, epoch, _WINDOW_STREAM, window]).permutation(ids)


def window_order(samples_per_shard: Sequence[int], seed: int, epoch: int, shuffle_window: int,
                 window: int) -> np.ndarray:
    """Sample ids of window `window` of epoch `epoch`, in the order they are read."""
    counts = _counts(samples_per_shard)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards = shard_permutation(len(counts), seed, epoch)[window * shuffle_window : (window + 1) * shuffle_window]
    if not len(shards):
        raise ValueError(f"epoch has no window {window} ({len(counts)} shards, shuffle_window={shuffle_window})")
    return _window_ids(counts, starts, shards, seed, epoch, window)


def epoch_order(samples_per_shard: Sequence[int], seed: int, epoch: int, shuffle_window: int) -> np.ndarray:
    """Every sample id of the split, in the order epoch `epoch` reads them."""
    if shuffle_window < 1:
        raise ValueError(f"shuffle_window={shuffle_window} must be >= 1 (data.shuffle_window)")
    n_windows = -(-len(_counts(samples_per_shard)) // shuffle_window)
    return np.concatenate([window_order(samples_per_shard, seed, epoch, shuffle_window, w) for w in range(n_windows)])


def samples_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Samples used per epoch: whole global batches only (the partial last batch is dropped)."""
    return (num_samples // global_batch_size) * global_batch_size


class GlobalOrder:
    """The global batches of one split: `batch(cursor)` is global batch cursor // global_batch_size.

    A pure function of its arguments; it only caches the current epochs' shard orders and a few
    recently used windows, so stepping through an epoch costs one window shuffle per window.
    """

    def __init__(self, samples_per_shard: Sequence[int], seed: int, shuffle_window: int, global_batch_size: int):
        self.counts = _counts(samples_per_shard)
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window={shuffle_window} must be >= 1 (data.shuffle_window)")
        if global_batch_size < 1:
            raise ValueError(f"global batch size {global_batch_size} must be >= 1")
        self.seed, self.shuffle_window, self.global_batch_size = seed, shuffle_window, global_batch_size
        self.num_samples = int(self.counts.sum())
        self.samples_per_epoch = samples_per_epoch(self.num_samples, global_batch_size)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of {global_batch_size}")
        self._starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def epoch_of(self, cursor: int) -> int:
        """The epoch the sample at `cursor` belongs to."""
        return cursor // self.samples_per_epoch

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, end offset of each window within the epoch)."""
        if epoch not in self._epochs:
            shards = shard_permutation(len(self.counts), self.seed, epoch)
            per_window = np.add.reduceat(self.counts[shards], np.arange(0, len(shards), self.shuffle_window))
            self._epochs[epoch] = (shards, np.cumsum(per_window))
            while len(self._epochs) > 2:  # the current epoch and the next (prefetch looks ahead)
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _window(self, epoch: int, window: int) -> np.ndarray:
        key = (epoch, window)
        if key not in self._windows:
            shards = self._epoch(epoch)[0][window * self.shuffle_window : (window + 1) * self.shuffle_window]
            self._windows[key] = _window_ids(self.counts, self._starts, shards, self.seed, epoch, window)
            while len(self._windows) > _WINDOWS_KEPT:
                self._windows.popitem(last=False)
        self._windows.move_to_end(key)
        return self._windows[key]

    def batch(self, cursor: int) -> np.ndarray:
        """Sample ids of the global batch that starts at `cursor` (a multiple of the batch size)."""
        gbs = self.global_batch_size
        if cursor < 0 or cursor % gbs:
            raise ValueError(f"cursor {cursor} is not at a global batch boundary ({gbs})")
        epoch, start = divmod(cursor, self.samples_per_epoch)
        _, ends = self._epoch(epoch)
        stop = start + gbs
        parts = []
        w = int(np.searchsorted(ends, start, side="right"))
        while start < stop:
            w_start = int(ends[w - 1]) if w else 0
            take = self._window(epoch, w)[start - w_start : min(stop, int(ends[w])) - w_start]
            parts.append(take)
            start += len(take)
            w += 1
        return np.concatenate(parts)


def global_batch(samples_per_shard: Sequence[int], global_batch_size: int, seed: int, cursor: int,
                 shuffle_window: int) -> np.ndarray:
    """Sample ids of the global batch that starts at `cursor` (see `GlobalOrder`, which caches)."""
    return GlobalOrder(samples_per_shard, seed, shuffle_window, global_batch_size).batch(cursor)


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of a global batch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if len(batch) % world_size:
        raise ValueError(f"global batch of {len(batch)} is not divisible by world size {world_size}")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(rank_samples: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    """Split a rank's share into gradient-accumulation micro-batches."""
    if len(rank_samples) % micro_batch_size:
        raise ValueError(f"{len(rank_samples)} samples are not divisible by micro-batch size {micro_batch_size}")
    return [rank_samples[i : i + micro_batch_size] for i in range(0, len(rank_samples), micro_batch_size)]


def eval_batch(num_samples: int, global_batch_size: int, index: int) -> np.ndarray:
    """Evaluation batch `index`: samples in dataset order, wrapping around a small split."""
    start = index * global_batch_size
    return np.arange(start, start + global_batch_size) % num_samples
