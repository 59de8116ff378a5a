"""The watchdog's decisions, stepped with a fake clock: when no progress is a stall, and which rank
and node it names."""

from __future__ import annotations

from orchestrator.execution.watchdog import StallPolicy, Watchdog
from orchestrator.train.heartbeat import CHECKPOINT, COLLECTIVE, DONE, FORWARD_BACKWARD, Beat

POLICY = StallPolicy(timeout_s=None, floor_s=10.0, factor=5.0, checkpoint_timeout_s=60.0, silence_s=3.0)


def _beat(rank: int, step: int, phase: str, since: float, group: str = "g1", step_time: float | None = 1.0) -> Beat:
    return Beat(group=group, rank=rank, world_size=2, node=f"10.0.0.{rank + 2}", node_id=f"n{rank}", pid=100 + rank,
                step=step, phase=phase, phase_since=since, step_time_s=step_time, sent=since)


def _run_steps(dog: Watchdog, steps: int, step_s: float = 1.0) -> float:
    """Both ranks step together `steps` times; the time after."""
    t = 0.0
    for step in range(1, steps + 1):
        for phase in (FORWARD_BACKWARD, COLLECTIVE):
            t += step_s / 2
            for rank in (0, 1):
                dog.beat(_beat(rank, step, phase, t, step_time=step_s), t)
    return t


def test_a_silent_rank_is_named_with_its_node_step_and_phase():
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 5)
    # rank 1 is stopped in forward/backward of step 6; rank 0 waits in the step's collective, still beating
    dog.beat(_beat(1, 6, FORWARD_BACKWARD, t + 0.1), t + 0.1)
    dog.beat(_beat(0, 6, COLLECTIVE, t + 0.5), t + 0.5)
    for k in range(1, 10):
        dog.beat(_beat(0, 6, COLLECTIVE, t + 0.5), t + 0.5 + k)  # the same state again: no progress
        assert dog.check(t + 0.5 + k) is None
    stall = dog.check(t + 10.6)
    assert stall is not None and [r.rank for r in stall.stuck] == [1] and [r.rank for r in stall.waiting] == [0]
    line = stall.line()
    assert "rank 1 on node 10.0.0.3 went silent (last heartbeat 10 s ago, in forward/backward of step 6)" in line, line
    assert stall.step == 6
    assert "rank 0 waited in collective of step 6 for 10 s" in line, line
    assert "stall timeout 10 s" in line
    dog.disarm()
    assert dog.check(t + 100) is None  # handled once
    dog.beat(_beat(1, 6, FORWARD_BACKWARD, t + 0.1), t + 101)  # a late beat of the old group
    assert dog.check(t + 200) is None
    dog.beat(_beat(0, 5, COLLECTIVE, t + 300, group="g2"), t + 300)  # the next group is watched
    assert dog.check(t + 305) is None and dog.check(t + 311) is not None


def test_the_rank_behind_is_named_when_every_rank_still_beats():
    """A training thread wedged while its heartbeat thread runs (a hung filesystem call)."""
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 3)
    dog.beat(_beat(0, 4, COLLECTIVE, t), t)
    dog.beat(_beat(1, 4, FORWARD_BACKWARD, t), t)
    for k in range(1, 12):
        for rank, phase in ((0, COLLECTIVE), (1, FORWARD_BACKWARD)):
            dog.beat(_beat(rank, 4, phase, t), t + k)
    stall = dog.check(t + 11)
    assert [r.rank for r in stall.stuck] == [1] and "silent" not in stall.line()
    assert "rank 1 on node 10.0.0.3 stopped in forward/backward of step 4" in stall.line(), stall.line()


def test_timeout_follows_the_median_step_time_and_a_checkpoint_save():
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 5, step_s=4.0)  # median 4 s: 5 x 4 = 20 s > the 10 s floor
    assert dog.median_step_s() == 4.0
    assert dog.check(t + 15) is None and dog.check(t + 21) is not None
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 3)
    for rank in (0, 1):
        dog.beat(_beat(rank, 3, CHECKPOINT, t), t)
    assert dog.check(t + 50) is None  # a long save is no stall
    assert "checkpoint save of step 3" in dog.check(t + 61).line()
    fixed = Watchdog(StallPolicy(timeout_s=3.0, floor_s=300.0, factor=5.0, checkpoint_timeout_s=0.0, silence_s=3.0))
    t = _run_steps(fixed, 2)
    assert fixed.check(t + 2.9) is None and fixed.check(t + 3.1) is not None


def test_a_group_that_finished_is_not_a_stall():
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 3)
    for rank in (0, 1):
        dog.beat(_beat(rank, 3, DONE, t), t)
    assert dog.check(t + 1000) is None


def test_every_rank_silent_blames_them_all():
    dog = Watchdog(POLICY)
    t = _run_steps(dog, 3)
    stall = dog.check(t + 30)
    assert sorted(r.rank for r in stall.stuck) == [0, 1] and not stall.waiting
    line = stall.line()
    assert "rank 0 on node 10.0.0.2 went silent (last heartbeat 30 s ago, in collective of step 3)" in line, line
    assert "rank 1 on node 10.0.0.3 went silent" in line and "waited" not in line, line
