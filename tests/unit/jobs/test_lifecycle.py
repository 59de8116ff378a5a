"""The controller without Ray: a fake launcher whose runners emit scripted events, and
`Controller.step` stepped by hand (in the style of Ray Train V2's controller tests). A "controller
restart" is a new `Controller` on the same SQLite job store, re-attaching to the same runners."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.jobs.controller import Controller
from orchestrator.jobs.events import AttemptReason, EventKind, RunnerEvent, RunnerPoll, RunnerStatus
from orchestrator.jobs.lifecycle import apply_events
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore

S, K, R = JobState, EventKind, AttemptReason


class FakeRunner:
    def __init__(self, job_id: str, init_from: str | None, reason: AttemptReason):
        self.job_id, self.init_from, self.reason = job_id, init_from, reason
        self.events: list[RunnerEvent] = []
        self.requests: list[dict] = []  # every request_stop call, re-sent ones included
        self.dead = self.killed = False

    def emit(self, kind: EventKind, **data) -> "FakeRunner":
        self.events.append(RunnerEvent(len(self.events) + 1, kind, data))
        return self

    def attempt(self, reason: AttemptReason, world_size: int = 2) -> "FakeRunner":
        n = sum(e.kind is K.ATTEMPT_STARTED for e in self.events) + 1
        return self.emit(K.ATTEMPT_STARTED, attempt=n, reason=reason.value, world_size=world_size)

    def ready(self, resumed_from: str | None = None) -> "FakeRunner":
        return self.emit(K.ENGINE_READY, resumed_from=resumed_from)

    def step(self, step: int, loss: float = 1.0) -> "FakeRunner":
        return self.emit(K.PROGRESS, metrics={"step": step, "loss": loss})


class FakeLauncher:
    """Runners outlive a controller (like the detached runner actors); `starts` lists each launch."""

    def __init__(self):
        self.runners: dict[str, FakeRunner] = {}
        self.starts: list[FakeRunner] = []

    def start(self, record, init_from, reason):
        runner = FakeRunner(record.id, init_from, reason)
        self.runners[record.id] = runner
        self.starts.append(runner)
        return runner

    def attach(self, record):
        runner = self.runners.get(record.id)
        return runner if runner is not None and not runner.dead and not runner.killed else None

    def poll(self, runner, after_seq):
        if runner.dead:
            return RunnerPoll(RunnerStatus.LOST, reason="the job's runner died (node lost)")
        return RunnerPoll(RunnerStatus.ALIVE, tuple(runner.events[after_seq:]))

    def wait(self, polls, timeout):
        pass  # (the fake runners' events are all there already)

    def request_stop(self, runner, request):
        runner.requests.append(request)

    def kill(self, runner):
        runner.killed = True


_seq = itertools.count(1)


def record(job_id: str, *, workers: int = 2, max_failures: int = 3, depends_on=(), max_workers=None,
           init_from=None) -> JobRecord:
    config = {"workers": workers, "max_workers": max_workers, "max_failures": max_failures, "init_from": init_from,
              "cluster": {"cpus_per_worker": 1, "gpus_per_worker": 0},
              "trainer": {"max_steps": 100, "global_batch_size": 12, "micro_batch_size": 1}}
    return JobRecord(id=job_id, pipeline_id="p", name=job_id, kind="pretrain", state=S.PENDING, priority=0,
                     depends_on=list(depends_on), config=config, created_at=0.0)


@pytest.fixture
def env(tmp_path):
    class Env:
        store = JobStore(tmp_path)
        launcher = FakeLauncher()
        lines: list[str] = []

        def controller(self) -> Controller:
            """A (new) controller on the same store and runners, recovered as after a restart."""
            c = Controller(self.store, self.launcher, capacity=lambda: {"CPU": 8}, say=self.lines.append)
            c.recover()
            return c

        def states(self, job_id: str) -> list[str]:
            return [h["state"] for h in self.store.get(job_id).history]

    return Env()


def started(env, job_id="a", workers=2, **kw) -> tuple[Controller, FakeRunner]:
    """A job submitted and stepped until its runner is launched (STARTING)."""
    env.store.add([record(job_id, workers=workers, **kw)])
    c = env.controller()
    c.step([job_id])
    assert env.store.get(job_id).state is S.STARTING
    return c, env.launcher.runners[job_id]


def test_failure_then_restart_then_success_releases_the_dependent(env):
    env.store.add([record("a"), record("b", depends_on=["a"])])
    c = env.controller()
    c.step(["a", "b"])
    run = env.launcher.runners["a"]
    assert run.reason is R.FIRST and env.store.get("b").state is S.PENDING
    run.attempt(R.FIRST).ready().step(10).emit(K.CHECKPOINT_COMMITTED, uri="s3://x/step-10", step=10)
    c.step(["a", "b"])
    assert env.store.get("a").state is S.RUNNING and env.store.get("a").checkpoint == "s3://x/step-10"
    run.attempt(R.FAILURE)
    c.step(["a", "b"])
    a = env.store.get("a")
    assert a.state is S.RESTARTING and a.restarts == 1
    run.ready(resumed_from="s3://x/step-10").step(100)
    run.emit(K.SUCCEEDED, export="s3://x/export", checkpoint="s3://x/step-100", metrics={"step": 100, "loss": 0.5})
    c.step(["a", "b"])
    a = env.store.get("a")
    assert a.state is S.SUCCEEDED and a.restarts == 1 and a.export == "s3://x/export"
    assert a.metrics["step"] == 100 and run.killed
    assert env.states("a") == ["PENDING", "QUEUED", "STARTING", "RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    assert "a: RUNNING again, resumed from s3://x/step-10" in env.lines
    # b is released and starts from a's export in the pass that saw a succeed, not a pass later
    assert env.store.get("b").state is S.STARTING
    assert env.launcher.runners["b"].init_from == "s3://x/export"


def test_failure_budget_exhausted_fails_the_job_and_blocks_its_dependent(env):
    env.store.add([record("a", max_failures=1), record("b", depends_on=["a"])])
    c = env.controller()
    c.step(["a", "b"])
    run = env.launcher.runners["a"]
    run.attempt(R.FIRST).ready().attempt(R.FAILURE).ready()
    run.emit(K.FAILED, reason="rank 1: RuntimeError: boom", retryable=True, traceback="Traceback ...")
    c.step(["a", "b"])
    c.step(["a", "b"])
    a = env.store.get("a")
    assert a.state is S.FAILED and a.restarts == 1 and a.failure_reason == "rank 1: RuntimeError: boom"
    assert a.failure_detail == "Traceback ..."
    assert env.store.get("b").state is S.BLOCKED


def test_lost_runner_after_the_budget_is_spent_fails(env):
    c, run = started(env, max_failures=0)
    run.attempt(R.FIRST).ready()
    c.step(["a"])
    run.dead = True
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.FAILED and "max_failures=0" in env.store.get("a").history[-1]["reason"]
    assert len(env.launcher.starts) == 1


SCRIPT = [  # (event kind, data) a runner emits over a job's life
    (K.LOG, {"line": "dataset ready"}),
    (K.ATTEMPT_STARTED, {"attempt": 1, "reason": "first", "world_size": 2}),
    (K.ENGINE_READY, {}),
    (K.PROGRESS, {"metrics": {"step": 10, "loss": 2.0}}),
    (K.CHECKPOINT_COMMITTED, {"uri": "s3://x/step-10", "step": 10}),
    (K.ATTEMPT_STARTED, {"attempt": 2, "reason": "failure", "world_size": 2}),
    (K.ENGINE_READY, {"resumed_from": "s3://x/step-10"}),
    (K.PROGRESS, {"metrics": {"step": 20, "loss": 1.5}}),
    (K.ATTEMPT_STARTED, {"attempt": 3, "reason": "failure", "world_size": 2}),
    (K.ATTEMPT_STARTED, {"attempt": 4, "reason": "failure", "world_size": 2}),
    (K.ENGINE_READY, {"resumed_from": "s3://x/step-10"}),
    (K.SUCCEEDED, {"export": "s3://x/export", "metrics": {"step": 100}}),
]


def _final(env, job_id="a") -> tuple:
    r = env.store.get(job_id)
    return r.state, r.restarts, env.states(job_id), r.checkpoint, r.export, r.metrics


@pytest.mark.parametrize("cut", range(len(SCRIPT) + 1))
def test_controller_restart_between_any_two_events_applies_each_once(env, cut):
    """The controller dies after applying `cut` events; a new one applies the rest exactly once:
    the record ends exactly as with one controller throughout."""
    c, run = started(env)
    for kind, data in SCRIPT[:cut]:
        run.emit(kind, **data)
    c.step(["a"])
    c = env.controller()  # the old one is gone; the new one re-attaches to the same runner
    assert ("a: re-attached to its running worker group" in env.lines) == (cut < len(SCRIPT))
    for kind, data in SCRIPT[cut:]:
        run.emit(kind, **data)
    c.step(["a"])
    state, restarts, states, checkpoint, export, _ = _final(env)
    assert (state, restarts, checkpoint, export) == (S.SUCCEEDED, 3, "s3://x/step-10", "s3://x/export")
    assert states == ["PENDING", "QUEUED", "STARTING", "RUNNING", "RESTARTING", "RUNNING", "RESTARTING", "RUNNING",
                      "SUCCEEDED"]
    assert env.lines.count("a: dataset ready") == 1
    assert len(env.launcher.starts) == 1


def test_restart_before_a_controller_crash_is_not_counted_again(env):
    """Defect 1 of the old controller: it added the runner's lifetime failures to the persisted
    count after a restart, so one failure became two and a false RESTARTING."""
    c, run = started(env)
    run.attempt(R.FIRST).ready().attempt(R.FAILURE).ready()
    c.step(["a"])
    assert env.store.get("a").restarts == 1 and env.store.get("a").state is S.RUNNING
    c = env.controller()
    run.step(30)
    c.step(["a"])
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RUNNING and a.restarts == 1
    assert env.states("a").count("RESTARTING") == 1


def test_scale_after_a_controller_restart_waits_for_the_new_group(env):
    """Defect 2 of the old controller: with no progress seen since its restart it marked a scaled
    job RUNNING while the old worker group still trained."""
    c, run = started(env)
    run.attempt(R.FIRST).ready()
    c.step(["a"])
    c.scale("a", 3)  # an earlier scale: 2 -> 3
    run.attempt(R.SCALE, world_size=3).ready()
    c.step(["a"])
    assert env.store.get("a").state is S.RUNNING and env.store.get("a").workers == 3
    c = env.controller()  # the controller restarts; then the user scales again
    c.scale("a", 4)
    assert env.store.get("a").requested["action"] == "scale"
    run.step(50)  # the old group is still training
    c.step(["a"])
    assert env.store.get("a").state is S.RESTARTING
    run.attempt(R.SCALE, world_size=4).ready(resumed_from="s3://x/step-50")
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RUNNING and a.workers == 4 and a.requested is None and a.restarts == 0


def test_scale_request_is_resent_after_a_controller_restart(env):
    c, run = started(env)
    run.attempt(R.FIRST).ready()
    c.step(["a"])
    c.scale("a", 3)
    c = env.controller()  # dies before the runner acted: the new one sends the same request again
    assert [r["id"] for r in run.requests] == [run.requests[0]["id"]] * 2
    run.step(20).attempt(R.SCALE, world_size=3).ready()
    c.step(["a"])
    assert env.store.get("a").state is S.RUNNING and env.store.get("a").restarts == 0


def test_a_failure_during_a_scale_does_not_end_it_early(env):
    c, run = started(env)
    run.attempt(R.FIRST).ready()
    c.step(["a"])
    c.scale("a", 3)
    run.attempt(R.FAILURE).ready()  # the old group failed and Ray Train restarted it
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RESTARTING and a.restarts == 1
    run.attempt(R.SCALE, world_size=3).ready()
    c.step(["a"])
    assert env.store.get("a").state is S.RUNNING and env.store.get("a").requested is None


def test_elastic_resize_is_not_a_failure(env):
    c, run = started(env, workers=2, max_workers=4)
    run.attempt(R.FIRST, world_size=2).ready()
    c.step(["a"])
    run.attempt(R.RESIZE, world_size=4).ready(resumed_from="s3://x/step-5")
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RUNNING and a.restarts == 0 and a.metrics["world_size"] == 4
    assert "RESTARTING" not in env.states("a")
    assert any("resized by Ray Train from 2 to 4 workers" in line for line in env.lines)


def test_lost_runner_keeps_its_last_checkpoint_and_is_relaunched(env):
    c, run = started(env)
    run.attempt(R.FIRST).ready().emit(K.CHECKPOINT_COMMITTED, uri="s3://x/step-20", step=20)
    c.step(["a"])
    run.dead = True
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RESTARTING and a.restarts == 1 and a.checkpoint == "s3://x/step-20"
    assert a.launches == 2 and a.last_event_seq == 0
    new = env.launcher.runners["a"]
    assert new is not run and new.reason is R.RELAUNCH
    new.attempt(R.RELAUNCH).ready(resumed_from="s3://x/step-20")
    c.step(["a"])
    a = env.store.get("a")
    assert a.state is S.RUNNING and a.restarts == 1 and a.checkpoint == "s3://x/step-20"


def test_runner_gone_after_a_controller_restart_is_no_failure(env):
    c, run = started(env)
    run.attempt(R.FIRST).ready()
    c.step(["a"])
    run.dead = True  # e.g. the whole cluster went down with the controller
    env.controller()
    a = env.store.get("a")
    assert a.state is S.RESTARTING and a.restarts == 0 and env.launcher.runners["a"].reason is R.RELAUNCH


@pytest.mark.parametrize("when", ["STARTING", "RUNNING", "RESTARTING"])
def test_cancel_checkpoints_then_stops_and_blocks_dependents(env, when):
    env.store.add([record("a"), record("b", depends_on=["a"])])
    c = env.controller()
    c.step(["a", "b"])
    run = env.launcher.runners["a"]
    if when != "STARTING":
        run.attempt(R.FIRST).ready()
    if when == "RESTARTING":
        run.attempt(R.FAILURE)
    c.step(["a", "b"])
    assert env.store.get("a").state.value == when
    c.cancel("a")
    assert run.requests[-1]["action"] == "cancel" and env.store.get("a").requested["action"] == "cancel"
    run.emit(K.STOPPED, checkpoint="s3://x/step-7")
    c.step(["a", "b"])
    c.step(["a", "b"])
    a = env.store.get("a")
    assert a.state is S.CANCELLED and a.checkpoint == "s3://x/step-7" and a.requested is None
    assert env.store.get("b").state is S.BLOCKED and run.killed


def test_cancel_now_and_cancel_of_a_queued_job(env):
    c, run = started(env)
    c.cancel("a", now=True)
    assert env.store.get("a").state is S.CANCELLED and run.killed and not run.requests
    env.store.add([record("q", workers=20)])
    c.step(["q"])  # does not fit: stays QUEUED
    assert env.store.get("q").state is S.QUEUED
    c.cancel("q")
    assert env.store.get("q").state is S.CANCELLED


def test_events_after_a_terminal_one_are_not_applied():
    r = record("a")
    r.state = S.RUNNING
    events = [RunnerEvent(1, K.FAILED, {"reason": "boom"}), RunnerEvent(2, K.PROGRESS, {"metrics": {"step": 5}})]
    changes = apply_events(r, events)
    assert [c.state for c in changes] == [S.FAILED]


def test_a_late_event_cannot_make_an_illegal_transition():
    r = record("a")
    r.state = S.CANCELLED  # the user cancelled --now; the runner's last words arrive
    changes = apply_events(r, [RunnerEvent(1, K.ENGINE_READY, {})])
    assert changes[0].state is None and changes[0].seq == 1


# ------------------------------------------------------------------- retry and resume (orch retry, orch run --resume)
def test_retry_of_a_failed_job_continues_from_its_checkpoint_and_unblocks_its_dependents(env):
    env.store.add([record("a", max_failures=0), record("b", depends_on=["a"]), record("c", depends_on=["b"])])
    c = env.controller()
    c.step(["a", "b", "c"])
    run = env.launcher.runners["a"]
    run.attempt(R.FIRST).ready().emit(K.CHECKPOINT_COMMITTED, uri="s3://x/runs/a/checkpoints/step-10", step=10)
    run.emit(K.FAILED, reason="rank 0: RuntimeError: boom", retryable=True, traceback="Traceback ...")
    for _ in range(3):
        c.step(["a", "b", "c"])
    assert [env.store.get(j).state for j in "abc"] == [S.FAILED, S.BLOCKED, S.BLOCKED]

    a = c.retry("a")
    assert a.state is S.PENDING and a.failure_reason is None and a.failure_detail is None and a.restarts == 0
    assert a.checkpoint == "s3://x/runs/a/checkpoints/step-10"  # kept: the runner resumes from the newest commit
    assert "retried by the user: continues from step-10" in a.history[-1]["reason"]
    assert env.store.get("b").state is env.store.get("c").state is S.PENDING  # b, and c behind it
    assert "its dependency a was retried" in env.store.get("c").history[-1]["reason"]

    c.step(["a", "b", "c"])
    c.step(["a", "b", "c"])
    assert env.store.get("a").state is S.STARTING and env.store.get("b").state is S.PENDING  # b still waits
    relaunched = env.launcher.runners["a"]
    assert relaunched is not run and relaunched.reason is R.RESUME  # the history marks a resume
    relaunched.attempt(R.RESUME).ready(resumed_from="s3://x/runs/a/checkpoints/step-10")
    c.step(["a", "b", "c"])
    a = env.store.get("a")
    assert a.state is S.RUNNING and "resumed from s3://x/runs/a/checkpoints/step-10" in a.history[-1]["reason"]
    assert env.states("a") == ["PENDING", "QUEUED", "STARTING", "RUNNING", "FAILED",
                               "PENDING", "QUEUED", "STARTING", "RUNNING"]


@pytest.mark.parametrize("state", ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "BLOCKED"])
def test_only_a_failed_or_cancelled_job_can_be_retried(env, state):
    from orchestrator.errors import ClusterError

    env.store.add([record("a")])
    for s in {"PENDING": [], "QUEUED": [S.QUEUED], "RUNNING": [S.QUEUED, S.STARTING, S.RUNNING],
              "SUCCEEDED": [S.QUEUED, S.STARTING, S.RUNNING, S.SUCCEEDED], "BLOCKED": [S.BLOCKED]}[state]:
        env.store.transition("a", s)
    with pytest.raises(ClusterError, match={"SUCCEEDED": "not run again", "BLOCKED": "retry that one"}.get(
            state, "only a FAILED or CANCELLED job")):
        Controller(env.store, env.launcher, capacity=lambda: {"CPU": 8}).retry("a")
    assert env.store.get("a").state.value == state


def test_retry_transitions_leave_terminal_states_only_to_pending():
    from orchestrator.jobs.state import allowed

    for s in (S.FAILED, S.CANCELLED, S.BLOCKED):
        assert [t for t in S if allowed(s, t)] == [S.PENDING]
    assert not any(allowed(S.SUCCEEDED, t) for t in S)


def test_resume_requeues_what_orch_run_left_and_ends_orphans_first(env):
    """`orch run --resume`: the finished job stays; an abandoned one, and one its vanished driver left
    RUNNING, are queued again (dependents wait for their dependencies as before)."""
    from orchestrator.jobs.retry import ABANDONED, ORPHANED

    env.store.add([record("pre"), record("ft", depends_on=["pre"]), record("ev", depends_on=["ft"])])
    for s in (S.QUEUED, S.STARTING, S.RUNNING, S.SUCCEEDED):
        env.store.transition("pre", s, export="s3://x/runs/pre/export")
    for s in (S.QUEUED, S.STARTING, S.RUNNING):  # its orch run vanished (SIGKILL): still RUNNING
        env.store.transition("ft", s)
    env.store.transition("ev", S.CANCELLED, ABANDONED, failure_reason=ABANDONED)
    c = Controller(env.store, env.launcher, lambda: {"CPU": 8}, say=env.lines.append)  # as `orch run` makes it
    records = {r.id: r for r in c.resume("p", "continued by `orch run --resume`")}
    assert records["pre"].state is S.SUCCEEDED
    assert records["ft"].state is records["ev"].state is S.PENDING
    assert [h["reason"] for h in records["ft"].history][-2:] == [
        ORPHANED, "continued by `orch run --resume`: continues from the start"]
    c.step(list(records))
    c.step(list(records))
    assert env.store.get("ft").state is S.STARTING and env.store.get("ev").state is S.PENDING
    assert env.launcher.runners["ft"].reason is R.FIRST  # never launched by this store: a first attempt


def test_the_runners_event_wait_wakes_on_state_changes_only():
    """The controller sleeps on `wait_events` between passes: a log line or a step's progress (rank 0
    reports every step) must not wake it; a job's end wakes it at once."""
    import threading
    import time

    from orchestrator.execution.runner import _EventLog

    log = _EventLog()
    log.emit(K.LOG, line="dataset ready")
    log.emit(K.PROGRESS, metrics={"step": 1})
    t0 = time.monotonic()
    assert log.wait(0, 0.3) is False and time.monotonic() - t0 >= 0.3
    threading.Timer(0.2, lambda: log.emit(K.SUCCEEDED, export="x", checkpoint="y", metrics={})).start()
    t0 = time.monotonic()
    assert log.wait(2, 30) is True and time.monotonic() - t0 < 10
    assert log.wait(3, 0) is False  # nothing after the end
