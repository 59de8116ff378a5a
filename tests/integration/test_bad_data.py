"""Bad corpora and damaged datasets, through the real CLI in a child process: one clear line naming
the file (and line) and the fix, exit 2, no traceback, and nothing written at the destination.

A corpus that cannot be read fails before any Ray cluster starts (`orch data prepare` trains the
tokenizer on the first files first), and a damaged prepared dataset fails in `orch run`'s checks,
before any worker starts; only the tests marked slow start Ray."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.corpora import (
    foreign_tokenizer,
    parquet_bytes,
    write_datasets_folder,
    write_hf_model_folder,
)
from tests.integration.test_cli import _one_line_error

CORPUS_LOST = "nothing: the destination holds no file"
DATASET_LOST = "nothing: no job recorded, the dataset left as it was"


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes ({} when there is no folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def _prepare(orch, src: Path, dst: Path, *overrides: str):
    return orch("data", "prepare", str(src), str(dst), *overrides, "--state-dir", str(dst.parent / "state"))


# ------------------------------------------------------------------------------ corpora
STORY = "Once upon a time a fox met a crow in the wood, and they talked until the evening.\n"
UTF16 = "a text saved as UTF-16, as some editors do\n".encode("utf-16")

BAD_FILES = [
    # (case, file name, content, needles)
    ("non-UTF-8 text", "notes.txt", STORY.encode() * 50 + b"\xff\xfe broken", ["notes.txt", "not UTF-8"]),
    ("UTF-16 text", "utf16.txt", UTF16, ["utf16.txt", "not UTF-8", "iconv"]),
    ("binary junk", "junk.txt", bytes(range(256)) * 40, ["junk.txt", "not UTF-8"]),
    ("NUL bytes in valid UTF-8", "padded.txt", STORY.encode() + b"\x00" * 512, ["padded.txt", "NUL", "binary"]),
    ("broken gzip", "a.txt.gz", b"this is not gzip at all", ["a.txt.gz", "not a valid gzip file"]),
    ("broken zstd", "b.txt.zst", b"this is not zstd at all", ["b.txt.zst", "not a valid zstd file"]),
    ("gzip of non-UTF-8", "c.jsonl.gz", gzip.compress(b'{"text": "\xff"}\n'), ["c.jsonl.gz", "not UTF-8"]),
    ("JSONL with a broken line", "web.jsonl", b'{"text": "fine"}\n{"text": "cut off\n{"text": "fine"}\n',
     ["web.jsonl line 2", "not valid JSON"]),
    ("JSONL line without the text field", "web.jsonl", b'{"text": "fine"}\n\n{"body": "no text"}\n',
     ["web.jsonl line 3", "'text'", "keys: body"]),
    ("JSONL text that is not a string", "web.jsonl", b'{"text": "fine"}\n{"text": 42}\n',
     ["web.jsonl line 2", "'text'"]),
    ("JSONL line that is a list", "web.jsonl", b'["text", "fine"]\n', ["web.jsonl line 1", "list"]),
    ("Parquet file without the text column", "web.parquet", parquet_bytes({"body": [STORY] * 20}),
     ["web.parquet", "no column 'text'", "columns: body", "data.text_field"]),
    ("Parquet text column that is not a string", "web.parquet", parquet_bytes({"text": list(range(20))}),
     ["web.parquet", "column 'text'", "int64", "not text", "data.text_field"]),
    ("corrupt Parquet file", "web.parquet", b"PAR1" + bytes(range(256)) * 8 + b"PAR1",
     ["web.parquet", "not a readable Parquet file"]),
    ("truncated Parquet file", "web.parquet", parquet_bytes({"text": [STORY] * 200})[:700],
     ["web.parquet", "not a readable Parquet file"]),
    ("Arrow file that is not Arrow", "web.arrow", b"not an arrow file" * 40,
     ["web.arrow", "not a readable Arrow file"]),
]


@pytest.mark.reliability(category="corpus", case="{case}", lost=CORPUS_LOST,
                         happened="one line naming the file (and line) and the fix, before any cluster starts; "
                                  "exit 2")
@pytest.mark.parametrize("case, name, content, needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_corpus_file_that_cannot_be_read(orch, tmp_path, case, name, content, needles):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "good.txt").write_text(STORY * 20)
    (src / name).write_bytes(content)
    t0 = time.monotonic()
    _one_line_error(_prepare(orch, src, tmp_path / "out"), *needles)
    assert time.monotonic() - t0 < 30  # no cluster was started for it
    assert _files(tmp_path / "out") == {}


@pytest.mark.reliability(category="corpus", case="source {what}", lost=CORPUS_LOST)
@pytest.mark.parametrize("what", ["folder that is empty", "path that does not exist", "folder of other file types"])
def test_corpus_with_nothing_to_read(orch, tmp_path, what):
    src = tmp_path / "corpus"
    if what != "path that does not exist":
        src.mkdir()
    if what == "folder of other file types":
        (src / "paper.pdf").write_bytes(b"%PDF-1.4")
        (src / "table.csv").write_text("a,b\n1,2\n")
    _one_line_error(_prepare(orch, src, tmp_path / "out"), str(src), "no .txt or .jsonl files", ".parquet")
    assert _files(tmp_path / "out") == {}


def _datasets_dict(src: Path) -> Path:
    write_datasets_folder(src / "train", [STORY] * 30)
    write_datasets_folder(src / "test", [STORY] * 3)
    (src / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return src


def _datasets_missing_file(src: Path) -> Path:
    write_datasets_folder(src, [STORY] * 30, shards=2)
    (src / "data-00001-of-00002.arrow").unlink()
    return src


@pytest.mark.reliability(category="corpus", case="a `datasets` folder: {case}", lost=CORPUS_LOST)
@pytest.mark.parametrize("case, make, needles", [
    ("a DatasetDict (several splits) given whole", _datasets_dict,
     ["DatasetDict", "splits: train, test", "give the folder of the split", "/train"]),
    ("state.json listing a file that is missing", _datasets_missing_file,
     ["state.json", "data-00001-of-00002.arrow", "missing"]),
], ids=["DatasetDict", "missing Arrow file"])
def test_datasets_folder_that_cannot_be_read(orch, tmp_path, case, make, needles):
    src = make(tmp_path / "corpus")
    _one_line_error(_prepare(orch, src, tmp_path / "out"), *needles)
    assert _files(tmp_path / "out") == {}


@pytest.mark.reliability(category="corpus", case="`orch run` with data.source={source}",
                         lost="nothing: no job recorded")
@pytest.mark.parametrize("source", ["an empty folder", "generated:nope"])
def test_run_with_a_source_that_has_nothing(orch, tmp_path, source):
    if source == "an empty folder":
        (tmp_path / "empty").mkdir()
        source = str(tmp_path / "empty")
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", f"data.source={source}",
                  "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, source)
    assert not (tmp_path / "state" / "jobs.db").exists()


@pytest.mark.slow
@pytest.mark.reliability(category="corpus", case="a single 8 MiB line and a 1 MiB JSONL line without whitespace",
                         lost="nothing",
                         happened="prepared in seconds: the tokenizer cuts runs of over 256 non-space characters "
                                  "(it took minutes, with no progress shown)")
def test_huge_lines_without_whitespace_are_prepared_quickly(orch, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "good.txt").write_text(STORY * 200)
    (src / "line.txt").write_text("x" * (8 << 20))
    letters = "".join(chr(97 + (i * 7919) % 26) for i in range(1 << 20))  # no repeats to merge cheaply
    (src / "web.jsonl").write_text(json.dumps({"text": letters}) + "\n")
    t0 = time.monotonic()
    result = _prepare(orch, src, tmp_path / "out", "data.val_fraction=0.3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - t0 < 240  # minutes before the fix; mostly Ray's start on 2 busy cores now
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # 3 documents: 8 MiB of "x" cut into 256-character words is 32,768 pieces (a few tokens each)
    assert sum(s["tokens"] for split in manifest["splits"].values() for s in split["shards"]) > 40_000


# ------------------------------------------------------------------------------ prepared datasets
@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> Path:
    """A small prepared text dataset for gpt_tiny, made in this process (no Ray): 300 stories."""
    from orchestrator.config.compose import compose_root
    from orchestrator.data.prepare import local_runner, prepare_dataset
    from orchestrator.storage import open_store

    folder = tmp_path_factory.mktemp("dataset") / "stories"
    root = compose_root(["model=gpt_tiny", "data.num_documents=300", f"state_dir={folder.parent / 'state'}"])
    uri = f"file://{folder}"
    cfg = dataclasses.replace(root.data, uri=uri, name="stories")
    prepare_dataset(open_store(uri), cfg, runner=local_runner)
    return folder


def _train_shard(m: dict) -> dict:
    return m["splits"]["train"]["shards"][0]


MANIFEST_EDITS = {
    "manifest of another format version": lambda m: m.update(format_version=99),
    "manifest whose sample counts disagree with its shards":
        lambda m: _train_shard(m).update(samples=_train_shard(m)["samples"] + 1000),
    "manifest naming a shard outside the dataset": lambda m: _train_shard(m).update(key="../../../../etc/passwd"),
    "dataset without validation samples": lambda m: m["splits"]["val"].update(shards=[]),
}


def _damage(kind: str, folder: Path) -> None:
    manifest = folder / "manifest.json"
    m = json.loads(manifest.read_text())
    shard = folder / _train_shard(m)["key"]
    if kind in MANIFEST_EDITS:
        MANIFEST_EDITS[kind](m)
        manifest.write_text(json.dumps(m))
    elif kind == "manifest that is not JSON":
        manifest.write_text("{nope")
    elif kind == "manifest that is not UTF-8":
        manifest.write_bytes(b"\xff\xfe" + manifest.read_bytes())
    elif kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif kind == "missing shard":
        shard.unlink()
    else:
        raise AssertionError(kind)


DAMAGE = [
    ("manifest that is not JSON", ["manifest.json", "not a valid manifest", "prepare the dataset again"]),
    ("manifest that is not UTF-8", ["manifest.json", "not a valid manifest"]),
    ("manifest of another format version", ["format version 99", "prepare the dataset again"]),
    ("manifest whose sample counts disagree with its shards", ["disagrees with itself", "train/shard-", "delete"]),
    ("manifest naming a shard outside the dataset", ["'../../../../etc/passwd'", "not a path inside"]),
    ("truncated shard", ["train/shard-", "1000 bytes", "truncated", "delete"]),
    ("missing shard", ["train/shard-", "missing", "delete"]),
    ("dataset without validation samples", ["no samples in split 'val'", "data.val_fraction"]),
]


@pytest.mark.reliability(category="dataset", case="{kind}", lost=DATASET_LOST,
                         happened="refused by `orch run`'s checks before any worker (or Ray) starts, in one line "
                                  "naming the file and the fix; exit 2")
@pytest.mark.parametrize("kind, needles", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_dataset_is_refused_before_training(orch, tmp_path, prepared_dataset, kind, needles):
    data = tmp_path / "stories"
    shutil.copytree(prepared_dataset, data)
    _damage(kind, data)
    before = _files(data)
    t0 = time.monotonic()
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", "data.source=null", f"data.uri=file://{data}",
                  "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, *needles)
    assert time.monotonic() - t0 < 30  # no cluster was started for it
    assert not (tmp_path / "state" / "jobs.db").exists()
    assert _files(data) == before


@pytest.mark.reliability(category="dataset", case="{what}", lost=DATASET_LOST)
@pytest.mark.parametrize("what, overrides, needles", [
    ("no dataset at data.uri and data.source=null", ["data.uri=file:///nonexistent/orch/data"],
     ["no dataset at file:///nonexistent/orch/data", "orch data prepare"]),
    ("a dataset of another seq_len", ["data.seq_len=32"], ["seq_len=64", "data.seq_len=32"]),
])
def test_dataset_that_does_not_fit_the_job(orch, tmp_path, prepared_dataset, what, overrides, needles):
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", "data.source=null", f"data.uri=file://{prepared_dataset}",
                  *overrides, "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, *needles)
    assert not (tmp_path / "state" / "jobs.db").exists()


@pytest.mark.slow
@pytest.mark.reliability(category="dataset", case="shard with a flipped byte (same size)", lost=DATASET_LOST,
                         happened="the job fails when a worker first fetches the shard: one reason naming the shard "
                                  "and its sha256 (a size check cannot see it), without using up its restarts "
                                  "(no retry can fix it); `orch run` exits 1 (a job failed)")
def test_shard_with_a_flipped_byte_fails_the_job_with_one_reason(orch, tmp_path, prepared_dataset):
    data = tmp_path / "stories"
    shutil.copytree(prepared_dataset, data)
    shard = next((data / "train").glob("*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    state = tmp_path / "state"
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", "data.source=null", f"data.uri=file://{data}",
                  "pipeline.jobs.pretrain.workers=1", "pipeline.jobs.pretrain.max_failures=2",
                  "trainer.max_steps=2", "tracking=none", "--state-dir", str(state), timeout=600,
                  env={"ORCH_LOCAL_DIR": str(tmp_path / "scratch")})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (job,) = result.status(state)
    assert job["state"] == "FAILED"
    reason = job["failure_reason"]
    assert shard.name in reason and "sha256" in reason and "\n" not in reason, reason
    assert job["restarts"] == 0 and "RESTARTING" not in [h["state"] for h in job["history"]]  # failed at once
    assert not list((state / "store" / "runs").rglob("COMMITTED.json"))  # nothing trained on it was committed
    assert os.path.getsize(shard) == len(raw)
    # `orch logs` shows the failed rank's own output, its traceback among it, and the events.
    logs = orch("logs", job["id"], "--state-dir", str(state))
    assert logs.returncode == 0, logs.stderr
    assert "[rank 0] rank 0 failed:" in logs.stdout and "[rank 0] Traceback (most recent call last):" in logs.stdout
    assert any("[rank 0] " in line and shard.name in line and "sha256" in line for line in logs.stdout.splitlines())
    assert f"{job['id']}: FAILED: " in logs.stdout
    out = orch("logs", job["id"], "--rank", "1", "--state-dir", str(state))
    assert out.returncode == 2 and "at most 1 worker(s)" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------ tokenizers
TOKENIZER_LOST = "nothing: no job recorded, no worker started"


def _hf_model(tmp_path: Path, extra_tokens: int = 0) -> Path:
    """A Hugging Face folder of gpt_tiny's shape whose tokenizer is not the dataset's (`</s>` ends a
    document); `extra_tokens` added tokens make it larger."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(foreign_tokenizer([STORY] * 50))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    return write_hf_model_folder(tmp_path / "hf-model", tok.to_str())


