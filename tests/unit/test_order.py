"""Unit tests of orchestrator/data/order.py: the global sample order over grids of world sizes.

The contract: global batch `b` is the same samples whatever the world size W; rank r of W takes a
contiguous slice; the whole reader state is one integer cursor, so resuming at any W continues the
exact sequence an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.order import (
    epoch_permutation,
    eval_batch,
    global_batch,
    micro_batches,
    rank_slice,
    samples_per_epoch,
)

SEED = 1234
NUM_SAMPLES = [24, 50, 100, 203]
BATCHES = [8, 12, 16]


def _world_sizes(global_batch_size: int) -> list[int]:
    return [w for w in (1, 2, 3, 4) if global_batch_size % w == 0]


GRID = [(n, b) for n in NUM_SAMPLES for b in BATCHES if n >= b]
GRID_W = [(n, b, w) for n, b in GRID for w in _world_sizes(b)]


def _epoch_batches(num_samples: int, gbs: int, seed: int, epoch: int) -> list[np.ndarray]:
    per_epoch = samples_per_epoch(num_samples, gbs)
    start = epoch * per_epoch
    return [global_batch(num_samples, gbs, seed, c) for c in range(start, start + per_epoch, gbs)]


def _run(num_samples: int, gbs: int, world_size: int, cursor: int, steps: int) -> tuple[list[np.ndarray], int]:
    """What `steps` optimizer steps at `world_size` consume, as each step's rank shares joined in
    rank order; returns them and the cursor after the last step."""
    seen = []
    for _ in range(steps):
        batch = global_batch(num_samples, gbs, SEED, cursor)
        seen.append(np.concatenate([rank_slice(batch, r, world_size) for r in range(world_size)]))
        cursor += gbs
    return seen, cursor


# ------------------------------------------------------------------------------ partition by rank
@pytest.mark.parametrize("num_samples,gbs,world_size", GRID_W)
def test_rank_slices_partition_each_global_batch(num_samples, gbs, world_size):
    for batch in _epoch_batches(num_samples, gbs, SEED, epoch=0):
        shares = [rank_slice(batch, r, world_size) for r in range(world_size)]
        assert all(len(s) == gbs // world_size for s in shares)
        # Concatenated in rank order, the shares are the global batch itself, in order.
        np.testing.assert_array_equal(np.concatenate(shares), batch)
        # No sample is given to two ranks.
        assert len(set(np.concatenate(shares).tolist())) == gbs


@pytest.mark.parametrize("num_samples,gbs", GRID)
def test_an_epoch_is_identical_for_every_world_size(num_samples, gbs):
    steps = samples_per_epoch(num_samples, gbs) // gbs
    runs = {w: _run(num_samples, gbs, w, cursor=0, steps=steps)[0] for w in _world_sizes(gbs)}
    reference = runs[1]
    assert len(reference) == steps
    for w, seen in runs.items():
        assert len(seen) == steps
        for step, (a, b) in enumerate(zip(seen, reference)):
            np.testing.assert_array_equal(a, b, err_msg=f"W={w} step {step} differs from W=1")


# ------------------------------------------------------------------------------ epochs
@pytest.mark.parametrize("num_samples,gbs", GRID)
def test_each_epoch_uses_distinct_samples_and_drops_the_partial_batch(num_samples, gbs):
    per_epoch = samples_per_epoch(num_samples, gbs)
    assert per_epoch == (num_samples // gbs) * gbs
    assert per_epoch % gbs == 0 and num_samples - gbs < per_epoch <= num_samples
    for epoch in range(3):
        used = np.concatenate(_epoch_batches(num_samples, gbs, SEED, epoch))
        assert len(used) == per_epoch
        assert len(set(used.tolist())) == per_epoch, "a sample repeats within an epoch"
        assert used.min() >= 0 and used.max() < num_samples
        # The samples used are exactly the first `per_epoch` of that epoch's permutation.
        np.testing.assert_array_equal(used, epoch_permutation(num_samples, SEED, epoch)[:per_epoch])


@pytest.mark.parametrize("num_samples", NUM_SAMPLES)
def test_epoch_permutation_is_a_deterministic_permutation(num_samples):
    a = epoch_permutation(num_samples, SEED, 3)
    np.testing.assert_array_equal(np.sort(a), np.arange(num_samples))
    np.testing.assert_array_equal(a, epoch_permutation(num_samples, SEED, 3))


@pytest.mark.parametrize("num_samples,gbs", GRID)
def test_epochs_and_seeds_give_different_orders(num_samples, gbs):
    e0 = np.concatenate(_epoch_batches(num_samples, gbs, SEED, 0))
    e1 = np.concatenate(_epoch_batches(num_samples, gbs, SEED, 1))
    other_seed = np.concatenate(_epoch_batches(num_samples, gbs, SEED + 1, 0))
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, other_seed)
    # The same seed gives the same order again (the order is a pure function).
    np.testing.assert_array_equal(e0, np.concatenate(_epoch_batches(num_samples, gbs, SEED, 0)))


@pytest.mark.parametrize("num_samples,gbs", [(100, 16), (50, 12), (24, 8), (203, 12)])
def test_cursor_crosses_epoch_boundaries(num_samples, gbs):
    per_epoch = samples_per_epoch(num_samples, gbs)
    last_of_epoch0 = global_batch(num_samples, gbs, SEED, per_epoch - gbs)
    first_of_epoch1 = global_batch(num_samples, gbs, SEED, per_epoch)
    first_of_epoch2 = global_batch(num_samples, gbs, SEED, 2 * per_epoch)
    np.testing.assert_array_equal(last_of_epoch0, epoch_permutation(num_samples, SEED, 0)[per_epoch - gbs : per_epoch])
    np.testing.assert_array_equal(first_of_epoch1, epoch_permutation(num_samples, SEED, 1)[:gbs])
    np.testing.assert_array_equal(first_of_epoch2, epoch_permutation(num_samples, SEED, 2)[:gbs])
    # Every batch is full, also across the boundary.
    assert len(last_of_epoch0) == len(first_of_epoch1) == gbs


# ------------------------------------------------------------------------------ resume
RESUME_GRID = [
    (n, b, w0, w1)
    for n, b in [(100, 16), (50, 12), (203, 8)]
    for w0, w1 in [(1, 2), (2, 4), (4, 1), (4, 2), (2, 3), (3, 1)]
    if b % w0 == 0 and b % w1 == 0
]


@pytest.mark.parametrize("num_samples,gbs,w_before,w_after", RESUME_GRID)
def test_resuming_at_another_world_size_continues_the_sequence(num_samples, gbs, w_before, w_after):
    per_epoch_steps = samples_per_epoch(num_samples, gbs) // gbs
    total = 3 * per_epoch_steps + 1  # crosses two epoch boundaries
    uninterrupted, _ = _run(num_samples, gbs, 1, cursor=0, steps=total)
    split = per_epoch_steps + 1  # stop just after an epoch boundary
    before, cursor = _run(num_samples, gbs, w_before, cursor=0, steps=split)
    assert cursor == split * gbs
    after, _ = _run(num_samples, gbs, w_after, cursor=cursor, steps=total - split)
    resumed = before + after
    assert len(resumed) == len(uninterrupted)
    for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step} differs after resuming at W={w_after}")


# ------------------------------------------------------------------------------ micro-batches
@pytest.mark.parametrize("gbs,world_size,micro", [(16, 1, 4), (16, 2, 4), (16, 4, 2), (12, 3, 2), (12, 2, 6), (8, 4, 1)])
def test_micro_batches_split_a_rank_share_exactly(gbs, world_size, micro):
    batch = global_batch(100, gbs, SEED, 0)
    for r in range(world_size):
        share = rank_slice(batch, r, world_size)
        parts = micro_batches(share, micro)
        assert len(parts) == len(share) // micro
        assert all(len(p) == micro for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), share)


# ------------------------------------------------------------------------------ bad input
def test_cursor_off_a_batch_boundary_is_rejected():
    with pytest.raises(ValueError, match="cursor 5 .*16"):
        global_batch(100, 16, SEED, 5)


@pytest.mark.parametrize("gbs,world_size", [(16, 3), (12, 5), (8, 3)])
def test_batch_not_divisible_by_world_size_is_rejected(gbs, world_size):
    batch = global_batch(100, gbs, SEED, 0)
    with pytest.raises(ValueError, match=f"{gbs} .*world size {world_size}"):
        rank_slice(batch, 0, world_size)


def test_dataset_smaller_than_one_batch_is_rejected():
    assert samples_per_epoch(7, 8) == 0
    with pytest.raises(ValueError, match="7 samples .*8"):
        global_batch(7, 8, SEED, 0)


def test_micro_batch_not_dividing_the_share_is_rejected():
    with pytest.raises(ValueError, match="6 samples .*micro-batch size 4"):
        micro_batches(np.arange(6), 4)


# ------------------------------------------------------------------------------ eval
def test_eval_batches_are_in_dataset_order_and_wrap_around():
    np.testing.assert_array_equal(eval_batch(10, 4, 0), [0, 1, 2, 3])
    np.testing.assert_array_equal(eval_batch(10, 4, 1), [4, 5, 6, 7])
    np.testing.assert_array_equal(eval_batch(10, 4, 2), [8, 9, 0, 1])
    # A split smaller than one batch still fills it, cycling through every sample.
    np.testing.assert_array_equal(eval_batch(3, 8, 0), [0, 1, 2, 0, 1, 2, 0, 1])
    for index in range(20):
        b = eval_batch(10, 4, index)
        assert len(b) == 4 and b.min() >= 0 and b.max() < 10
