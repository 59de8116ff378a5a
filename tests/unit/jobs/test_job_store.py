"""Unit tests of orchestrator/jobs/store.py: durable job records in SQLite under tmp_path.

A second `JobStore` on the same folder stands in for another process (`orch status`, or a
restarted controller): it must see exactly what the first one committed.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from orchestrator.errors import JobNotFound
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import IllegalTransition, JobState
from orchestrator.jobs.store import JobStore

S = JobState


def record(id: str, *, pipeline: str = "p1", state: JobState = S.PENDING, priority: int = 0,
           depends_on: list[str] | None = None) -> JobRecord:
    return JobRecord(
        id=id,
        pipeline_id=pipeline,
        name=id.split("-")[0],
        kind="pretrain",
        state=state,
        priority=priority,
        depends_on=list(depends_on or []),
        config={"workers": 2, "cluster": {"cpus_per_worker": 1, "gpus_per_worker": 0}, "trainer": {"max_steps": 5}},
        created_at=1000.0,
    )


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "state")


def test_add_then_get_returns_the_same_record(store):
    r = record("pretrain-1", depends_on=[])
    store.add([r])
    got = store.get("pretrain-1")
    assert got.state is S.PENDING
    assert got.config == r.config
    assert got.to_json() == r.to_json()  # every field, including seq and the "submitted" history
    assert [h["state"] for h in got.history] == ["PENDING"]
    assert got.history[0]["reason"] == "submitted"


def test_seq_increases_across_submissions_and_list_is_in_seq_order(store):
    store.add([record("b-1"), record("a-1")])
    store.add([record("c-2", pipeline="p2")])
    listed = store.list()
    assert [r.id for r in listed] == ["b-1", "a-1", "c-2"]
    assert [r.seq for r in listed] == [1, 2, 3]
    assert [r.id for r in store.list("p2")] == ["c-2"]
    assert [r.id for r in store.list("p1")] == ["b-1", "a-1"]
    assert store.list("nope") == []


def test_a_submission_is_all_or_nothing(store):
    store.add([record("a-1")])
    with pytest.raises(sqlite3.IntegrityError):
        store.add([record("b-1"), record("a-1")])  # duplicate id in the second pipeline
    assert [r.id for r in store.list()] == ["a-1"]


def test_transition_persists_and_is_visible_from_another_store(store, tmp_path):
    store.add([record("a-1")])
    returned = store.transition("a-1", S.QUEUED, "dependencies succeeded")
    assert returned.state is S.QUEUED

    other = JobStore(tmp_path / "state")  # another process on the same state folder
    seen = other.get("a-1")
    assert seen.state is S.QUEUED
    assert seen.history[-1]["state"] == "QUEUED"
    assert seen.history[-1]["reason"] == "dependencies succeeded"
    assert [r.state for r in other.list()] == [S.QUEUED]

    # And the other way round.
    other.transition("a-1", S.STARTING, "admitted")
    assert store.get("a-1").state is S.STARTING


def test_transition_sets_extra_fields(store):
    store.add([record("a-1", state=S.QUEUED)])
    store.transition("a-1", S.STARTING)
    store.transition("a-1", S.FAILED, "worker died", failure_reason="OOM on rank 1")
    got = store.get("a-1")
    assert got.state is S.FAILED
    assert got.failure_reason == "OOM on rank 1"


def test_illegal_transition_raises_and_leaves_the_record_unchanged(store):
    store.add([record("a-1")])
    before = store.get("a-1").to_json()
    with pytest.raises(IllegalTransition, match="PENDING to RUNNING"):
        store.transition("a-1", S.RUNNING, "skip the queue", failure_reason="x")
    assert store.get("a-1").to_json() == before


def test_terminal_record_cannot_be_moved(store):
    store.add([record("a-1")])
    store.transition("a-1", S.CANCELLED, "user")
    with pytest.raises(IllegalTransition):
        store.transition("a-1", S.QUEUED)
    assert store.get("a-1").state is S.CANCELLED


def test_update_merges_metrics_and_replaces_other_fields(store):
    store.add([record("a-1")])
    store.update("a-1", metrics={"step": 1, "loss": 5.0, "first_loss": 5.0})
    store.update("a-1", metrics={"step": 2, "loss": 4.0}, checkpoint="file:///c/step-2")
    store.update("a-1", wandb={"run_id": "r1"})
    store.update("a-1", wandb={"group": "p1"}, checkpoint="file:///c/step-3")
    got = store.get("a-1")
    assert got.metrics == {"step": 2, "loss": 4.0, "first_loss": 5.0}
    assert got.wandb == {"run_id": "r1", "group": "p1"}
    assert got.checkpoint == "file:///c/step-3"
    assert got.state is S.PENDING and len(got.history) == 1  # update is not a transition


def test_update_refuses_state(store):
    store.add([record("a-1")])
    with pytest.raises(ValueError, match="transition"):
        store.update("a-1", state=S.RUNNING)
    assert store.get("a-1").state is S.PENDING


def test_update_keeps_fields_set_by_transitions(store):
    store.add([record("a-1", state=S.QUEUED)])
    store.transition("a-1", S.STARTING)
    store.update("a-1", metrics={"step": 3})
    got = store.get("a-1")
    assert got.state is S.STARTING
    assert [h["state"] for h in got.history] == ["QUEUED", "STARTING"]


def test_history_is_ordered_in_time(store):
    store.add([record("a-1")])
    for new in (S.QUEUED, S.STARTING, S.RUNNING, S.RESTARTING, S.RUNNING, S.SUCCEEDED):
        store.transition("a-1", new, f"to {new.value}")
    got = store.get("a-1")
    assert [h["state"] for h in got.history] == ["PENDING", "QUEUED", "STARTING", "RUNNING", "RESTARTING",
                                                 "RUNNING", "SUCCEEDED"]
    times = [h["at"] for h in got.history]
    assert times == sorted(times)
    assert got.started_at() == got.history[2]["at"]
    assert got.ended_at() == got.history[-1]["at"]


@pytest.mark.parametrize("action", ["get", "update", "transition"])
def test_unknown_job_id_raises_job_not_found_naming_it(store, action):
    store.add([record("a-1")])
    with pytest.raises(JobNotFound, match="no-such-job"):
        if action == "get":
            store.get("no-such-job")
        elif action == "update":
            store.update("no-such-job", metrics={"step": 1})
        else:
            store.transition("no-such-job", S.QUEUED)


def test_empty_state_folder_lists_nothing_and_creates_the_db(tmp_path):
    store = JobStore(tmp_path / "fresh" / "nested")
    assert store.list() == []
    assert store.path.is_file()


def test_record_round_trips_through_its_json():
    r = record("finetune-1", state=S.RUNNING, priority=3, depends_on=["pretrain-1"])
    r.seq, r.restarts, r.checkpoint, r.export = 7, 2, "file:///ck/step-4", None
    r.metrics = {"step": 4, "loss": 1.5}
    r.history = [{"state": "PENDING", "at": 1.0, "reason": "submitted"}, {"state": "RUNNING", "at": 2.0, "reason": ""}]
    r.failure_reason, r.wandb, r.requested = "worker died", {"run_id": "abc"}, {"action": "scale", "workers": 1}
    d = r.to_json()
    assert d["state"] == "RUNNING"  # a plain name, as stored and sent over the wire
    back = JobRecord.from_json(json.loads(json.dumps(d)))
    assert back == r and back.state is S.RUNNING
    assert d["state"] == "RUNNING"  # from_json leaves its argument alone


def test_from_json_rejects_an_unknown_state_or_field():
    d = record("a-1").to_json()
    with pytest.raises(ValueError, match="BOGUS"):
        JobRecord.from_json({**d, "state": "BOGUS"})
    with pytest.raises(TypeError, match="bogus"):
        JobRecord.from_json({**d, "bogus": 1})


def test_get_many_reads_in_order_and_names_a_missing_job(store):
    records = [record(f"j{i}-pretrain") for i in range(1203)]  # more than one chunk of parameters
    store.add(records)
    wanted = [r.id for r in reversed(records)]
    assert [r.id for r in store.get_many(wanted)] == wanted
    with pytest.raises(JobNotFound, match="nope-pretrain"):
        store.get_many([wanted[0], "nope-pretrain"])