def _checkpoint_with_tokenizer(folder: Path, tokenizer_json: str) -> Path:
    """A committed gpt_tiny checkpoint (no usable weights: the checks read none) with its tokenizer."""
    folder.mkdir(parents=True)
    model = {"name": "gpt_tiny", "vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64,
             "dropout": 0.0, "bias": True, "activation_checkpointing": False}
    files = {"model_config.json": json.dumps(model).encode(), "tokenizer.json": tokenizer_json.encode(),
             "trainer_state.json": json.dumps({"step": 8}).encode(), "mp_rank_00_model_states.pt": b"x" * 64}
    listed = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        listed.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0})
    (folder / "COMMITTED.json").write_text(json.dumps({"step": 8, "world_size": 1, "zero_stage": 2, "files": listed,
                                                       "committed_at": time.time()}))
    return folder


@pytest.mark.reliability(category="tokenizer", case="{case}", lost=TOKENIZER_LOST,
                         happened="refused by `orch run`'s checks before any worker (or Ray) starts, in one line "
                                  "naming both tokenizers (or sizes) and the fix; exit 2")
@pytest.mark.parametrize("case", [
    "init_from a Hugging Face model, the dataset to train its own tokenizer",
    "init_from a Hugging Face model whose tokenizer is not the prepared dataset's",
    "resume_from a checkpoint whose tokenizer is not the prepared dataset's",
    "data.tokenizer_uri larger than the model's vocab_size",
])
def test_weights_and_tokenizer_that_do_not_match(orch, tmp_path, prepared_dataset, case):
    common = ["pipeline=pretrain", "model=gpt_tiny", "--state-dir", str(tmp_path / "state")]
    prepared = [f"data.uri=file://{prepared_dataset}", "data.source=null"]
    hf = _hf_model(tmp_path, extra_tokens=300 if "larger" in case else 0)
    ours, theirs = f"file://{prepared_dataset}/tokenizer.json", f"file://{hf}/tokenizer.json"
    if case.startswith("init_from a Hugging Face model, the dataset"):
        args, needles = [f"pipeline.jobs.pretrain.init_from={hf}"], ["init_from=", "would train a new one",
                                                                      f"data.tokenizer_uri=file://{hf}"]
    elif case.startswith("init_from"):
        args, needles = [*prepared, f"pipeline.jobs.pretrain.init_from={hf}"], [
            "init_from=", "another tokenizer", theirs, ours, "sha256", "data.tokenizer_uri="]
    elif case.startswith("resume_from"):
        ckpt = _checkpoint_with_tokenizer(tmp_path / "run" / "checkpoints" / "step-8",
                                          (hf / "tokenizer.json").read_text())
        args, needles = [*prepared, f"pipeline.jobs.pretrain.resume_from={ckpt}"], [
            "resume_from=", "another tokenizer", f"{ckpt}/tokenizer.json", ours]
    else:
        args, needles = [f"data.tokenizer_uri={hf}"], [str(hf), "tokens but model 'gpt_tiny' has vocab_size=512",
                                                       "model.vocab_size>="]
    t0 = time.monotonic()
    _one_line_error(orch("run", *common, *args), *needles)
    assert time.monotonic() - t0 < 30  # no cluster was started for it
    assert not (tmp_path / "state" / "jobs.db").exists()
