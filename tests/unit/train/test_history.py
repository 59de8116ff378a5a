"""The metrics history: one row per step after any resume (pure resolution, then real writes to a
local object store), and the W&B sink fed from it (real W&B offline files, read back)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.schema import TrackingConfig
from orchestrator.execution.tracking import ArtifactRef, WandbSink, export_job_id, redact
from orchestrator.storage import open_store
from orchestrator.train.history import (
    COMPACTED,
    HISTORY_DIR,
    HistoryWriter,
    losses,
    next_attempt,
    read_history,
    resolve,
)
from tests import wandb_files
from tests.leaks import find_in_tree, plant_secrets


def _row(step, attempt, loss, **extra):
    return {"step": step, "attempt": attempt, "world_size": 2, "metrics": {"train/loss": loss, **extra}, "events": []}


def test_a_resumed_attempt_supersedes_the_rows_after_its_start():
    rows = [_row(s, 1, 100 + s) for s in range(1, 11)] + [_row(s, 2, 200 + s) for s in range(6, 13)]
    got = resolve({1: 0, 2: 5}, rows)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert losses(got) == {**{s: 100 + s for s in range(1, 6)}, **{s: 200 + s for s in range(6, 13)}}


def test_a_resume_from_an_older_checkpoint_supersedes_a_later_attempt_too():
    rows = ([_row(s, 1, 1.0) for s in range(1, 9)] + [_row(s, 2, 2.0) for s in range(7, 15)]
            + [_row(s, 3, 3.0) for s in range(4, 20)])
    got = losses(resolve({1: 0, 2: 6, 3: 3}, rows))
    assert sorted(got) == list(range(1, 20))
    assert {got[s] for s in range(1, 4)} == {1.0} and {got[s] for s in range(4, 20)} == {3.0}


def test_rows_of_one_step_and_attempt_merge():
    rows = [_row(5, 1, 1.5), {"step": 5, "attempt": 1, "metrics": {"eval/loss": 2.0}, "events": []},
            {"step": 5, "attempt": 1, "metrics": {}, "events": [{"kind": "checkpoint"}]}]
    (row,) = resolve({1: 0}, rows)
    assert row["metrics"] == {"train/loss": 1.5, "eval/loss": 2.0} and row["events"] == [{"kind": "checkpoint"}]


def _attempt(store, run, start, stop, value, world_size=2, commit_at=(), reason="restart"):
    w = HistoryWriter(store, run, world_size=world_size, start_step=start, reason=reason)
    for step in range(start + 1, stop + 1):
        w.log({"train/loss": value + step}, step=step)
        if step in commit_at:
            w.append(step, events=[{"kind": "checkpoint"}])
            w.compact(step)
    return w  # (never finished: a kill -9 leaves it like this)


def test_writer_kill_and_resume_in_a_real_store(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    run = f"file://{tmp_path}/store/runs/p1-pretrain"
    first = _attempt(store, run, 0, 13, 0.0, commit_at=(5, 10), reason="start")
    assert first.attempt == 1 and next_attempt(store, run) == 2
    second = _attempt(store, run, 10, 17, 1000.0, commit_at=(15,))
    assert second.attempt == 2
    got = read_history(store, run)
    assert got["attempts"] == {"1": 0, "2": 10}
    rows = got["rows"]
    assert [r["step"] for r in rows] == list(range(1, 18))
    assert losses(rows) == {**{s: float(s) for s in range(1, 11)}, **{s: 1000.0 + s for s in range(11, 18)}}
    assert rows[0]["events"][0]["kind"] == "start" and rows[10]["events"][0] == {
        "kind": "restart", "from_step": 10, "world_size": 2}
    assert [e["kind"] for e in rows[4]["events"]] == ["checkpoint"]
    # Compaction left the compacted history and only the parts after the last commit (and the header).
    parts = sorted(o.uri.rsplit("/", 1)[1] for o in store.list(f"{run}/{HISTORY_DIR}/parts/"))
    assert all(p.startswith("a00002-") for p in parts) and len(parts) <= 4, parts
    assert store.exists(f"{run}/{HISTORY_DIR}/{COMPACTED}")
    # A third attempt from a checkpoint older than the compacted rows (the newest was corrupt).
    _attempt(store, run, 5, 8, 5000.0, world_size=3)
    rows = read_history(store, run)["rows"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert losses(rows)[6] == 5006.0 and rows[-1]["world_size"] == 3


def test_a_reader_with_a_cache_fetches_only_new_parts_and_reads_the_same(tmp_path: Path):
    class Counting:
        def __init__(self, inner):
            self.inner, self.gets = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get(self, uri):
            self.gets.append(uri)
            return self.inner.get(uri)

    store = Counting(open_store(str(tmp_path / "store")))
    run = f"file://{tmp_path}/store/runs/p1-pretrain"
    cache: dict = {}
    w = _attempt(store.inner, run, 0, 7, 0.0, commit_at=(5,), reason="start")
    assert read_history(store, run, cache) == read_history(store.inner, run)
    store.gets.clear()
    w.log({"train/loss": 8.0}, step=8)  # one new part since the last read
    got = read_history(store, run, cache)
    assert got == read_history(store.inner, run) and sorted(losses(got["rows"])) == list(range(1, 9))
    assert [u for u in store.gets if "/parts/" in u] == [max(cache)]  # only the new part was fetched


def test_a_failing_store_never_stops_the_writer(tmp_path: Path):
    class Flaky:
        def __init__(self, inner):
            self.inner, self.fail = inner, True

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def put(self, uri, data):
            if self.fail:
                raise OSError("store unreachable")
            self.inner.put(uri, data)

    store = Flaky(open_store(str(tmp_path / "store")))
    run = f"file://{tmp_path}/store/runs/j"
    w = HistoryWriter(store, run, world_size=1, start_step=0, reason="start")
    w.log({"train/loss": 1.0}, step=1)  # not written, kept
    store.fail = False
    w.log({"train/loss": 2.0}, step=2)  # both written now
    assert losses(read_history(store.inner, run)["rows"]) == {1: 1.0, 2: 2.0}


def test_a_background_writer_never_makes_the_step_wait_and_loses_nothing_it_was_given(tmp_path):
    """The training loop's writer: log() returns while the store is slow; rows reach the store in
    order (the flusher thread), a commit writes what is pending first, finish() writes the rest."""
    import threading

    class Slow:
        def __init__(self, inner):
            self.inner, self.gate = inner, threading.Event()

        def put(self, uri, data):
            if "/parts/" in uri and not uri.endswith("-000001.jsonl"):
                self.gate.wait()  # held until the test opens it (log() waiting here would hang the test)
            self.inner.put(uri, data)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    store = Slow(open_store(str(tmp_path / "store")))
    run = f"file://{tmp_path}/store/runs/j"
    w = HistoryWriter(store, run, world_size=1, start_step=0, reason="start", background=True)
    for step in range(1, 21):
        w.log({"train/loss": float(step)}, step=step)  # returns although the store holds every write back
    assert read_history(store.inner, run)["rows"] == []  # nothing written yet: only the header part
    store.gate.set()
    w.append(10, events=[{"kind": "checkpoint"}])
    w.compact(10)
    assert sorted(losses(read_history(store.inner, run)["rows"])) == list(range(1, 21))
    for step in range(21, 31):
        w.log({"train/loss": float(step)}, step=step)
    w.finish()
    assert losses(read_history(store.inner, run)["rows"]) == {s: float(s) for s in range(1, 31)}


def test_export_job_and_redaction(monkeypatch):
    assert export_job_id("s3://b/orch/runs/p1-pretrain/export") == "p1-pretrain"
    assert export_job_id("/tmp/hf-model") is None
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert redact({"a": ["x0123456789abcdefy", 1], "b": "ok"}) == {"a": ["<redacted>", 1], "b": "ok"}


def test_offline_sink_keeps_one_folder_with_one_row_per_step_after_a_replay(tmp_path: Path):
    rows1 = [_row(s, 1, 1.0 + s) for s in range(1, 9)]
    rows2 = rows1[:5] + [_row(s, 2, 100.0 + s) for s in range(6, 13)]
    said = []
    sink = WandbSink(TrackingConfig(mode="offline"), run_id="p1-finetune", name="finetune-p1-finetune", group="p1",
                     job_type="finetune", config={"init_from": "file:///s/runs/p0-pretrain/export"},
                     root_dir=str(tmp_path / "state"), say=said.append,
                     uses=(ArtifactRef("model-p0-pretrain", "model", f"file://{tmp_path}", {}),))
    sink.update(rows1)
    sink.update(rows2)  # attempt 2 resumed from step 5: steps 6-8 are replayed
    sink.finish(rows2, (ArtifactRef("model-p1-finetune", "model", f"file://{tmp_path}/state", {"step": 12}),))
    (folder,) = (tmp_path / "state" / "wandb").glob("offline-run-*-p1-finetune")
    assert sink.info()["dir"] == str(folder) and not said
    f = wandb_files.run_file(folder)
    hist = [r for r in wandb_files.history(f) if "train/loss" in r]
    assert [r["_step"] for r in hist] == list(range(1, 13)) == [r["trainer/step"] for r in hist]
    assert {r["_step"]: r["train/loss"] for r in hist} == pytest.approx(losses(rows2))
    info = wandb_files.run_info(f)
    assert info["group"] == "p1" and info["config"]["init_from"].endswith("/p0-pretrain/export")
    arts = wandb_files.artifacts(f)
    used = [a for a in arts if a["use_after_commit"]]
    assert [a["name"] for a in used] == ["model-p0-pretrain"]
    assert [a["name"] for a in arts if not a["use_after_commit"]] == ["model-p1-finetune"]


def test_an_unreachable_wandb_server_warns_once_and_degrades_to_offline(tmp_path: Path, monkeypatch):
    """Online with a (planted) key and a server that refuses connections: one warning, the run
    written offline from the whole history instead (for `orch sync`), and the key in no file."""
    secrets = plant_secrets(seed=11)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", secrets["WANDB_API_KEY"])
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # (discard port: nothing listens)
    rows = [_row(s, 1, 1.0 / s) for s in range(1, 7)]
    said = []
    sink = WandbSink(TrackingConfig(mode="online"), run_id="p2-pretrain", name="pretrain-p2-pretrain", group="p2",
                     job_type="pretrain", config={"trainer": {"lr": 1e-3}}, root_dir=str(tmp_path / "state"),
                     say=said.append, init_timeout_s=3)
    sink.update(rows)
    sink.finish(rows)
    assert len(said) == 1 and "logging offline" in said[0] and "training goes on" in said[0]
    assert sink.info()["mode"] == "offline"
    (folder,) = (tmp_path / "state" / "wandb").glob("*run-*-p2-pretrain")
    assert folder.name.startswith("offline-run-")
    hist = wandb_files.history(wandb_files.run_file(folder))
    kinds = [r.WhichOneof("record_type") for r in wandb_files.read_records(wandb_files.run_file(folder))]
    assert {r["_step"]: r["train/loss"] for r in hist} == pytest.approx(losses(rows)), (kinds, sink.info())
    hits, searched = find_in_tree(tmp_path, {"WANDB_API_KEY": secrets["WANDB_API_KEY"]})
    assert hits == [] and searched > 3


class _FakeWandb:
    """W&B's online calls, recorded (a server cannot run here): init, log, define_metric, finish;
    `rewind` says whether the server allows `resume_from`."""

    class Settings(dict):
        def __init__(self, **kw):
            super().__init__(kw)

    def __init__(self, rewind: bool):
        self.rewind, self.calls = rewind, []

    def init(self, **kw):
        if "resume_from" in kw and not self.rewind:
            raise RuntimeError("resume_from is not enabled for this entity")
        self.calls.append(("init", kw.get("resume_from") or kw.get("resume")))
        fake = self

        class Run:
            dir, url = "/nowhere/wandb/run-x-j/files", "https://wandb.example/run/j"

            def define_metric(self, *a, **k):
                pass

            def log(self, row, step):
                fake.calls.append(("log", step, row["trainer/step"], row["train/loss"]))

            def finish(self, exit_code=0):
                fake.calls.append(("finish",))

        return Run()

    def teardown(self):
        pass


@pytest.mark.parametrize("rewind", [True, False])
def test_online_replayed_steps_are_recorded(monkeypatch, tmp_path, rewind):
    """Online, a resume from step 3 after step 5 was logged: W&B's rewind replaces steps 4-5; where
    the server refuses it, the replayed rows come after the others (W&B steps 6, 7, ...) at their
    trainer step, so nothing is dropped."""
    import sys

    fake = _FakeWandb(rewind)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink(TrackingConfig(mode="online"), run_id="j", name="j", group="g", job_type="pretrain", config={},
                     root_dir=str(tmp_path), say=lambda m: None)
    first = [_row(s, 1, 10.0 + s) for s in range(1, 7)]
    sink.update(first)  # logs 1-5 (6 may still get its eval values)
    resumed = first[:3] + [_row(s, 2, 20.0 + s) for s in range(4, 8)]
    sink.update(resumed, final=True)
    logs = [c[1:] for c in fake.calls if c[0] == "log"]
    assert logs[:5] == [(s, s, 10.0 + s) for s in range(1, 6)]
    if rewind:
        assert ("init", "j?_step=3") in fake.calls
        assert logs[5:] == [(s, s, 20.0 + s) for s in range(4, 8)]
    else:
        assert logs[5:] == [(6 + i, s, 20.0 + s) for i, s in enumerate(range(4, 8))]
