"""Unit tests of orchestrator/data/order.py: the global sample order over grids of shard layouts,
shuffle windows, batch sizes and world sizes.

The contract: an epoch's order is a pure function of (samples per shard, seed, epoch, shuffle
window): shards are shuffled, then samples within windows of `shuffle_window` consecutive shards.
Global batch `b` is the same samples whatever the world size W; rank r of W takes a contiguous
slice; the whole reader state is one integer cursor, so resuming at any W continues the exact
sequence an uninterrupted run would have seen.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from orchestrator.data.order import (
    GlobalOrder,
    epoch_order,
    eval_batch,
    global_batch,
    micro_batches,
    rank_slice,
    samples_per_epoch,
    shard_permutation,
    window_order,
)

SEED = 1234
LAYOUTS = {  # samples per shard
    "uniform": [10] * 10,
    "uneven": [7, 13, 1, 20, 9, 15, 0, 11],  # an empty shard too
    "one-shard": [50],
    "many-small": [3] * 40,
    "203": [29] * 7,
}
WINDOWS = [1, 2, 3, 8, 64]
BATCHES = [8, 12, 16]


def _world_sizes(global_batch_size: int) -> list[int]:
    return [w for w in (1, 2, 3, 4) if global_batch_size % w == 0]


GRID = [(name, window, b) for name in LAYOUTS for window in WINDOWS for b in BATCHES if sum(LAYOUTS[name]) >= b]
GRID_W = [(name, window, b, w) for name, window, b in GRID for w in _world_sizes(b)]


def _starts(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


def _shard_of(counts: list[int], ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum([0] + counts), ids, side="right") - 1


def _epoch_batches(counts, gbs: int, window: int, seed: int, epoch: int) -> list[np.ndarray]:
    per_epoch = samples_per_epoch(sum(counts), gbs)
    start = epoch * per_epoch
    return [global_batch(counts, gbs, seed, c, window) for c in range(start, start + per_epoch, gbs)]


def _run(order: GlobalOrder, world_size: int, cursor: int, steps: int) -> tuple[list[np.ndarray], int]:
    """What `steps` optimizer steps at `world_size` consume, as each step's rank shares joined in
    rank order; returns them and the cursor after the last step."""
    seen = []
    for _ in range(steps):
        batch = order.batch(cursor)
        seen.append(np.concatenate([rank_slice(batch, r, world_size) for r in range(world_size)]))
        cursor += order.global_batch_size
    return seen, cursor


# ------------------------------------------------------------------------------ partition by rank
@pytest.mark.parametrize("layout,window,gbs,world_size", GRID_W)
def test_rank_slices_partition_each_global_batch(layout, window, gbs, world_size):
    for batch in _epoch_batches(LAYOUTS[layout], gbs, window, SEED, epoch=0):
        shares = [rank_slice(batch, r, world_size) for r in range(world_size)]
        assert all(len(s) == gbs // world_size for s in shares)
        # Concatenated in rank order, the shares are the global batch itself, in order.
        np.testing.assert_array_equal(np.concatenate(shares), batch)
        # No sample is given to two ranks.
        assert len(set(np.concatenate(shares).tolist())) == gbs


@pytest.mark.parametrize("layout,window,gbs", GRID)
def test_an_epoch_is_identical_for_every_world_size(layout, window, gbs):
    counts = LAYOUTS[layout]
    steps = samples_per_epoch(sum(counts), gbs) // gbs
    runs = {w: _run(GlobalOrder(counts, SEED, window, gbs), w, cursor=0, steps=steps)[0] for w in _world_sizes(gbs)}
    reference = runs[1]
    assert len(reference) == steps
    np.testing.assert_array_equal(np.concatenate(reference), epoch_order(counts, SEED, 0, window)[: steps * gbs])
    for w, seen in runs.items():
        assert len(seen) == steps
        for step, (a, b) in enumerate(zip(seen, reference)):
            np.testing.assert_array_equal(a, b, err_msg=f"W={w} step {step} differs from W=1")


# ------------------------------------------------------------------------------ epochs
@pytest.mark.parametrize("layout,window,gbs", GRID)
def test_each_epoch_is_a_permutation_minus_the_dropped_tail(layout, window, gbs):
    counts = LAYOUTS[layout]
    n = sum(counts)
    per_epoch = samples_per_epoch(n, gbs)
    assert per_epoch == (n // gbs) * gbs
    assert per_epoch % gbs == 0 and n - gbs < per_epoch <= n
    for epoch in range(3):
        full = epoch_order(counts, SEED, epoch, window)
        np.testing.assert_array_equal(np.sort(full), np.arange(n))  # every sample exactly once
        used = np.concatenate(_epoch_batches(counts, gbs, window, SEED, epoch))
        # The samples used are exactly the first `per_epoch` of that epoch's order: only the tail is dropped.
        np.testing.assert_array_equal(used, full[:per_epoch])


@pytest.mark.parametrize("layout,window,gbs", GRID)
def test_the_cached_order_equals_the_pure_function_in_any_access_order(layout, window, gbs):
    counts = LAYOUTS[layout]
    order = GlobalOrder(counts, SEED, window, gbs)
    cursors = np.arange(0, 3 * order.samples_per_epoch, gbs)
    for cursor in np.random.default_rng(0).permutation(cursors).tolist():  # jumps across epochs and windows
        np.testing.assert_array_equal(order.batch(cursor), global_batch(counts, gbs, SEED, cursor, window))
        assert order.epoch_of(cursor) == cursor // order.samples_per_epoch


@pytest.mark.parametrize("layout,window,gbs", GRID)
def test_epochs_and_seeds_give_different_orders(layout, window, gbs):
    counts = LAYOUTS[layout]
    e0 = np.concatenate(_epoch_batches(counts, gbs, window, SEED, 0))
    e1 = np.concatenate(_epoch_batches(counts, gbs, window, SEED, 1))
    other_seed = np.concatenate(_epoch_batches(counts, gbs, window, SEED + 1, 0))
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, other_seed)
    # The same seed gives the same order again (the order is a pure function).
    np.testing.assert_array_equal(e0, np.concatenate(_epoch_batches(counts, gbs, window, SEED, 0)))


@pytest.mark.parametrize("layout,gbs", [("uniform", 16), ("uneven", 12), ("many-small", 8), ("203", 12)])
def test_cursor_crosses_epoch_boundaries(layout, gbs):
    counts, window = LAYOUTS[layout], 3
    order = GlobalOrder(counts, SEED, window, gbs)
    per_epoch = order.samples_per_epoch
    assert order.epoch_of(per_epoch - 1) == 0 and order.epoch_of(per_epoch) == 1 and order.epoch_of(2 * per_epoch) == 2
    np.testing.assert_array_equal(order.batch(per_epoch - gbs),
                                  epoch_order(counts, SEED, 0, window)[per_epoch - gbs : per_epoch])
    np.testing.assert_array_equal(order.batch(per_epoch), epoch_order(counts, SEED, 1, window)[:gbs])
    np.testing.assert_array_equal(order.batch(2 * per_epoch), epoch_order(counts, SEED, 2, window)[:gbs])


# ------------------------------------------------------------------------------ shuffle windows
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", WINDOWS)
def test_each_window_reads_only_its_own_shards(layout, window):
    counts = LAYOUTS[layout]
    for epoch in range(3):
        shards = shard_permutation(len(counts), SEED, epoch)
        np.testing.assert_array_equal(np.sort(shards), np.arange(len(counts)))
        order = epoch_order(counts, SEED, epoch, window)
        pos = 0
        for w in range(0, len(counts), window):
            mine = shards[w : w + window]
            size = sum(counts[s] for s in mine)
            run = order[pos : pos + size]
            np.testing.assert_array_equal(run, window_order(counts, SEED, epoch, window, w // window))
            touched = set(_shard_of(counts, run).tolist())
            # Every run of samples from one window touches at most `window` distinct shards: its own.
            assert len(touched) <= window
            assert touched == {s for s in mine.tolist() if counts[s]}
            pos += size
        assert pos == len(order)


@pytest.mark.parametrize("layout", ["uniform", "many-small", "203"])
def test_window_of_one_reads_shards_whole_and_a_large_window_shuffles_fully(layout):
    counts = LAYOUTS[layout]
    n, n_shards = sum(counts), len(counts)
    narrow = epoch_order(counts, SEED, 0, 1)
    # Window 1: each shard's samples are consecutive (a shuffled shard after a shuffled shard).
    for s in range(n_shards):
        positions = np.flatnonzero(_shard_of(counts, narrow) == s)
        assert positions[-1] - positions[0] == counts[s] - 1
    # A window of every shard (or more) shuffles the whole split as one: the same order for any
    # window >= the shard count, and each shard's samples spread over the epoch.
    full = epoch_order(counts, SEED, 0, n_shards)
    np.testing.assert_array_equal(full, epoch_order(counts, SEED, 0, n_shards + 7))
    np.testing.assert_array_equal(full, window_order(counts, SEED, 0, n_shards, 0))
    spans = [np.ptp(np.flatnonzero(_shard_of(counts, full) == s)) for s in range(n_shards)]
    assert np.mean(spans) > n / 3  # uniformly placed, k of n samples span (k-1)/(k+1) n on average
    switches = np.count_nonzero(np.diff(_shard_of(counts, full)))
    assert switches > n / 2  # consecutive samples mostly come from different shards
    # Different windows give different orders of the same samples.
    assert not np.array_equal(narrow, full)


def test_a_batch_of_a_huge_split_is_computed_without_building_the_epoch():
    counts = [50_000] * 20_000  # a billion samples: a whole epoch would be 8 GB of ids
    order = GlobalOrder(counts, SEED, 8, 512)
    t0 = time.perf_counter()
    batch = order.batch(order.samples_per_epoch * 3 + 512 * 1000)
    assert time.perf_counter() - t0 < 5
    assert len(set(batch.tolist())) == 512
    assert len(set(_shard_of(counts, batch).tolist())) <= 8  # inside one window


# ------------------------------------------------------------------------------ resume
RESUME_GRID = [
    (layout, window, b, w0, w1)
    for layout, b in [("uniform", 16), ("uneven", 12), ("203", 8)]
    for window in (1, 3)
    for w0, w1 in [(1, 2), (2, 4), (4, 1), (4, 2), (2, 3), (3, 1)]
    if b % w0 == 0 and b % w1 == 0
]


@pytest.mark.parametrize("layout,window,gbs,w_before,w_after", RESUME_GRID)
def test_resuming_at_another_world_size_continues_the_sequence(layout, window, gbs, w_before, w_after):
    counts = LAYOUTS[layout]
    per_epoch_steps = samples_per_epoch(sum(counts), gbs) // gbs
    total = 3 * per_epoch_steps + 1  # crosses two epoch boundaries
    uninterrupted, _ = _run(GlobalOrder(counts, SEED, window, gbs), 1, cursor=0, steps=total)
    split = per_epoch_steps + 1  # stop just after an epoch boundary
    before, cursor = _run(GlobalOrder(counts, SEED, window, gbs), w_before, cursor=0, steps=split)
    assert cursor == split * gbs
    # A restart builds a fresh order from the saved cursor alone.
    after, _ = _run(GlobalOrder(counts, SEED, window, gbs), w_after, cursor=cursor, steps=total - split)
    resumed = before + after
    assert len(resumed) == len(uninterrupted)
    for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step} differs after resuming at W={w_after}")


# ------------------------------------------------------------------------------ micro-batches
@pytest.mark.parametrize("gbs,world_size,micro",
                         [(16, 1, 4), (16, 2, 4), (16, 4, 2), (12, 3, 2), (12, 2, 6), (8, 4, 1)])
def test_micro_batches_split_a_rank_share_exactly(gbs, world_size, micro):
    batch = global_batch(LAYOUTS["uniform"], gbs, SEED, 0, 2)
    for r in range(world_size):
        share = rank_slice(batch, r, world_size)
        parts = micro_batches(share, micro)
        assert len(parts) == len(share) // micro
        assert all(len(p) == micro for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), share)


# ------------------------------------------------------------------------------ bad input
def test_cursor_off_a_batch_boundary_is_rejected():
    with pytest.raises(ValueError, match="cursor 5 .*16"):
        global_batch(LAYOUTS["uniform"], 16, SEED, 5, 2)
    with pytest.raises(ValueError, match="cursor -16 "):
        GlobalOrder(LAYOUTS["uniform"], SEED, 2, 16).batch(-16)


@pytest.mark.parametrize("gbs,world_size", [(16, 3), (12, 5), (8, 3)])
def test_batch_not_divisible_by_world_size_is_rejected(gbs, world_size):
    batch = global_batch(LAYOUTS["uniform"], gbs, SEED, 0, 2)
    with pytest.raises(ValueError, match=f"{gbs} .*world size {world_size}"):
        rank_slice(batch, 0, world_size)


def test_dataset_smaller_than_one_batch_is_rejected():
    assert samples_per_epoch(7, 8) == 0
    with pytest.raises(ValueError, match="7 samples .*8"):
        global_batch([3, 4], 8, SEED, 0, 2)


@pytest.mark.parametrize("window", [0, -1])
def test_shuffle_window_below_one_names_the_setting(window):
    with pytest.raises(ValueError, match="data.shuffle_window"):
        GlobalOrder(LAYOUTS["uniform"], SEED, window, 8)
    with pytest.raises(ValueError, match="data.shuffle_window"):
        epoch_order(LAYOUTS["uniform"], SEED, 0, window)


@pytest.mark.parametrize("counts", [[], [3, -1]])
def test_bad_shard_counts_are_rejected(counts):
    with pytest.raises(ValueError, match="samples per shard"):
        GlobalOrder(counts, SEED, 2, 1)


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
