"""More bad input found by trying the CLI as a new user would (issue 24, part 5): destination
folders with spaces and accents, an S3 endpoint that never answers, binary files in a job's corpus,
a prepare that fails half-way, exports of other checkpoints, a job whose checkpoint was deleted.
The real CLI in a child process; none of these starts Ray."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_bad_checkpoints import _checkpoint
from tests.integration.test_cli import _one_line_error
from tests.integration.test_destinations import _hf_folder, _snapshot

STORY = "Once upon a time a fox met a crow in the wood, and they talked until the evening.\n"


def _corpus(folder: Path, copies: int = 20) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"part-{i}.txt").write_text(STORY * copies)
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------ destinations
@pytest.mark.slow  # a real prepare (its embedded Ray cluster)
@pytest.mark.reliability(category="destination", case="`orch data prepare` into a folder named with a space and an "
                                                       "accent", lost="nothing",
                         happened="prepared there, the dataset named after the folder in safe characters; exit 0")
def test_prepare_into_a_folder_with_a_space_and_an_accent(orch, tmp_path):
    _corpus(tmp_path / "my texts")
    result = orch("data", "prepare", "./my texts", "./out dir/ds é", "data.seq_len=32", "data.vocab_size=300",
                  "--state-dir", str(tmp_path / "state"), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((tmp_path / "out dir" / "ds é" / "manifest.json").read_text())
    assert manifest["name"] == "ds_e"
    assert f"ready at file://{tmp_path}/out dir/ds é" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ storage
@pytest.fixture
def silent_endpoint():
    """A TCP server on loopback that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.reliability(category="storage", case="S3 endpoint that accepts connections and never answers",
                         lost="nothing: no job recorded",
                         happened="one line naming the endpoint within 30 s (it took 6 minutes); exit 2")
def test_s3_endpoint_that_never_answers_fails_within_30_s(orch, tmp_path, silent_endpoint):
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE", "AWS_SECRET_ACCESS_KEY": "examplesecretexample"}
    t0 = time.monotonic()
    result = orch("run", "model=gpt_tiny", "storage=s3", "storage.root=s3://bucket/orch",
                  f"storage.endpoint_url={silent_endpoint}", "--state-dir", str(tmp_path), env=env, timeout=60)
    elapsed = time.monotonic() - t0
    _one_line_error(result, silent_endpoint, "did not answer", "storage.endpoint_url")
    assert elapsed < 30, elapsed
    assert not (tmp_path / "jobs.db").exists()


# ------------------------------------------------------------------------------ a job's corpus
@pytest.mark.reliability(category="corpus", case="`orch run` with binary files named .txt in data.source",
                         lost="nothing: no job recorded, no dataset written",
                         happened="the one line `orch data prepare` gives for the same files, before any Ray "
                                  "task; exit 2")
def test_run_with_binary_files_in_its_source_is_the_prepare_line(orch, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "good.txt").write_text(STORY * 20)
    (src / "junk.txt").write_bytes(bytes(range(256)) * 40)
    dst = tmp_path / "new folder" / "ds"
    prepared = orch("data", "prepare", str(src), str(dst), "--state-dir", str(tmp_path / "state"))
    line = _one_line_error(prepared, "junk.txt", "not UTF-8")
    assert not (tmp_path / "new folder").exists()  # not even the folders it would have written into
    t0 = time.monotonic()
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", f"data.source={src}", f"data.uri={tmp_path / 'ds'}",
                  "tracking=none", "--state-dir", str(tmp_path / "state"), timeout=300)
    assert _one_line_error(result, "junk.txt", "not UTF-8") == line
    assert time.monotonic() - t0 < 30  # refused before a cluster started
    assert not (tmp_path / "state" / "jobs.db").exists() and not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------ a failed prepare
@pytest.mark.reliability(category="destination", case="a prepare that fails after it began writing into an empty "
                                                       "folder",
                         lost="nothing: the destination is as it was (no marker, no tokenizer)",
                         happened="the prepare's own error; what it wrote is removed")
def test_prepare_that_fails_leaves_an_empty_destination_as_it_was(tmp_path):
    """In process, tokenized here (no Ray): `orch data prepare` and a job's prepare run this code."""
    from orchestrator.config.schema import DataConfig
    from orchestrator.data.prepare import local_runner, prepare_dataset
    from orchestrator.errors import DatasetError
    from orchestrator.storage import LocalStore

    src = _corpus(tmp_path / "corpus", copies=1)  # a few hundred tokens: no sample of 1024
    store = LocalStore()
    for dst, before in [(tmp_path / "new", None), (tmp_path / "empty", [])]:
        if before is not None:
            dst.mkdir()
        cfg = DataConfig(name="ds", kind="text", uri=f"file://{dst}", source=f"file://{src}", seq_len=1024,
                         vocab_size=300)
        with pytest.raises(DatasetError, match="no training samples"):
            prepare_dataset(store, cfg, runner=local_runner)
        assert _files(dst) == [] and not (dst.exists() and before is None)
    # a destination orch wrote before keeps its marker (its next prepare clears the leftovers)
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / ".orch-dataset").write_text("{}")
    with pytest.raises(DatasetError, match="no training samples"):
        prepare_dataset(store, dataclasses.replace(cfg, uri=f"file://{dst}"), runner=local_runner)
    assert ".orch-dataset" in _files(dst)


# ------------------------------------------------------------------------------ exports
@pytest.mark.reliability(category="destination", case="`orch export` into the export of another checkpoint",
                         lost="nothing: the earlier export byte for byte")
def test_export_over_the_export_of_another_source_needs_overwrite(orch, tmp_path):
    a = _hf_folder(tmp_path / "a", n_layer=1)
    b = _hf_folder(tmp_path / "b", n_layer=2)
    out = tmp_path / "out"
    assert orch("export", str(a), str(out)).returncode == 0
    assert orch("export", str(a), str(out)).returncode == 0  # the same source again: fine
    before = _snapshot(out)
    line = _one_line_error(orch("export", str(b), str(out)), str(out), str(a), str(b), "--overwrite")
    assert "Traceback" not in line
    assert _snapshot(out) == before
    result = orch("export", str(b), str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    assert orch("export", str(b), str(out)).returncode == 0  # now it is b's export


@pytest.mark.reliability(category="job id", case="`orch export JOB` whose checkpoint folder was deleted",
                         lost="nothing: no folder written")
def test_export_of_a_job_whose_checkpoint_was_deleted(orch, tmp_path):
    from orchestrator.jobs.record import JobRecord
    from orchestrator.jobs.state import JobState
    from orchestrator.jobs.store import JobStore

    root = tmp_path / "store"
    ckpt = _checkpoint(root / "runs" / "p000001-pretrain" / "checkpoints" / "step-8")
    JobStore(tmp_path / "state").add([JobRecord(
        id="p000001-pretrain", pipeline_id="p000001", name="pretrain", kind="pretrain", state=JobState.SUCCEEDED,
        priority=0, depends_on=[], config={"storage": {"backend": "local", "root": f"file://{root}"}},
        checkpoint=f"file://{ckpt}", created_at=1000.0)])
    shutil.rmtree(ckpt)
    result = orch("export", "p000001-pretrain", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"))
    line = _one_line_error(result, "p000001-pretrain", f"file://{ckpt}", "is gone")
    assert "model_config.json" not in line
    assert not (tmp_path / "out").exists()
