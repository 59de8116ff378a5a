"""The restart ledger and the failures a record keeps, through the controller stepped by hand (fake
runners, no Ray), with a controller restart between any two events: each failure and restart is
recorded once, with its class, ranks, nodes, the step resumed from and what was lost."""

from __future__ import annotations

import pytest

from orchestrator.jobs.events import EventKind, RunnerEvent
from orchestrator.jobs.state import JobState
from tests.unit.jobs.test_lifecycle import env, started  # noqa: F401 - (env: the fixture)

K = EventKind

STALL_LINE = "no progress for 9 s (stall timeout 8 s): rank 1 on node 10.0.0.3 stopped in forward/backward of step 22"
SCRIPT = [  # (event kind, data, at) a runner emits: a stall at step 22, a restart, a crash at 31, a restart
    (K.ATTEMPT_STARTED, {"attempt": 1, "reason": "first", "world_size": 2}, 100.0),
    (K.ENGINE_READY, {}, 101.0),
    (K.PROGRESS, {"metrics": {"step": 10, "loss": 2.0, "step_time_s": 0.5}}, 110.0),
    (K.CHECKPOINT_COMMITTED, {"uri": "s3://x/step-10", "step": 10}, 111.0),
    (K.PROGRESS, {"metrics": {"step": 21, "loss": 1.9, "step_time_s": 0.5}}, 120.0),
    (K.STALLED, {"line": STALL_LINE, "ranks": [1], "nodes": ["10.0.0.3"], "step": 22, "phase": "forward/backward",
                 "dumps": "s3://x/hangs/g1", "killed": [1]}, 130.0),
    (K.RESTART_DECIDED, {"class": "stall", "ranks": [1], "nodes": ["10.0.0.3"]}, 131.0),
    (K.ATTEMPT_STARTED, {"attempt": 2, "reason": "failure", "world_size": 2}, 132.0),
    (K.ENGINE_READY, {"resumed_from": "s3://x/step-10", "step": 10}, 136.0),
    (K.WORKER_FAILED, {"at": 150.0, "class": "worker_crash", "ranks": [0], "nodes": ["10.0.0.2"], "step": 31,
                       "line": "rank 0: ActorDiedError: the actor died"}, 150.5),
    (K.RESTART_DECIDED, {"class": "worker_crash", "ranks": [0], "nodes": ["10.0.0.2"]}, 151.0),
    (K.ATTEMPT_STARTED, {"attempt": 3, "reason": "failure", "world_size": 2}, 152.0),
    (K.ATTEMPT_STARTED, {"attempt": 4, "reason": "failure", "world_size": 2}, 160.0),  # (no failure seen: a crash)
    (K.ENGINE_READY, {"resumed_from": "s3://x/step-10", "step": 10}, 165.0),
    (K.SUCCEEDED, {"export": "s3://x/export", "metrics": {"step": 100}}, 200.0),
]


def _emit(run, kind, data, at) -> None:
    run.events.append(RunnerEvent(len(run.events) + 1, kind, data, at))


@pytest.mark.parametrize("cut", range(len(SCRIPT) + 1))
def test_ledger_records_each_failure_and_restart_once(env, cut):  # noqa: F811 - (env: the fixture)
    c, run = started(env)
    for event in SCRIPT[:cut]:
        _emit(run, *event)
    c.step(["a"])
    c = env.controller()  # a controller restart while the stall is handled, or at any other point
    for event in SCRIPT[cut:]:
        _emit(run, *event)
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is JobState.SUCCEEDED and a.restarts == 3
    assert [(f["class"], f["ranks"], f["step"]) for f in a.failures] == [("stall", [1], 22), ("worker_crash", [0], 31)]
    stall, crash, unknown = a.restart_log
    assert stall == {"at": 130.0, "restart_at": 132.0, "class": "stall", "ranks": [1], "nodes": ["10.0.0.3"],
                     "failed_at_step": 22, "resumed_from_step": 10, "steps_lost": 12, "seconds_lost": 12.0}
    assert (crash["class"], crash["ranks"], crash["failed_at_step"], crash["resumed_from_step"]) == \
        ("worker_crash", [0], 31, None)  # (its group failed before it was ready: the next one resumed)
    assert (unknown["class"], unknown["resumed_from_step"], unknown["steps_lost"]) == ("worker_crash", 10, 11)
    lines = [line for line in env.lines if "STALLED" in line]
    assert lines == [f"a: STALLED: {STALL_LINE}; every rank's stacks in s3://x/hangs/g1"]  # told once
    assert "a: RESTARTING after a stall of rank 1 (restart 1 of 3)" in env.lines
    # RESTARTING as soon as Ray Train decided to restart, before the new group started
    assert "a: worker group failed (stall of rank 1): restarting from the last checkpoint" in env.lines
    restarting = [h for h in a.history if h["state"] == "RESTARTING"]
    assert len(restarting) == 2, a.history  # (the group of attempt 3 failed while RESTARTING: no new state)
    assert restarting[0]["reason"] == "worker group failed (stall of rank 1); restarting from the last checkpoint"
    assert any("failure (worker_crash) of rank 0 on 10.0.0.2 at step 31" in line for line in env.lines)
