"""The failure taxonomy and the restart budget: pure decisions on exceptions as Ray Train hands them
over (a `worker_failures` map of rank -> error)."""

from __future__ import annotations

from ray.exceptions import RayActorError

from orchestrator.errors import DatasetError, FailureClass, StorageError
from orchestrator.execution.failures import Failure, RestartBudget, classify

C = FailureClass


class GroupFailed(Exception):
    """What Ray Train's WorkerGroupError looks like to orch: the ranks' own errors."""

    def __init__(self, failures: dict):
        super().__init__("worker group failed")
        self.worker_failures = failures


def _died(msg: str = "The actor died unexpectedly before finishing this task.\n\tip: 10.0.0.3", **kw):
    return RayActorError(None, msg, **kw)


def test_the_most_telling_class_wins_and_names_its_ranks_and_nodes():
    # rank 1's process died; rank 0 saw its gloo all-reduce abort (a collateral error)
    f = classify(GroupFailed({0: RuntimeError("Connection closed by peer"), 1: _died()}), steps={0: 8, 1: 7})
    assert (f.cls, f.ranks, f.nodes, f.step) == (C.WORKER_CRASH, (1,), ("10.0.0.3",), 7)  # (the failing rank's step)
    assert classify(GroupFailed({0: _died()}), steps={1: 9}).step == 9  # (else the furthest rank's)
    assert "rank 0: RuntimeError: Connection closed by peer" in f.line and f.retryable
    f = classify(GroupFailed({0: _died("The actor died because its node has died.\n\tip: 10.0.0.4"), 1: _died()}))
    assert (f.cls, f.ranks, f.nodes) == (C.NODE_LOST, (0,), ("10.0.0.4",))
    assert classify(GroupFailed({0: _died(preempted=True), 1: _died()})).cls is C.PREEMPTED
    bad = classify(GroupFailed({0: DatasetError("shard 3 is corrupt"), 1: _died()}))
    assert bad.cls is C.USER and not bad.retryable and bad.ranks == (0,)
    assert classify(GroupFailed({1: StorageError("endpoint down", retryable=True)})).cls is C.STORAGE
    assert classify(GroupFailed({1: MemoryError()})).cls is C.OOM
    assert classify(GroupFailed({0: ValueError("x")}), nodes={0: "10.0.0.9"}).nodes == ("10.0.0.9",)
    # a worker killed with `kill -9`, as Ray Train's health check reports it: a crash of that rank alone,
    # with its node's Ray id (the quarantine blames that node)
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    killed = WorkerHealthCheckFailedError("The actor is dead because its worker process has died.", _died())
    f = classify(GroupFailed({0: RuntimeError("Connection reset by peer"), 1: killed, 2: RuntimeError("reset")}),
                 node_ids={0: "n0", 1: "n1", 2: "n2"})
    assert (f.cls, f.ranks, f.node_ids) == (C.WORKER_CRASH, (1,), ("n1",))
    stalled = Failure(C.STALL, (1,), ("10.0.0.3",), 12, "rank 1 stopped")
    assert classify(GroupFailed({1: _died()}), stalled=stalled) is stalled  # the watchdog killed it


def _f(cls: FailureClass, step: int | None) -> Failure:
    return Failure(cls, (1,), ("n",), step, f"{cls.value} at {step}")


def test_the_same_failure_at_the_same_step_three_times_stops_with_one_line():
    budget = RestartBudget({}, same_failure_limit=3)
    seen = [_f(C.WORKER_ERROR, 40)]
    assert budget.refusal(seen, _f(C.WORKER_ERROR, 40)) is None  # twice: restart
    seen.append(_f(C.WORKER_ERROR, 40))
    line = budget.refusal(seen, _f(C.WORKER_ERROR, 40))
    assert line.startswith("the same failure (worker_error) at step 40 3 times in a row, not restarting again "
                           "(trainer.same_failure_limit=3)"), line
    assert "\n" not in line
    # not in a row, or at another step, or of another class: no storm
    assert budget.refusal([_f(C.WORKER_ERROR, 40), _f(C.STALL, 40)], _f(C.WORKER_ERROR, 40)) is None
    assert budget.refusal([_f(C.WORKER_ERROR, 38), _f(C.WORKER_ERROR, 39)], _f(C.WORKER_ERROR, 40)) is None
    assert RestartBudget({}, same_failure_limit=0).refusal(seen * 5, _f(C.WORKER_ERROR, 40)) is None  # 0: off


def test_per_class_budgets():
    budget = RestartBudget({"stall": 1, "oom": 0}, same_failure_limit=3)
    assert budget.refusal([], _f(C.STALL, 5)) is None
    line = budget.refusal([_f(C.STALL, 5)], _f(C.STALL, 9))
    assert line.startswith("2 failures of class stall, over its budget (trainer.max_restarts_per_class: stall: 1)")
    assert budget.refusal([], _f(C.OOM, 3)) is not None
    assert budget.refusal([_f(C.STALL, 5)] * 4, _f(C.WORKER_CRASH, 9)) is None  # no budget of its own
    assert budget.refusal([], _f(C.USER, 1)) is None  # (FailFast raises it as it is)


def test_a_retried_job_starts_its_failure_count_again():
    from orchestrator.execution.runner import failures_of_this_run
    from orchestrator.jobs.record import JobRecord
    from orchestrator.jobs.state import JobState

    def failure(at: float) -> dict:
        return {"at": at, "class": "worker_error", "ranks": [0], "nodes": [], "step": 40, "line": "boom"}

    history = [{"state": s, "at": at, "reason": ""} for s, at in
               (("QUEUED", 1.0), ("STARTING", 2.0), ("RUNNING", 3.0), ("FAILED", 20.0), ("PENDING", 30.0),
                ("QUEUED", 31.0), ("STARTING", 32.0))]
    record = JobRecord(id="p-a", pipeline_id="p", name="a", kind="pretrain", state=JobState.STARTING, priority=0,
                       depends_on=[], config={}, created_at=0.0, history=history,
                       failures=[failure(10.0), failure(15.0), failure(40.0)])
    assert [f.step for f in failures_of_this_run(record)] == [40]  # (the two before `orch retry` are not counted)
