"""The controller with queues, stepped by hand with the fake launcher of test_lifecycle: a queue's
config changed on a running controller takes effect at the next decision; an unknown queue is
refused at submit; a high-priority job preempts the running job that loses the least, which
commits, shows PREEMPTED, waits at its place (its dependent too) and resumes from its commit; a
victim that misses the deadline is stopped anyway; a controller restart mid-preemption neither
runs a job twice nor loses one."""

from __future__ import annotations

import time

import pytest

from orchestrator.config.schema import QueuesConfig, QueueSpec, Resources
from orchestrator.config.typed import to_dict
from orchestrator.errors import ClusterError, ConfigError
from orchestrator.jobs.controller import Controller
from orchestrator.jobs.events import AttemptReason, EventKind
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from tests.unit.jobs.test_lifecycle import FakeLauncher, record

S, K, R = JobState, EventKind, AttemptReason


def queues(quota_a: float | None = None, min_runtime_s: float = 0.0, deadline_s: float = 60.0) -> QueuesConfig:
    return QueuesConfig(teams={"team-a": QueueSpec(quota=Resources(workers=quota_a), borrow=Resources(workers=0)),
                               "team-b": QueueSpec()},
                        min_runtime_s=min_runtime_s, preempt_deadline_s=deadline_s)


@pytest.fixture
def env(tmp_path):
    class Env:
        store = JobStore(tmp_path)
        launcher = FakeLauncher()
        lines: list[str] = []
        now = [time.time() + 5]  # (the store stamps the history with the wall clock)

        def controller(self, cfg: QueuesConfig | None = None) -> Controller:
            c = Controller(self.store, self.launcher, capacity=lambda: {"CPU": 4}, say=self.lines.append,
                           queues=cfg or queues(), clock=lambda: self.now[0])
            c.recover()
            return c

        def add(self, job_id: str, queue: str = "team-a", priority: int = 0, workers: int = 2, **kw):
            r = record(job_id, workers=workers, **kw)
            r.queue, r.priority = queue, priority
            self.store.add([r])

        def state(self, job_id: str) -> JobState:
            return self.store.get(job_id).state

    return Env()


def test_an_unknown_queue_is_refused_at_submit_in_one_line(env):
    c = env.controller()
    with pytest.raises(ConfigError, match=r"unknown queue 'team-z': this cluster's queues are team-a, team-b; "
                                          r"submit with --queue NAME"):
        c.submit([], queue="team-z")


def test_a_queue_config_changed_on_a_running_controller_takes_effect_at_the_next_decision(env):
    c = env.controller(queues(quota_a=2))
    env.add("a1")
    env.add("a2")
    c.step(["a1", "a2"])
    assert env.state("a1") is S.STARTING and env.state("a2") is S.QUEUED
    assert c.queue_report()["jobs"][0]["why"] == "team-a at its quota 2/2 workers and nothing to borrow"
    c.set_queues(to_dict(queues(quota_a=4)))  # `orch queue set`: no restart
    c.step(["a1", "a2"])
    assert env.state("a2") is S.STARTING
    with pytest.raises(ConfigError, match="weight"):
        c.set_queues({"teams": {"team-a": {"weight": -1}}})


def _running(env, c, job_id: str, step: int, committed: int) -> None:
    run = env.launcher.runners[job_id]
    run.attempt(R.FIRST).ready().step(step)
    run.emit(K.CHECKPOINT_COMMITTED, uri=f"file:///s/runs/{job_id}/checkpoints/step-{committed}", step=committed)
    c.step([job_id])
    assert env.state(job_id) is S.RUNNING


