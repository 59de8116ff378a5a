"""How a job's runner keeps its worker groups off quarantined nodes (orchestrator/execution): the
label selector Ray Train is given before each group (valid for Ray's own parser), and the runner's
wait until the controller has judged its last failure, with fakes for the runner's actor handle."""

from __future__ import annotations

import threading
import time

from ray._private.label_utils import validate_label_selector

from orchestrator.execution import train_extensions
from orchestrator.execution.runner import JobRunner, _EventLog
from orchestrator.execution.train_extensions import AvoidQuarantinedNodes, node_selector
from orchestrator.jobs.events import EventKind

A, B = "a" * 56, "b" * 56


def test_the_selector_keeps_workers_off_the_nodes_and_ray_accepts_it():
    assert node_selector([]) is None
    selector = node_selector([A, B])
    assert selector == {"ray.io/node-id": f"!in({A},{B})"} and validate_label_selector(selector) is None


def test_the_callback_asks_the_runner_before_each_group(monkeypatch):
    class Method:
        def remote(self, wait_s):
            return [A]

    runner = type("Runner", (), {"placement_exclusions": Method()})()
    monkeypatch.setattr(train_extensions.ray, "get", lambda ref, timeout: ref)
    assert AvoidQuarantinedNodes(runner).on_controller_start_worker_group(scaling_config=None, num_workers=2) == \
        {"ray.io/node-id": f"!in({A})"}


def _runner() -> JobRunner:
    """The runner's quarantine state alone (no Ray, no job thread)."""
    runner = JobRunner.__new__(JobRunner)
    runner.log, runner.quarantine = _EventLog(), threading.Condition()
    runner.excluded, runner.told_upto, runner.blame_seq = {}, -1, 0
    return runner


def test_a_new_group_waits_until_the_controller_judged_the_last_failure():
    runner = _runner()
    runner.exclude_nodes({A: time.time() + 60, B: time.time() - 1}, 0)  # (B's TTL is over)
    assert runner.placement_exclusions(0.1) == [A]
    runner._blamed(runner.log.emit(EventKind.WORKER_FAILED))  # a failure the controller has not applied yet
    threading.Timer(0.2, runner.exclude_nodes, ({A: time.time() + 60, B: time.time() + 60}, 1)).start()
    started = time.time()
    assert runner.placement_exclusions(5.0) == [A, B] and time.time() - started < 3  # it waited for that word
    runner._blamed(runner.log.emit(EventKind.WORKER_FAILED))  # the controller is away: placed after the wait anyway
    assert runner.placement_exclusions(0.2) == [A, B]
    assert "the controller did not say within 0.2 s" in runner.log.events[-1].data["line"]

