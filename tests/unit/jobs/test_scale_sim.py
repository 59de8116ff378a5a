"""The scale simulator's core (bench/scale_sim.py) on a small cluster: the real policies drive it to
the end with its checks holding, its checks catch a policy that over-commits or lets a job overtake,
and the goodput model matches Young/Daly's first-order expectation. Pure logic, no Ray."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from orchestrator.config.schema import QueuesConfig
from orchestrator.jobs.policy import Decision, admission_decisions
from orchestrator.jobs.state import JobState

_PATH = Path(__file__).resolve().parents[3] / "bench" / "scale_sim.py"
_spec = importlib.util.spec_from_file_location("scale_sim", _PATH)
sim = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("scale_sim", sim)
_spec.loader.exec_module(sim)

S = JobState


def _run(admit=admission_decisions, nodes: int = 4, jobs: int = 120, seed: int = 3):
    q = sim.QueueSim(sim.Cluster(nodes), sim.make_jobs(jobs, seed, max_workers=nodes * 8), 60.0, admit)
    return q, q.run()


def test_real_policies_drain_the_queue_with_every_check_holding():
    q, stats = _run()
    assert sum(stats.states.values()) == 120 - stats.refused
    assert stats.states.get("SUCCEEDED", 0) > 100
    assert stats.states.get("FAILED", 0) >= 1 and stats.states.get("BLOCKED", 0) >= 1  # dependents of failures
    assert stats.decisions >= 3 * stats.states["SUCCEEDED"]  # queued, started, running, succeeded
    assert all(g == 8 for g in q.cluster.free_gpu)  # every placement released


def test_checks_catch_a_policy_that_over_commits():
    def everything(jobs, capacity):
        return [Decision(j.id, S.STARTING, "all") for j in jobs if j.state is S.QUEUED]

    with pytest.raises(AssertionError):
        _run(everything)


def test_checks_catch_a_policy_that_lets_a_small_job_overtake():
    def smallest_first(jobs, capacity):
        bigger_first = sorted((j for j in jobs if j.state is S.QUEUED), key=lambda j: (j.workers, j.seq))
        return admission_decisions([j for j in jobs if j.state is not S.QUEUED] + bigger_first[:1], capacity)

    with pytest.raises(AssertionError, match="order|left waiting"):
        _run(smallest_first)


def test_goodput_without_failures_is_the_checkpoint_cost_only():
    g = sim.goodput_trial(0, horizon_s=86400.0, mtbf_s=1e12, step_s=6.0, blocking_s=0.674, upload_s=11.0,
                          restart_s=26.0, mtbf_hours_cfg=3.0)
    assert g.failures == 0 and g.restart_s == 0
    tau = sim.young_daly_s(0.674, 3 * 3600)
    assert g.interval_s == pytest.approx(tau)
    assert g.ratio == pytest.approx(1 - 0.674 / (tau + 0.674), abs=0.002)


def test_goodput_under_failures_matches_the_first_order_model():
    kw = dict(horizon_s=4 * 86400.0, mtbf_s=3 * 3600.0, step_s=6.0, blocking_s=0.674, upload_s=11.0, restart_s=300.0)
    g = sim.goodput_mc(3, **kw, mtbf_hours_cfg=3.0)
    assert g.failures > 10
    expected = sim.analytic(3 * 3600.0, 0.674, 11.0, 300.0, sim.young_daly_s(0.674, 3 * 3600.0))
    assert g.ratio == pytest.approx(expected, abs=0.01)
    assert g.restart_s > g.blocking_s  # a 5-minute restart costs more than the saves


# ------------------------------------------------------------------------------------- sharing
_SPATH = Path(__file__).resolve().parents[3] / "bench" / "sharing_sim.py"
_sspec = importlib.util.spec_from_file_location("sharing_sim", _SPATH)
share = importlib.util.module_from_spec(_sspec)
sys.modules.setdefault("sharing_sim", share)
_sspec.loader.exec_module(share)


def _share_run(policy=None, order=None, nodes: int = 20, jobs: int = 300):
    from orchestrator.jobs.preemption import least_loss
    from orchestrator.jobs.sharing import admit

    s = share.SharingSim(sim.Cluster(nodes), share.make_sharing_jobs(jobs, 1), share.sharing_queues(nodes * 8),
                         order or least_loss, seed=1, policy=policy or admit)
    return s, s.run()


def test_the_sharing_simulation_drains_its_bursts_within_every_quota():
    s, stats = _share_run()
    assert all(r.state is S.SUCCEEDED for r in s.records.values()) and len(s.records) + len(stats.refused) == 300
    assert stats.preemptions >= 1 and stats.decisions > 3 * len(s.records)
    limits = {q: spec.quota.workers + spec.borrow.workers for q, spec in s.queues.teams.items()}
    assert all(stats.peak[q] <= limits[q] for q in limits)
    assert sum(len(w) for w in stats.waits.values()) == len(s.records)


def test_the_sharing_checks_catch_a_policy_that_ignores_quotas():
    from orchestrator.jobs.sharing import UNLIMITED, admit

    def no_quota(jobs, capacity, queues, usage, now, explain=True):
        return admit(jobs, capacity, QueuesConfig(teams={q: UNLIMITED.teams["default"] for q in queues.teams}),
                     usage, now)

    with pytest.raises(AssertionError, match="over its limit"):
        _share_run(policy=no_quota)
