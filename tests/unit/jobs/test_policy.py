"""Unit tests of the scheduling policies (orchestrator/jobs/policy.py) and the job state machine
(orchestrator/jobs/state.py), on hand-built records: no Ray, no files, no clock."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.jobs.policy import (
    Decision,
    admission_decisions,
    dependency_decisions,
    job_demand,
    never_fits,
    restart_decision,
    scale_refusal,
)
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import TERMINAL, IllegalTransition, JobState, check_transition

S = JobState
_seq = itertools.count(1)


def job(
    id: str,
    state: JobState = S.QUEUED,
    *,
    workers: int = 1,
    cpus: float = 1,
    gpus: float = 0,
    priority: int = 0,
    depends_on: list[str] | None = None,
    seq: int | None = None,
) -> JobRecord:
    return JobRecord(
        id=id,
        pipeline_id="p1",
        name=id,
        kind="pretrain",
        state=state,
        priority=priority,
        depends_on=list(depends_on or []),
        config={"workers": workers, "cluster": {"cpus_per_worker": cpus, "gpus_per_worker": gpus}},
        created_at=0.0,
        seq=next(_seq) if seq is None else seq,
    )


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.job_id: d for d in decisions}


def started(decisions: list[Decision]) -> list[str]:
    assert all(d.state is S.STARTING for d in decisions)
    return [d.job_id for d in decisions]


# ------------------------------------------------------------------------------ dependencies
def test_pending_job_without_dependencies_is_queued():
    (d,) = dependency_decisions([job("a", S.PENDING)])
    assert (d.job_id, d.state) == ("a", S.QUEUED)


def test_pending_job_is_queued_when_all_dependencies_succeeded():
    jobs = [job("a", S.SUCCEEDED), job("b", S.SUCCEEDED), job("c", S.PENDING, depends_on=["a", "b"])]
    decisions = by_id(dependency_decisions(jobs))
    assert set(decisions) == {"c"}
    assert decisions["c"].state is S.QUEUED


@pytest.mark.parametrize("dep_state", [S.FAILED, S.CANCELLED, S.BLOCKED])
def test_failed_cancelled_or_blocked_dependency_blocks(dep_state):
    jobs = [job("ok", S.SUCCEEDED), job("bad", dep_state), job("c", S.PENDING, depends_on=["ok", "bad"])]
    (d,) = dependency_decisions(jobs)
    assert (d.job_id, d.state) == ("c", S.BLOCKED)
    assert "bad" in d.reason and dep_state.value in d.reason


@pytest.mark.parametrize("dep_state", [S.PENDING, S.QUEUED, S.STARTING, S.RUNNING, S.RESTARTING])
def test_no_decision_while_a_dependency_is_unfinished(dep_state):
    jobs = [job("a", S.SUCCEEDED), job("b", dep_state), job("c", S.PENDING, depends_on=["a", "b"])]
    assert "c" not in by_id(dependency_decisions(jobs))


def test_missing_dependency_blocks_and_names_it():
    (d,) = dependency_decisions([job("c", S.PENDING, depends_on=["ghost"])])
    assert d.state is S.BLOCKED
    assert "ghost" in d.reason


def test_failure_blocks_even_if_another_dependency_is_still_running():
    jobs = [job("a", S.RUNNING), job("b", S.FAILED), job("c", S.PENDING, depends_on=["a", "b"])]
    (d,) = dependency_decisions(jobs)
    assert d.state is S.BLOCKED and "b" in d.reason


@pytest.mark.parametrize("state", [s for s in S if s is not S.PENDING])
def test_only_pending_jobs_get_dependency_decisions(state):
    assert dependency_decisions([job("a", S.SUCCEEDED), job("c", state, depends_on=["a"])]) == []


def test_blocking_propagates_one_level_per_call():
    """A chain a -> b -> c: when a fails, b is blocked; c follows once b's BLOCKED is recorded."""
    a, b, c = job("a", S.FAILED), job("b", S.PENDING, depends_on=["a"]), job("c", S.PENDING, depends_on=["b"])
    decisions = by_id(dependency_decisions([a, b, c]))
    assert set(decisions) == {"b"} and decisions["b"].state is S.BLOCKED
    b.state = S.BLOCKED
    decisions = by_id(dependency_decisions([a, b, c]))
    assert decisions["c"].state is S.BLOCKED and "b" in decisions["c"].reason


