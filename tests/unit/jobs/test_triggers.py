"""Checkpoint triggers: the rules (orchestrator.jobs.triggers, retention's pins) on hand-built
records, and the controller's driver (orchestrator.jobs.trigger_driver) on a real job store and a
local object store with commit markers, restarted between passes: each matching step starts one
job, exactly once."""

from __future__ import annotations

import json

import pytest

from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_uri, list_checkpoints, run_uri
from orchestrator.checkpoint.retention import pin_uri, protected_steps, read_pins, to_delete
from orchestrator.config.compose import compose_root, resolve_jobs
from orchestrator.config.typed import to_dict
from orchestrator.constants import COMMIT_MARKER
from orchestrator.errors import ConfigError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from orchestrator.jobs.trigger_driver import TriggerDriver
from orchestrator.jobs.triggers import instance, steps_to_start, trigger_end
from orchestrator.storage import join_uri, open_store


def _jobs(root: str, rule: str = "every:10", interval: int = 10) -> dict:
    cfg = compose_root(["pipeline=pretrain", "model=gpt_tiny", f"storage.root={root}", "checkpoint.keep_last=1",
                        f"checkpoint.interval={interval}",
                        f"+pipeline.jobs.ev={{kind:eval,depends_on:['pretrain@{rule}'],workers:1}}"])
    return {j.name: j for j in resolve_jobs(cfg)}


def _record(job, state=JobState.PENDING, depends_on=(), priority=0) -> JobRecord:
    return JobRecord(id=f"p1-{job.name}", pipeline_id="p1", name=job.name, kind=job.kind, state=state,
                     priority=priority, depends_on=list(depends_on), config=to_dict(job), created_at=0.0)


def test_a_trigger_is_composed_from_job_at_rule_and_refused_when_malformed(tmp_path):
    jobs = _jobs(f"file://{tmp_path}")
    assert jobs["ev"].depends_on == ("pretrain",) and jobs["ev"].trigger == "every:10"
    assert _jobs(f"file://{tmp_path}", "step:30")["ev"].trigger == "step:30"
    with pytest.raises(ConfigError, match="not a checkpoint trigger; write JOB@every:N"):
        _jobs(f"file://{tmp_path}", "each:10")
    with pytest.raises(ConfigError, match="but pretrain commits every 20 steps .checkpoint.interval=20.; set "
                                          "checkpoint.interval=30 or a divisor of it"):
        _jobs(f"file://{tmp_path}", "step:30", interval=20)
    with pytest.raises(ConfigError, match="depends on exactly one job, the one whose checkpoints start it; it names 2"):
        resolve_jobs(compose_root(["pipeline=pretrain_finetune",
                                   "pipeline.jobs.finetune.depends_on=[pretrain@every:5,finetune_scratch]"]))


def test_matching_steps_instances_and_the_end(tmp_path):
    jobs = _jobs(f"file://{tmp_path}")
    source = _record(jobs["pretrain"], JobState.RUNNING, priority=3)
    trig = _record(jobs["ev"], depends_on=[source.id], priority=5)
    assert steps_to_start(trig, [5, 10, 15, 20, 30], {"p1-ev-s10"}) == [20, 30]  # 10 started already
    job = instance(trig, source, 20, "file:///s/runs/p1-pretrain/checkpoints/step-20", now=1.0)
    assert (job.id, job.name, job.state, job.depends_on) == ("p1-ev-s20", "ev-s20", JobState.QUEUED, [])
    assert job.config["init_from"].endswith("/step-20") and job.config["trigger"] is None
    assert job.priority == 2  # below its source's, never ahead of it
    assert trigger_end(trig, source, [10, 20]) is None  # the source still runs
    source.state = JobState.SUCCEEDED
    assert trigger_end(trig, source, [10, 20]).state is JobState.SUCCEEDED
    source.state = JobState.FAILED
    assert trigger_end(trig, source, []).state is JobState.BLOCKED


def test_retention_keeps_what_a_pin_has_not_released():
    pins = [{"trigger": "every:10", "released": [10]}, {"trigger": "step:25", "released": []}]
    assert protected_steps(pins, [5, 10, 15, 20, 25, 30]) == {20, 25, 30}
    refs = [CheckpointRef(s, f"x/step-{s}", True) for s in (10, 20, 25, 30)]
    assert [r.step for r in to_delete(refs, 1, 0, 30, protected_steps(pins, [10, 20, 25, 30]))] == [10]


def _commit(store, run: str, step: int) -> None:
    store.put(join_uri(checkpoint_uri(run, step), "weights.bin"), b"w")
    store.put(join_uri(checkpoint_uri(run, step), COMMIT_MARKER), json.dumps({"step": step}).encode())


def test_the_driver_starts_each_step_once_across_restarts_and_releases_the_pin(tmp_path):
    root = f"file://{tmp_path}/store"
    jobs, db, said = _jobs(root), JobStore(tmp_path / "state"), []
    source = _record(jobs["pretrain"], JobState.RUNNING)
    trig = _record(jobs["ev"], depends_on=[source.id])
    db.add([source, trig])
    TriggerDriver(db, said.append, lambda: 0.0).pin([source, trig])
    store, run = open_store(root), run_uri(root, source.id)
    assert read_pins(store, run) == [{"trigger": "every:10", "released": [], "job": trig.id}]

    _commit(store, run, 10)
    db.update(source.id, checkpoint=checkpoint_uri(run, 10))
    ids = [trig.id]
    TriggerDriver(db, said.append, lambda: 0.0).step(ids)
    assert ids == [trig.id, "p1-ev-s10"]
    # A new controller (its memory gone) looks again at the same commit, and again after the source
    # resumed from step 10 and committed step 10 once more: still one job for step 10.
    for _ in range(2):
        _commit(store, run, 10)
        TriggerDriver(db, said.append, lambda: 0.0).step([trig.id])
    assert [r.id for r in db.list("p1")] == [source.id, trig.id, "p1-ev-s10"]

    # Step 20 commits and the source ends; once both instances ended, the trigger ends, its pin goes and
    # the checkpoint it kept beyond keep_last=1 is deleted.
    _commit(store, run, 20)
    db.update(source.id, checkpoint=checkpoint_uri(run, 20))
    db.transition(source.id, JobState.SUCCEEDED, "done")
    driver = TriggerDriver(db, said.append, lambda: 0.0)
    driver.step([trig.id])
    assert db.get(trig.id).state is JobState.PENDING and [c.step for c in list_checkpoints(store, run)] == [10, 20]
    for i in ("p1-ev-s10", "p1-ev-s20"):
        for state in (JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED):
            db.transition(i, state, "ran")
    driver.step([trig.id])
    assert db.get(trig.id).state is JobState.SUCCEEDED
    assert not store.exists(pin_uri(run, trig.id))
    assert [c.step for c in list_checkpoints(store, run)] == [20]
    assert sum("QUEUED (checkpoint step 10" in s for s in said) == 1
