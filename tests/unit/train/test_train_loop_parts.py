"""The training loop's bookkeeping without DeepSpeed or Ray: the per-interval metrics row, the
checkpoint cadence (what is saved when, and what is logged), and the one-step-ahead batch reader."""

from dataclasses import dataclass, field

import pytest

from orchestrator.config.schema import CheckpointConfig
from orchestrator.train.cadence import CheckpointCadence
from orchestrator.train.metrics import IntervalMetrics
from orchestrator.train.prefetch import BatchPrefetcher


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_metrics_row_averages_the_interval_and_starts_a_new_one():
    clock = Clock()
    m = IntervalMetrics(log_interval=10, max_steps=25, tokens_per_step=1000, flops_per_token=6e6, world_size=2,
                        peak_flops=1e12, shard_wait_s=5.0, clock=clock)
    assert [s for s in range(1, 26) if m.due(s)] == [1, 10, 20, 25]
    for wait in (0.5, 1.5):
        m.stepped(wait)
    clock.t += 4.0  # two steps in 4 s
    row = m.row(loss=2.5, lr=1e-3, tokens_seen=2000, shard_wait_s=6.0)
    assert row["train/loss"] == 2.5 and row["train/lr"] == 1e-3 and row["train/tokens"] == 2000
    assert row["perf/step_time_s"] == pytest.approx(2.0)
    assert row["perf/data_wait_s"] == pytest.approx(1.0)
    assert row["perf/data_wait_fraction"] == pytest.approx(0.5)
    assert row["perf/shard_wait_s"] == pytest.approx(0.5)
    assert row["perf/tokens_per_s"] == pytest.approx(500.0)
    assert row["perf/model_tflops_per_device"] == pytest.approx(500 * 6e6 / 2 / 1e12)
    assert row["perf/mfu"] == pytest.approx(500 * 6e6 / (2 * 1e12))
    m.stepped(0.0)  # the next interval counts from the row
    clock.t += 1.0
    row = m.row(loss=2.0, lr=1e-3, tokens_seen=3000, shard_wait_s=6.0)
    assert row["perf/step_time_s"] == pytest.approx(1.0)
    assert row["perf/data_wait_s"] == 0.0 and row["perf/shard_wait_s"] == 0.0


def test_metrics_row_has_no_mfu_without_a_peak():
    clock = Clock()
    m = IntervalMetrics(log_interval=1, max_steps=5, tokens_per_step=10, flops_per_token=1.0, world_size=1,
                        peak_flops=None, shard_wait_s=0.0, clock=clock)
    m.stepped(0.0)
    clock.t += 1.0
    assert "perf/mfu" not in m.row(loss=1.0, lr=0.1, tokens_seen=10, shard_wait_s=0.0)


@dataclass
class State:
    step: int = 0
    eval_loss: float | None = None


@dataclass
class FakeCheckpointer:
    blocking_s: float = 0.25
    last_upload_s: float = 3.0
    saves: list = field(default_factory=list)  # (step, trainer state)
    waits: int = 0

    def save(self, engine, step, trainer_state):
        self.saves.append((step, trainer_state))
        return self.blocking_s

    def wait(self):
        self.waits += 1


@dataclass
class FakeTracker:
    logged: list = field(default_factory=list)
    summaries: list = field(default_factory=list)

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def summary(self, values):
        self.summaries.append(values)


def cadence(interval, step=0, max_steps=10, clock=None):
    ckpt, tracker = FakeCheckpointer(), FakeTracker()
    c = CheckpointCadence(CheckpointConfig(interval=interval), ckpt, tracker, rank=0, step=step, max_steps=max_steps,
                          clock=clock or Clock())
    return c, ckpt, tracker


def test_cadence_every_n_steps_never_at_the_last_step_which_saves_once_at_the_end():
    c, ckpt, tracker = cadence(5, max_steps=10)
    state = State()
    for step in range(1, 11):
        state.step = step
        if c.due(step):
            assert c.save(None, state) == 0.25
    assert [s for s, _ in ckpt.saves] == [5]
    assert tracker.logged == [(5, {"ckpt/blocking_s": 0.25, "ckpt/previous_upload_s": 3.0, "ckpt/interval_s": 60.0})]
    state.eval_loss = 1.5
    c.save_final(None, state)
    assert [s for s, _ in ckpt.saves] == [5, 10] and ckpt.saves[-1][1]["eval_loss"] == 1.5
    assert ckpt.waits == 1
    assert tracker.summaries == [{"ckpt/blocking_s_mean": 0.25, "ckpt/saves": 2}]


def test_cadence_does_not_save_a_step_twice():
    c, ckpt, tracker = cadence(0, step=7)  # resumed at step 7: that step is already in a checkpoint
    c.save_at_stop(None, State(step=7))
    c.save_final(None, State(step=7))
    assert ckpt.saves == [] and ckpt.waits == 2 and tracker.summaries == []
    c.save(None, State(step=8))
    c.save_at_stop(None, State(step=8))
    assert [s for s, _ in ckpt.saves] == [8]


def test_cadence_by_time_restarts_its_clock_at_each_save_and_auto_learns_the_interval():
    clock = Clock()
    c, ckpt, _ = cadence("auto", max_steps=100, clock=clock)
    clock.t += 59
    assert not c.due(1)
    clock.t += 1  # the first auto checkpoint comes after 60 s
    assert c.due(2)
    c.save(None, State(step=2))
    assert c.schedule.seconds == pytest.approx((2 * 0.25 * 24 * 3600) ** 0.5)  # Young/Daly from the measured 0.25 s
    assert not c.due(3)
    clock.t += c.schedule.seconds
    assert c.due(4)


def test_prefetcher_reads_one_step_ahead_and_stops_at_the_end():
    read_at = []

    def read(cursor):
        read_at.append(cursor)
        return [cursor]

    batches = BatchPrefetcher(read, start=8, stride=4)
    try:
        assert [batches.next(more=True)[0] for _ in range(3)] == [[8], [12], [16]]
        batch, waited = batches.next(more=False)
        assert batch == [20] and waited >= 0.0
    finally:
        batches.close()
    assert read_at == [8, 12, 16, 20]


def test_step_vote_sums_the_losses_on_the_device_and_ors_the_flags():
    """The step's one all-reduce, over a real (one-rank) gloo group: loss tensors (as the step hands
    them over, one per micro-batch, still attached to nothing) or floats; float64 sum, mean out."""
    import socket

    import torch
    import torch.distributed as dist

    from orchestrator.train.vote import step_vote

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        losses = [torch.tensor(1.5, dtype=torch.float32), torch.tensor(2.25, requires_grad=True) * 1.0]
        vote = step_vote(losses, checkpoint_due=True, stop=False, device=cpu)
        assert vote.loss == pytest.approx(1.875) and vote.checkpoint_due and not vote.stop
        vote = step_vote([1.0, 3.0], checkpoint_due=False, stop=True, device=cpu)
        assert vote.loss == 2.0 and not vote.checkpoint_due and vote.stop
        # float32 losses are summed in float64: the same as summing their Python floats
        odd = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 0.3)]
        assert step_vote(odd, False, False, cpu).loss == sum(float(x) for x in odd) / 3
    finally:
        dist.destroy_process_group()