# ------------------------------------------------------------------------------ demand
def test_job_demand_is_per_worker_times_workers():
    assert job_demand(job("a", workers=4, cpus=2, gpus=1)) == {"CPU": 8.0, "GPU": 4.0}
    assert job_demand(job("a", workers=3, cpus=1.5)) == {"CPU": 4.5}  # no GPU key on CPU jobs


# ------------------------------------------------------------------------------ admission
def test_gang_job_starts_only_if_all_workers_fit():
    assert admission_decisions([job("a", workers=4)], {"CPU": 3}) == []
    assert started(admission_decisions([job("a", workers=4)], {"CPU": 4})) == ["a"]


def test_gpu_job_needs_gpus_in_the_capacity():
    assert admission_decisions([job("a", workers=2, gpus=1)], {"CPU": 64}) == []
    assert admission_decisions([job("a", workers=2, gpus=1)], {"CPU": 64, "GPU": 1}) == []
    assert started(admission_decisions([job("a", workers=2, gpus=1)], {"CPU": 64, "GPU": 2})) == ["a"]


def test_higher_priority_starts_first():
    jobs = [job("low", priority=0), job("high", priority=5)]
    assert started(admission_decisions(jobs, {"CPU": 1})) == ["high"]


def test_fifo_by_seq_among_equal_priority():
    # Listed out of submission order: seq decides, not list position.
    jobs = [job("second", seq=20), job("first", seq=10), job("third", seq=30)]
    assert started(admission_decisions(jobs, {"CPU": 2})) == ["first", "second"]


def test_active_jobs_resources_are_subtracted():
    for active in (S.STARTING, S.RUNNING, S.RESTARTING):
        jobs = [job("busy", active, workers=3), job("next", workers=2)]
        assert admission_decisions(jobs, {"CPU": 4}) == [], f"{active} job's CPUs were not counted"
        assert started(admission_decisions(jobs, {"CPU": 5})) == ["next"]


@pytest.mark.parametrize("state", [S.PENDING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.BLOCKED])
def test_inactive_jobs_hold_no_resources_and_are_not_admitted(state):
    jobs = [job("other", state, workers=4), job("next", workers=4)]
    assert started(admission_decisions(jobs, {"CPU": 4})) == ["next"]


def test_big_high_priority_job_is_not_overtaken():
    jobs = [job("busy", S.RUNNING, workers=2), job("big", workers=4, priority=10), job("small", workers=1)]
    # "small" would fit in the 2 free CPUs, but starting it would delay "big" further.
    assert admission_decisions(jobs, {"CPU": 4}) == []


def test_earlier_job_that_does_not_fit_is_not_overtaken_at_equal_priority():
    jobs = [job("busy", S.RUNNING, workers=2), job("big", workers=4, seq=1), job("small", workers=1, seq=2)]
    assert admission_decisions(jobs, {"CPU": 4}) == []


def test_two_jobs_that_fit_together_both_start():
    jobs = [job("a", workers=2, gpus=1), job("b", workers=2, gpus=1)]
    assert started(admission_decisions(jobs, {"CPU": 4, "GPU": 4})) == ["a", "b"]
    # ... and only one when just one fits.
    assert started(admission_decisions(jobs, {"CPU": 4, "GPU": 3})) == ["a"]


def test_admission_does_not_mutate_capacity():
    capacity = {"CPU": 4.0}
    admission_decisions([job("a", S.RUNNING, workers=2), job("b", workers=2)], capacity)
    assert capacity == {"CPU": 4.0}


