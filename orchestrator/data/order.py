"""The global order of training samples: pure functions of (dataset size, seed, epoch, cursor).

Nothing here depends on the number of workers. Global batch `b` is the same set of samples for
every world size W; rank r of W takes a contiguous slice of it, and gradient accumulation splits
that slice into micro-batches. The reader's whole state is one integer, the cursor: how many
samples of the global order have been consumed. Resuming from it at any W continues the exact
sequence of global batches.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all samples in one epoch."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples)


def samples_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Samples used per epoch: whole global batches only (the partial last batch is dropped)."""
    return (num_samples // global_batch_size) * global_batch_size


def global_batch(num_samples: int, global_batch_size: int, seed: int, cursor: int) -> np.ndarray:
    """Sample ids of the global batch that starts at `cursor` (a multiple of the batch size)."""
    per_epoch = samples_per_epoch(num_samples, global_batch_size)
    if per_epoch == 0:
        raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
    if cursor % global_batch_size:
        raise ValueError(f"cursor {cursor} is not at a global batch boundary ({global_batch_size})")
    epoch, offset = divmod(cursor, per_epoch)
    return epoch_permutation(num_samples, seed, epoch)[offset : offset + global_batch_size]


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
