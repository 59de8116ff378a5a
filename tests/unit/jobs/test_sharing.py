"""Unit tests of sharing a cluster (orchestrator/jobs/sharing.py): quotas and borrowing, fair share by
decayed usage, backfill without delay, and the line that says why a job waits. Hand-built records:
no Ray, no files, no clock."""

from __future__ import annotations

import itertools
import math

import pytest

from orchestrator.config.schema import QueuesConfig, QueueSpec, Resources
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.sharing import (
    UNLIMITED,
    Usage,
    admit,
    advance_usage,
    expected_run_s,
    quota_check,
    shadow_time,
)
from orchestrator.jobs.state import JobState

S = JobState
_seq = itertools.count(1)
CAP = {"CPU": 8.0}


def job(id: str, state: JobState = S.QUEUED, *, queue: str = "default", workers: int = 1, priority: int = 0,
        steps: int = 100, step: int | None = None, step_time: float | None = None, seq: int | None = None,
        max_workers: int | None = None) -> JobRecord:
    metrics = {} if step is None else {"step": step}
    if step_time is not None and step is not None:
        metrics["step_time_s"] = step_time
    config = {"workers": workers, "max_workers": max_workers, "max_failures": 0, "trainer": {"max_steps": steps},
              "cluster": {"cpus_per_worker": 1, "gpus_per_worker": 0},
              "step_time_s": step_time if step is None else None}
    return JobRecord(id=id, pipeline_id="p", name=id, kind="pretrain", state=state, priority=priority, depends_on=[],
                     config=config, created_at=0.0, seq=next(_seq) if seq is None else seq, metrics=metrics,
                     queue=queue)


def teams(a: Resources | None = None, b: Resources | None = None, borrow: Resources | None = None,
          weights=(1.0, 1.0), half_life_s: float = 3600.0) -> QueuesConfig:
    none = Resources()
    return QueuesConfig(teams={
        "team-a": QueueSpec(quota=a or none, borrow=borrow or none, weight=weights[0]),
        "team-b": QueueSpec(quota=b or none, borrow=borrow or none, weight=weights[1]),
    }, half_life_s=half_life_s)


def started(result) -> list[str]:
    return [d.job_id for d in result.decisions]


# ------------------------------------------------------------------------------------- usage
def test_usage_decays_by_half_each_half_life_and_adds_the_held_worker_seconds():
    u = Usage(0.0, {"team-a": 1000.0})
    later = advance_usage(u, {}, 3600.0, 3600.0)
    assert later.by_queue["team-a"] == pytest.approx(500.0)
    # 4 workers for a tiny interval: ~4 worker-seconds per second, undecayed
    tick = advance_usage(Usage(0.0, {}), {"team-b": 4.0}, 1.0, 3600.0)
    assert tick.by_queue["team-b"] == pytest.approx(4.0, rel=1e-3)
    # held for one half-life: 4 * h / ln2 * (1 - 1/2)
    long = advance_usage(Usage(0.0, {}), {"team-b": 4.0}, 3600.0, 3600.0)
    assert long.by_queue["team-b"] == pytest.approx(4 * 3600 / math.log(2) / 2)
    # advancing in many small steps gives the same as one step (no drift from the controller's tick)
    stepwise = Usage(0.0, {"team-a": 100.0})
    for t in range(1, 601):
        stepwise = advance_usage(stepwise, {"team-a": 2.0}, float(t), 300.0)
    once = advance_usage(Usage(0.0, {"team-a": 100.0}), {"team-a": 2.0}, 600.0, 300.0)
    assert stepwise.by_queue["team-a"] == pytest.approx(once.by_queue["team-a"])


def test_a_first_advance_only_sets_the_clock():
    assert advance_usage(Usage(), {"q": 8.0}, 50.0, 60.0) == Usage(50.0, {})


# ------------------------------------------------------------------------------------- fair share
def test_the_queue_furthest_below_its_share_goes_first_whatever_the_submission_order():
    jobs = [job("a1", queue="team-a", workers=4, seq=1), job("b1", queue="team-b", workers=4, seq=2)]
    usage = Usage(0.0, {"team-a": 10_000.0, "team-b": 100.0})
    capacity = {"CPU": 4.0}  # room for one of them
    result = admit(jobs, capacity, teams(), usage, now=0.0)
    assert started(result) == ["b1"]
    assert result.waits["a1"].startswith("needs 4 workers, 0 free")
    # the weight counts: team-a weighs 1000x more, so its usage is far below its share
    assert started(admit(jobs, capacity, teams(weights=(1000.0, 1.0)), usage, now=0.0)) == ["a1"]