# ------------------------------------------------------------------------------ never fits
def test_never_fits_names_the_numbers_and_the_setting():
    msg = never_fits(job("pretrain", workers=8, gpus=1), {"CPU": 64, "GPU": 4})
    assert msg is not None
    assert "8 GPU" in msg and "8 workers" in msg and "has 4" in msg
    assert "pipeline.jobs.pretrain.workers" in msg
    assert "\n" not in msg


def test_never_fits_on_missing_resource_kind():
    msg = never_fits(job("j", workers=2, gpus=1), {"CPU": 64})
    assert msg is not None and "2 GPU" in msg and "has 0" in msg


def test_job_that_fits_an_empty_cluster_gets_none():
    assert never_fits(job("j", workers=4, cpus=2), {"CPU": 8}) is None
    # never_fits ignores what other jobs use: only the whole cluster matters.
    assert never_fits(job("j", workers=4, cpus=2), {"CPU": 7.5}) is not None


# ------------------------------------------------------------------------------ state machine
def test_terminal_states():
    assert TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.BLOCKED}
    assert all(s.terminal is (s in TERMINAL) for s in S)
    assert {s for s in S if s.active} == {S.STARTING, S.RUNNING, S.RESTARTING}


@pytest.mark.parametrize("current", sorted(TERMINAL, key=lambda s: s.value))
def test_a_terminal_state_is_left_only_by_a_retry(current):
    """Back to PENDING (`orch retry`, `orch run --resume`) from FAILED, CANCELLED or BLOCKED; a
    SUCCEEDED job never runs again."""
    for new in S:
        if current is not S.SUCCEEDED and new is S.PENDING:
            check_transition(current, new)
            continue
        with pytest.raises(IllegalTransition):
            check_transition(current, new)


LEGAL = [
    (S.PENDING, S.QUEUED),
    (S.PENDING, S.BLOCKED),
    (S.QUEUED, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.RUNNING, S.RESTARTING),
    (S.RESTARTING, S.RUNNING),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.STARTING, S.FAILED),
    (S.RESTARTING, S.FAILED),
] + [(s, S.CANCELLED) for s in S if not s.terminal]


@pytest.mark.parametrize("current,new", LEGAL, ids=lambda s: s.value)
def test_legal_transitions(current, new):
    check_transition(current, new)  # does not raise


ILLEGAL = [
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.STARTING),
    (S.PENDING, S.FAILED),  # (PENDING -> SUCCEEDED: a checkpoint trigger ending, legal)
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.BLOCKED),
    (S.RUNNING, S.QUEUED),
    (S.RUNNING, S.PENDING),
    (S.RUNNING, S.BLOCKED),
    (S.RESTARTING, S.STARTING),
] + [(s, s) for s in S]  # no self-transitions


@pytest.mark.parametrize("current,new", ILLEGAL, ids=lambda s: s.value)
def test_illegal_transitions_raise(current, new):
    with pytest.raises(IllegalTransition) as info:
        check_transition(current, new)
    assert current.value in str(info.value) and new.value in str(info.value)
    assert isinstance(info.value, ValueError)


def test_only_a_retry_leads_back_to_pending():
    for s in S:
        if s in (S.FAILED, S.CANCELLED, S.BLOCKED):
            continue
        with pytest.raises(IllegalTransition):
            check_transition(s, S.PENDING)


def test_blocked_only_from_pending():
    for s in S:
        if s is S.PENDING:
            check_transition(s, S.BLOCKED)
        else:
            with pytest.raises(IllegalTransition):
                check_transition(s, S.BLOCKED)


# ------------------------------------------------------------------------------ restarts
def _trained(id: str, state: JobState = S.RUNNING, *, workers: int = 2, restarts: int = 0, max_failures: int = 1,
             requested: dict | None = None, batch: int = 24, micro: int = 4) -> JobRecord:
    r = job(id, state, workers=workers)
    r.config.update(max_failures=max_failures, trainer={"global_batch_size": batch, "micro_batch_size": micro})
    r.restarts, r.requested = restarts, requested
    return r


