"""Unit tests of victim selection (orchestrator/jobs/preemption.py): the fewest steps since the last
commit, ties by lower priority then newest, minimum runtime, never the preemptor's dependency,
borrowers give back room to a queue below its quota. Hand-built records: no Ray, no clock."""

from __future__ import annotations

import itertools

from orchestrator.config.schema import QueuesConfig, QueueSpec, Resources
from orchestrator.jobs.preemption import choose_victims, newest_first, steps_since_commit
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.sharing import UNLIMITED
from orchestrator.jobs.state import JobState

S = JobState
_seq = itertools.count(1)
NOW = 10_000.0
ONE_QUEUE = QueuesConfig(teams=UNLIMITED.teams, min_runtime_s=300.0)


def job(id: str, state: JobState = S.RUNNING, *, workers: int = 2, priority: int = 0, step: int = 0,
        committed: int | None = None, started: float = 0.0, queue: str = "default",
        depends_on: list[str] | None = None) -> JobRecord:
    history = [{"state": "QUEUED", "at": 0.0, "reason": ""}]
    if state.active:
        history.append({"state": "STARTING", "at": started, "reason": ""})
    return JobRecord(id=id, pipeline_id="p", name=id, kind="pretrain", state=state, priority=priority,
                     depends_on=depends_on or [], config={"workers": workers, "max_failures": 0,
                                                          "cluster": {"cpus_per_worker": 1, "gpus_per_worker": 0}},
                     created_at=0.0, seq=next(_seq), metrics={"step": step}, history=history, queue=queue,
                     checkpoint=None if committed is None else f"file:///s/runs/{id}/checkpoints/step-{committed}")


def test_steps_since_commit():
    assert steps_since_commit(job("a", step=130, committed=100)) == 30
    assert steps_since_commit(job("b", step=7)) == 7


def test_the_victim_is_the_job_with_the_fewest_steps_since_its_last_commit():
    running = [job("old", step=500, committed=480, started=100.0),  # 20 steps to lose
               job("new", step=50, committed=0, started=9000.0)]  # 50 steps to lose, and the newest
    high = job("high", S.QUEUED, priority=5)
    p = choose_victims(high, [*running, high], {"CPU": 4.0}, ONE_QUEUE, NOW)
    assert p.victims == ("old",) and p.lost_steps == 20
    assert p.reason == "preempted for high (priority 5, queue default): old (20 steps since its last commit)"
    # the usual rule would have taken the newest, losing 50
    assert choose_victims(high, [*running, high], {"CPU": 4.0}, ONE_QUEUE, NOW, order=newest_first).victims == ("new",)


def test_ties_go_to_the_lower_priority_then_the_newest():
    a = job("a", step=10, committed=0, priority=1, started=100.0)
    b = job("b", step=10, committed=0, priority=0, started=100.0)
    c = job("c", step=10, committed=0, priority=0, started=200.0)
    high = job("high", S.QUEUED, priority=5)
    assert choose_victims(high, [a, b, c, high], {"CPU": 6.0}, ONE_QUEUE, NOW).victims == ("c",)


def test_never_one_running_less_than_the_minimum_nor_a_dependency_nor_equal_priority():
    young = job("young", step=1, started=NOW - 10)  # 10 s < 300 s
    dep = job("dep", step=1, started=0.0)
    same = job("same", step=1, started=0.0, priority=5)
    high = job("high", S.QUEUED, priority=5, depends_on=["dep"])
    assert choose_victims(high, [young, dep, same, high], {"CPU": 6.0}, ONE_QUEUE, NOW) is None
    ok = job("ok", step=99, started=0.0)
    assert choose_victims(high, [young, dep, same, ok, high], {"CPU": 8.0}, ONE_QUEUE, NOW).victims == ("ok",)


def test_only_as_many_victims_as_needed():
    small = [job(f"s{i}", workers=1, step=i, started=0.0) for i in range(1, 4)]  # 1, 2, 3 steps to lose
    big = job("big", workers=3, step=100, started=0.0)
    high = job("high", S.QUEUED, priority=9, workers=3)
    # s1 + s2 free 2 (not enough), s3 makes 3; cheaper than big (100)
    p = choose_victims(high, [*small, big, high], {"CPU": 6.0}, ONE_QUEUE, NOW)
    assert p.victims == ("s1", "s2", "s3") and p.lost_steps == 6
    # one CPU already free: two suffice
    assert choose_victims(high, [*small, big, high], {"CPU": 7.0}, ONE_QUEUE, NOW).victims == ("s1", "s2")
    # fits already: no preemption
    assert choose_victims(high, [*small, big, high], {"CPU": 9.0}, ONE_QUEUE, NOW) is None


def test_a_queue_below_its_quota_takes_its_room_back_from_a_borrower_of_equal_priority():
    cfg = QueuesConfig(teams={"team-a": QueueSpec(quota=Resources(workers=2), borrow=Resources(workers=4)),
                              "team-b": QueueSpec(quota=Resources(workers=2), borrow=Resources(workers=0))},
                       min_runtime_s=0.0)
    borrower = [job("a1", queue="team-a", step=5, workers=2), job("a2", queue="team-a", step=3, workers=2)]
    b1 = job("b1", S.QUEUED, queue="team-b", workers=2)
    p = choose_victims(b1, [*borrower, b1], {"CPU": 4.0}, cfg, NOW)
    assert p.victims == ("a2",)
    # a queue within its quota is not preempted by an equal priority (team-a holds just its quota)
    assert choose_victims(b1, [borrower[0], b1], {"CPU": 2.0}, cfg, NOW) is None
    # and a job beyond its own queue's quota preempts nobody
    b2 = job("b2", S.QUEUED, queue="team-b", workers=4, priority=9)
    assert choose_victims(b2, [*borrower, b2], {"CPU": 4.0}, cfg, NOW) is None
