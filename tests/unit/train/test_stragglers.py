"""Straggler detection over a window of logged intervals: a rank persistently slower is reported
once, with its ratio; one slow interval, or a long pause, is not."""

from __future__ import annotations

from orchestrator.train.stragglers import StragglerDetector


def test_a_persistently_slow_rank_is_reported_once_until_it_keeps_up():
    d = StragglerDetector(factor=1.5, window=4)
    for step in range(1, 4):
        assert d.add(step, [1.0, 2.0, 1.0, 1.1]) == []  # (the window is not full yet)
    (s,) = d.add(4, [1.0, 2.0, 1.0, 1.1])
    assert (s.rank, s.ratio, s.step, s.window) == (1, 2.0, 4, 4)  # 2.0 over the others' median 1.0
    assert d.add(5, [1.0, 2.2, 1.0, 1.0]) == []  # already reported
    for step in range(6, 10):
        d.add(step, [1.0, 1.0, 1.0, 1.0])  # keeps up again
    assert 1 not in d.flagged
    reported = [d.add(step, [1.0, 1.0, 1.0, 3.0]) for step in range(10, 14)]
    assert [s.rank for found in reported for s in found] == [3]


def test_one_long_pause_or_a_mild_slowness_is_no_straggler():
    d = StragglerDetector(factor=1.5, window=4)
    found = [d.add(1, [1.0, 10.0])] + [d.add(step, [1.0, 1.0]) for step in range(2, 6)]
    assert not any(found)  # 3.25x over the first window, but slow in one interval of four
    d = StragglerDetector(factor=1.5, window=4)
    (s,) = [s for step in range(1, 5) for s in d.add(step, [1.0, 2.0])]  # two ranks: against the other one
    assert (s.rank, s.ratio) == (1, 2.0)
    d = StragglerDetector(factor=1.5, window=3)
    assert not any(d.add(step, [1.0, 1.4, 1.0]) for step in range(1, 10))
    assert StragglerDetector(1.5, 1).add(1, [2.0]) == []  # one rank: nothing to compare with