def test_a_high_priority_job_preempts_the_one_that_loses_least_which_resumes_at_its_place(env):
    c = env.controller()
    env.add("old")
    env.add("new", queue="team-b")
    env.add("tune", depends_on=["new"])
    c.step(["old", "new", "tune"])
    _running(env, c, "old", step=50, committed=10)  # 40 steps since its commit
    _running(env, c, "new", step=25, committed=20)  # 5: the one to stop
    env.add("urgent", priority=5)
    ids = ["old", "new", "tune", "urgent"]
    c.step(ids)
    victim = env.launcher.runners["new"]
    assert [r["action"] for r in victim.requests] == ["preempt"] and env.launcher.runners["old"].requests == []
    assert env.state("urgent") is S.QUEUED
    c.step(ids)  # the victim has not stopped yet: nobody else is asked
    assert len(victim.requests) == 1 and env.launcher.runners["old"].requests == []
    c = env.controller()  # a controller restart mid-preemption: the request is sent again, nothing relaunched
    assert victim.requests[-1]["action"] == "preempt" and len(env.launcher.starts) == 2
    victim.emit(K.STOPPED, checkpoint="file:///s/runs/new/checkpoints/step-25")
    c.step(ids)
    new = env.store.get("new")
    assert new.state is S.PREEMPTED and new.preemptions == 1 and new.checkpoint.endswith("step-25")
    assert victim.killed and env.state("urgent") is S.STARTING and env.state("tune") is S.PENDING
    assert "PREEMPTED" in [h["state"] for h in new.history]
    report = {j["id"]: j["why"] for j in c.queue_report()["jobs"]}
    assert report["new"].startswith("behind urgent") or report["new"].startswith("needs 2 workers")
    assert report["tune"] == "waits for its dependency new"
    urgent = env.launcher.runners["urgent"]
    urgent.attempt(R.FIRST).ready().emit(K.SUCCEEDED, export="file:///s/runs/urgent/export")
    c.step(ids)
    assert env.state("new") is S.STARTING  # at its place: before any job submitted after it
    assert env.launcher.runners["new"].reason is R.RESUME  # continues from its committed step-25
    assert [r.job_id for r in env.launcher.starts].count("new") == 2


def test_a_victim_that_misses_the_deadline_is_stopped_anyway_and_the_minimum_runtime_holds(env):
    c = env.controller(queues(min_runtime_s=0.0, deadline_s=60.0))
    env.add("low", workers=4)
    c.step(["low"])
    _running(env, c, "low", step=30, committed=20)
    env.add("high", priority=5, workers=4)
    c.step(["low", "high"])
    run = env.launcher.runners["low"]
    assert run.requests[-1]["action"] == "preempt"
    env.now[0] += 30
    c.step(["low", "high"])
    assert env.state("low") is S.RUNNING  # still within its deadline
    env.now[0] += 31
    c.step(["low", "high"])
    low = env.store.get("low")
    assert low.state is S.PREEMPTED and run.killed and low.preemptions == 1
    assert low.checkpoint.endswith("step-20")  # its previous commit: where it resumes
    assert "no checkpoint within 60 s" in low.history[-1]["reason"]
    assert env.state("high") is S.STARTING


def test_no_preemption_of_a_job_younger_than_the_minimum_runtime(env):
    c = env.controller(queues(min_runtime_s=3600.0))
    env.add("low", workers=4)
    c.step(["low"])
    _running(env, c, "low", step=30, committed=20)
    env.add("high", priority=5, workers=4)
    c.step(["low", "high"])
    assert env.launcher.runners["low"].requests == [] and env.state("high") is S.QUEUED


def test_a_job_larger_than_its_queues_limit_is_refused_at_submit(env):
    from orchestrator.jobs.sharing import never_fits_queue

    c = env.controller(queues(quota_a=2))
    big = record("big", workers=3)
    big.queue = "team-a"
    assert never_fits_queue(big, c.queues().teams["team-a"]) == (
        "job big needs 3 workers but queue team-a may hold at most 2 (quota 2 + borrowing 0); lower its workers, or "
        "submit to another --queue")
    assert never_fits_queue(big, c.queues().teams["team-b"]) is None  # no quota there


def test_a_job_being_preempted_is_not_scaled(env):
    c = env.controller()
    env.add("low", workers=4)
    c.step(["low"])
    _running(env, c, "low", step=30, committed=20)
    env.add("high", priority=5, workers=4)
    c.step(["low", "high"])
    with pytest.raises(ClusterError, match="job low has a preempt in progress; scale it once that has taken effect"):
        c.scale("low", 2)