def test_lost_worker_group_restarts_while_failures_are_left():
    d = restart_decision(_trained("a", restarts=0, max_failures=1), "node died")
    assert d.state is S.RESTARTING and "node died" in d.reason


def test_lost_worker_group_fails_once_max_failures_is_spent():
    d = restart_decision(_trained("a", restarts=1, max_failures=1), "node died")
    assert d.state is S.FAILED and "max_failures=1 reached" in d.reason


def test_lost_controller_is_not_a_failure_of_the_job():
    d = restart_decision(_trained("a", restarts=3, max_failures=1), "controller restarted", failure=False)
    assert d.state is S.RESTARTING


def test_pending_cancel_ends_a_lost_job_cancelled():
    d = restart_decision(_trained("a", requested={"action": "cancel"}), "node died")
    assert d.state is S.CANCELLED


# ------------------------------------------------------------------------------ scaling
def test_scale_within_free_capacity_is_allowed():
    a = _trained("a", workers=2)
    assert scale_refusal(a, 3, [a], {"CPU": 4}) is None


def test_scale_counts_the_other_active_jobs():
    a, b = _trained("a", workers=2), job("b", S.RUNNING, workers=2)
    why = scale_refusal(a, 3, [a, b], {"CPU": 4})
    assert why == "3 workers of a need 3 CPU; the cluster has 2 CPU for it; choose fewer workers or add nodes"
    assert scale_refusal(a, 1, [a, b], {"CPU": 4}) is None


@pytest.mark.parametrize("state", [S.QUEUED, S.STARTING, S.RESTARTING, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_only_running_jobs_scale(state):
    why = scale_refusal(_trained("a", state), 3, [], {"CPU": 8})
    assert why == f"job a is {state.value}; only a RUNNING job can be scaled"


def test_scale_keeps_the_global_batch_whole():
    why = scale_refusal(_trained("a", batch=24, micro=4), 4, [], {"CPU": 8})
    assert "does not split over 4 workers x micro batch 4" in why
    assert scale_refusal(_trained("a"), 0, [], {"CPU": 8}) == "--workers must be at least 1, got 0"
    assert scale_refusal(_trained("a"), 2, [], {"CPU": 8}) == "job a already runs on 2 workers"


# ------------------------------------------------------------------------------ elastic jobs
def elastic(id: str, state: JobState = S.QUEUED, *, lo: int, hi: int, **kw) -> JobRecord:
    r = job(id, state, workers=lo, **kw)
    r.config["max_workers"] = hi
    return r


def test_elastic_job_is_charged_its_maximum_once_admitted():
    e = elastic("e", S.RUNNING, lo=2, hi=4)
    assert started(admission_decisions([e, job("x", workers=2)], {"CPU": 6})) == ["x"]
    assert admission_decisions([e, job("x", workers=3)], {"CPU": 6}) == []


def test_elastic_job_starts_on_its_minimum_when_the_others_hold_their_workers():
    assert started(admission_decisions([job("b", S.RUNNING, workers=4), elastic("e", lo=2, hi=4)], {"CPU": 6})) == ["e"]


def test_elastic_job_waits_while_an_admitted_gang_is_still_being_placed():
    assert admission_decisions([job("b", S.STARTING, workers=4), elastic("e", lo=2, hi=4)], {"CPU": 6}) == []
    # admitted in the same pass as a gang: it waits for the next pass
    assert started(admission_decisions([job("b", workers=4), elastic("e", lo=2, hi=4)], {"CPU": 6})) == ["b"]
    # room for its maximum: no race, it starts at once
    assert started(admission_decisions([job("b", workers=2), elastic("e", lo=2, hi=4)], {"CPU": 6})) == ["b", "e"]


def test_elastic_jobs_are_not_scaled_by_hand():
    e = elastic("e", S.RUNNING, lo=2, hi=4)
    e.config["trainer"] = {"global_batch_size": 24, "micro_batch_size": 1}
    assert "is elastic (2-4 workers)" in scale_refusal(e, 3, [e], {"CPU": 8})