def test_equal_shares_fall_back_to_fifo_and_one_pass_alternates_between_queues():
    jobs = [job("a1", queue="team-a", seq=1), job("a2", queue="team-a", seq=2), job("a3", queue="team-a", seq=3),
            job("b1", queue="team-b", seq=4), job("b2", queue="team-b", seq=5)]
    result = admit(jobs, {"CPU": 4.0}, teams(), Usage(0.0, {}), now=0.0)
    # a1 first (FIFO at equal shares); then team-b holds less, then they alternate
    assert started(result) == ["a1", "b1", "a2", "b2"]
    assert result.waits["a3"].startswith("needs 1 worker, 0 free")


def test_priority_comes_before_fair_share():
    jobs = [job("a1", queue="team-a", priority=5, seq=2), job("b1", queue="team-b", seq=1)]
    usage = Usage(0.0, {"team-a": 1e9})
    assert started(admit(jobs, {"CPU": 1.0}, teams(), usage, now=0.0)) == ["a1"]


# ------------------------------------------------------------------------------------- quota
def test_a_queue_at_its_quota_waits_and_says_so_while_another_queue_starts():
    running = [job("a0", S.RUNNING, queue="team-a", workers=8)]
    jobs = running + [job("a1", queue="team-a", workers=2), job("a2", queue="team-a", workers=1),
                      job("b1", queue="team-b", workers=2)]
    cfg = teams(a=Resources(workers=8), b=Resources(workers=8), borrow=Resources(workers=0))
    result = admit(jobs, {"CPU": 16.0}, cfg, Usage(0.0, {}), now=0.0)
    assert started(result) == ["b1"]
    assert result.waits["a1"] == "team-a at its quota 8/8 workers and nothing to borrow"
    assert result.waits["a2"] == "behind a1 in queue team-a"
    assert result.blocker is None  # a queue at its quota holds up no other queue


def test_borrowing_takes_idle_room_up_to_the_limit_and_never_blocks_others():
    cfg = teams(a=Resources(workers=2), b=Resources(workers=2), borrow=Resources(workers=2))
    jobs = [job("a1", queue="team-a", workers=4, seq=1), job("a2", queue="team-a", workers=1, seq=2)]
    result = admit(jobs, {"CPU": 8.0}, cfg, Usage(0.0, {}), now=0.0)
    assert started(result) == ["a1"]  # 2 of quota + 2 borrowed
    assert "borrowing idle room" in result.decisions[0].reason
    assert result.waits["a2"] == "team-a at 4/2 workers of its quota, needs 1 more, beyond its borrowing limit of 2"
    # no idle room for the borrower: it waits, and team-b's job within its quota is not held up behind it
    cfg = teams(a=Resources(workers=2), b=Resources(workers=4), borrow=Resources(workers=2))
    busy = [job("x", S.RUNNING, queue="team-b", workers=2), job("a3", queue="team-a", workers=4, seq=3),
            job("b3", queue="team-b", workers=2, seq=4)]
    result = admit(busy, {"CPU": 5.0}, cfg, Usage(0.0, {"team-b": 1e9}), now=0.0)
    assert started(result) == ["b3"]  # first: within its quota beats borrowing, whatever team-b's usage
    assert result.waits["a3"] == ("team-a would borrow beyond its quota and there is no idle room: needs 4 workers, "
                                  "1 free")
    assert result.blocker is None
    # within its quota but no room: the blocker (what preemption would make room for)
    result = admit(busy, {"CPU": 3.0}, cfg, Usage(0.0, {"team-b": 1e9}), now=0.0)
    assert started(result) == [] and result.blocker == "b3"


def test_quota_counts_gpus_and_an_elastic_job_at_its_maximum():
    spec = QueueSpec(quota=Resources(GPU=4), borrow=Resources(GPU=0))
    assert quota_check("q", spec, {"GPU": 2.0}, {"GPU": 2.0, "workers": 2}).verdict == "within"
    assert quota_check("q", spec, {"GPU": 2.0}, {"GPU": 3.0}).why == "q at 2/4 GPU of its quota, needs 3 more and " \
                                                                     "nothing to borrow"
    elastic = job("e", S.RUNNING, queue="team-a", workers=2, max_workers=4)
    cfg = teams(a=Resources(workers=4), borrow=Resources(workers=0))
    result = admit([elastic, job("a1", queue="team-a")], {"CPU": 16.0}, cfg, Usage(0.0, {}), now=0.0)
    assert result.waits["a1"] == "team-a at its quota 4/4 workers and nothing to borrow"


