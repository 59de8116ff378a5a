"""Checkpoint policy as pure functions: the interval forms, Young/Daly, retention, step-N URIs."""

import math

import pytest

from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri, step_of
from orchestrator.checkpoint.retention import to_delete
from orchestrator.config.interval import AUTO_FIRST_S, CheckpointSchedule, Interval, parse_interval, young_daly_s
from orchestrator.config.schema import CheckpointConfig
from orchestrator.errors import CheckpointError


@pytest.mark.parametrize("value, expected", [
    (0, Interval("final")), (500, Interval("steps", 500)), ("500", Interval("steps", 500)),
    ("90s", Interval("seconds", 90)), ("10m", Interval("seconds", 600)), ("2h", Interval("seconds", 7200)),
    ("1.5m", Interval("seconds", 90)), ("auto", Interval("auto")), (" AUTO ", Interval("auto")),
])
def test_interval_forms(value, expected):
    assert parse_interval(value) == expected


@pytest.mark.parametrize("bad", [-1, "10x", "m10", "0s", "", True, "soon"])
def test_bad_intervals_are_refused_with_the_forms(bad):
    with pytest.raises(ValueError, match="10m"):
        parse_interval(bad)
    with pytest.raises(ValueError):
        CheckpointConfig(interval=bad)


def test_young_daly():
    # sqrt(2 * 2 s * 86400 s) = 587.8 s
    assert young_daly_s(2.0, 86400) == pytest.approx(math.sqrt(2 * 2 * 86400))
    assert young_daly_s(8.0, 86400) == pytest.approx(2 * young_daly_s(2.0, 86400))  # sqrt scaling


def test_schedules():
    steps = CheckpointSchedule(parse_interval(10), 86400)
    assert [s for s in range(1, 31) if steps.due(s, 0)] == [10, 20, 30]
    final = CheckpointSchedule(parse_interval(0), 86400)
    assert not any(final.due(s, 1e9) for s in range(1, 100))
    timed = CheckpointSchedule(parse_interval("2m"), 86400)
    assert not timed.due(7, 119.0) and timed.due(7, 120.0)
    auto = CheckpointSchedule(parse_interval("auto"), 3600)
    assert auto.seconds == AUTO_FIRST_S and auto.due(3, AUTO_FIRST_S)
    auto.measured(0.5)  # then sqrt(2 * 0.5 * 3600) = 60 s, with its inputs in the log line
    assert auto.seconds == pytest.approx(60.0)
    assert "0.500 s blocking" in auto.reason and "3600 s MTBF" in auto.reason


def refs(*steps, uncommitted=()):
    out = [CheckpointRef(s, f"mem://run/checkpoints/step-{s}", True) for s in steps]
    out += [CheckpointRef(s, f"mem://run/checkpoints/step-{s}", False) for s in uncommitted]
    return sorted(out, key=lambda r: r.step)


def steps(deleted):
    return sorted(r.step for r in deleted)


def test_keep_last_and_milestones():
    existing = refs(10, 20, 30, 40, 50, 60)
    assert steps(to_delete(existing, keep_last=2, keep_every=0, just_committed=60)) == [10, 20, 30, 40]
    assert steps(to_delete(existing, keep_last=2, keep_every=20, just_committed=60)) == [10, 30]


def test_leftovers_of_crashed_saves_are_removed_but_never_the_newest_committed():
    existing = refs(10, 20, 30, uncommitted=(25, 40))
    assert steps(to_delete(existing, keep_last=1, keep_every=0, just_committed=30)) == [10, 20, 25, 40]
    # just committed is kept even with keep_last=1 and a newer committed one around (after a
    # fallback), and that newer committed one is not this save's to delete
    existing = refs(10, 20, 30)
    assert steps(to_delete(existing, keep_last=1, keep_every=0, just_committed=20)) == [10]


@pytest.mark.parametrize("uri, step", [
    ("s3://b/runs/j/checkpoints/step-0", 0), ("s3://b/runs/j/checkpoints/step-120/", 120),
    ("/abs/step-3/checkpoints/step-42", 42), (checkpoint_uri("file:///r/runs/j", 7), 7),
])
def test_step_of_reads_the_folder_name(uri, step):
    assert step_of(uri) == step


@pytest.mark.parametrize("uri", [
    "s3://b/runs/j/checkpoints/latest", "s3://b/runs/j/checkpoints/step-", "s3://b/runs/j/checkpoints/step-3a",
    "s3://b/runs/j/checkpoints/mystep-3", "s3://b/runs/j/checkpoints/step-3/universal", "s3://b/runs/j",
])
def test_step_of_refuses_a_folder_not_named_step_n(uri):
    with pytest.raises(CheckpointError) as e:
        step_of(uri)
    message = str(e.value)
    assert uri in message and ".../checkpoints/step-N" in message and "\n" not in message