def test_a_job_of_an_unknown_queue_waits_and_names_the_fix():
    result = admit([job("x", queue="nope")], CAP, teams(), Usage(0.0, {}), now=0.0)
    assert started(result) == []
    assert result.waits["x"] == ("its queue 'nope' is not configured (queues: team-a, team-b); "
                                 "`orch queue set` defines it")


# ------------------------------------------------------------------------------------- backfill
def test_backfill_only_when_the_small_job_ends_before_the_big_one_could_start():
    # 4 CPUs: a running job holds 3 and ends in 100 s (50 steps left x 2 s); the big job needs 4
    running = job("r", S.RUNNING, workers=3, steps=100, step=50, step_time=2.0)
    big = job("big", workers=4, seq=10)
    assert shadow_time(big, [running], {"CPU": 1.0}, now=0.0) == pytest.approx(100.0)
    quick = job("quick", workers=1, steps=10, step_time=5.0, seq=11)  # 50 s: ends before 100 s
    slow = job("slow", workers=1, steps=100, step_time=5.0, seq=12)  # 500 s: would delay big
    result = admit([running, big, quick, slow], {"CPU": 4.0}, now=0.0)
    assert started(result) == ["quick"]
    assert result.decisions[0].reason == "backfilled: ends in 50 s, before big can start (in 100 s)"
    assert result.waits["big"] == "needs 4 workers, 1 free; room expected in 100 s"
    assert result.waits["slow"] == ("behind big (priority 0), needs 1 worker, 0 free")
    alone = admit([running, big, slow], {"CPU": 4.0}, now=0.0)
    assert started(alone) == []
    assert alone.waits["slow"] == "behind big (priority 0), needs 1 worker, 1 free: it would run 500 s, past the " \
                                  "time big can start"


def test_no_overtaking_when_an_end_is_unknown():
    running = job("r", S.RUNNING, workers=3)  # no step time: its end is unknown
    big, small = job("big", workers=4, seq=1), job("small", workers=1, steps=1, step_time=1.0, seq=2)
    result = admit([running, big, small], {"CPU": 4.0}, now=0.0)
    assert started(result) == []
    assert "past the time big can start" in result.waits["small"]
    unknown = job("unknown", workers=1, seq=3)
    result = admit([job("r2", S.RUNNING, workers=3, steps=10, step=0, step_time=1.0), big, unknown], {"CPU": 4.0})
    assert result.waits["unknown"].endswith("its end is unknown (no step time yet), so it may not overtake")


def test_expected_run_prefers_the_measured_step_time():
    assert expected_run_s(job("m", step=40, steps=100, step_time=0.5)) == pytest.approx(30.0)
    assert expected_run_s(job("c", steps=100, step_time=2.0)) == pytest.approx(200.0)
    assert expected_run_s(job("n")) is None


def test_the_single_unlimited_queue_is_the_old_order():
    jobs = [job("low", priority=0, seq=1), job("high", priority=5, workers=8, seq=2), job("mid", priority=1, seq=3)]
    result = admit(jobs, {"CPU": 8.0}, UNLIMITED)
    assert started(result) == ["high"]
    assert result.waits == {"mid": "needs 1 worker, 0 free", "low": "behind mid (priority 1), needs 1 worker, 0 free"}
    assert result.blocker == "mid"


def test_the_controllers_pass_without_explanations_decides_the_same():
    import random

    rng = random.Random(4)
    cfg = teams(a=Resources(workers=6), b=Resources(workers=4), borrow=Resources(workers=2))
    for trial in range(200):
        jobs = [job(f"r{i}", S.RUNNING, queue=rng.choice(["team-a", "team-b"]), workers=rng.randint(1, 3),
                    steps=100, step=rng.randint(0, 99), step_time=1.0)
                for i in range(rng.randint(0, 3))]
        jobs += [job(f"q{i}", queue=rng.choice(["team-a", "team-b"]), workers=rng.randint(1, 6),
                     priority=rng.choice([0, 0, 5]), steps=rng.randint(1, 200),
                     step_time=rng.choice([None, 0.5, 2.0])) for i in range(rng.randint(1, 12))]
        usage = Usage(0.0, {"team-a": rng.uniform(0, 1e4), "team-b": rng.uniform(0, 1e4)})
        full = admit(jobs, {"CPU": 12.0}, cfg, usage, now=0.0)
        quick = admit(jobs, {"CPU": 12.0}, cfg, usage, now=0.0, explain=False)
        assert quick.decisions == full.decisions and quick.blocker == full.blocker, trial
