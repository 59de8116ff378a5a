"""Preparing Parquet files, Arrow files and Hugging Face `datasets` folders, and reusing a tokenizer:
the same text gives the same shards whatever its format; a Parquet file many times the memory budget
is streamed; a Hugging Face folder's tokenizer.json is reused byte for byte. Files are made on the
fly (tests/corpora.py). The fast tests prepare in this process (`local_runner`, what each Ray task
runs); the slow one runs `orch data prepare` with Ray tasks on a real S3 endpoint."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import tokenizer_from_json
from orchestrator.config.schema import DataConfig
from orchestrator.data.corpus import stories
from orchestrator.data.manifest import Manifest, load_manifest
from orchestrator.data.prepare import local_runner, prepare_dataset
from orchestrator.storage import join_uri, open_store
from tests.corpora import (
    foreign_tokenizer,
    parquet_bytes,
    write_datasets_folder,
    write_feather,
    write_hf_model_folder,
    write_jsonl,
    write_parquet,
)

REPO = Path(__file__).resolve().parents[2]
DOCS = stories(0, 600, seed=3)


def _config(src: str, dst: str, **kw) -> DataConfig:
    base = dict(name=dst.rstrip("/").rsplit("/", 1)[-1], kind="text", uri=dst, source=src, seq_len=32, vocab_size=300,
                shard_tokens=2048, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def _prepare(src: Path | str, dst: Path, **kw) -> Manifest:
    uri = f"file://{dst}"
    source = src if isinstance(src, str) else f"file://{src}"
    return prepare_dataset(open_store(uri), _config(source, uri, **kw), runner=local_runner)


def _shards(m: Manifest) -> dict[str, list[tuple[str, str]]]:
    return {name: [(s.key, s.sha256) for s in split.shards] for name, split in m.splits.items()}


def _documents(store, uri: str, m: Manifest, eot: str) -> tuple[Counter, int]:
    """The documents in the dataset's shards, decoded, and how many token streams (one per unit and
    split) they came from. A stream's last piece is cut when its final shard was too short for a
    sample (it is not kept): only whole documents, ended by `eot`, are counted."""
    tok = tokenizer_from_json(store.get(join_uri(uri, m.tokenizer_key)).decode())
    streams: dict[str, str] = {}
    for split in m.splits.values():
        for s in split.shards:
            ids = np.frombuffer(store.get(join_uri(uri, s.key)), dtype=m.dtype).tolist()
            stream = s.key.rsplit("-", 1)[0]  # train/shard-00003
            streams[stream] = streams.get(stream, "") + tok.decode(ids, skip_special_tokens=False)
    docs = Counter(d for text in streams.values() for d in text.split(eot)[:-1])
    return docs, len(streams)


def _all_documents_kept(got: tuple[Counter, int]) -> None:
    docs, streams = got
    assert not docs - Counter(DOCS)  # nothing that is not a document, nothing twice
    assert sum(docs.values()) >= len(DOCS) - streams  # at most the tail of each stream cut


def test_parquet_arrow_datasets_folder_and_jsonl_give_the_same_shards(tmp_path):
    sources = {
        "jsonl": write_jsonl(tmp_path / "jsonl" / "web.jsonl", DOCS).parent,
        "parquet": write_parquet(tmp_path / "parquet" / "web.parquet", DOCS, column="body", row_group_size=100).parent,
        "feather": write_feather(tmp_path / "feather" / "web.arrow", DOCS).parent,
        "datasets": write_datasets_folder(tmp_path / "hf" / "train", DOCS, shards=3),
    }
    made = {name: _prepare(src, tmp_path / f"out-{name}", text_field="body" if name == "parquet" else "text")
            for name, src in sources.items()}
    expected = made["jsonl"]
    assert expected.splits["val"].samples and expected.splits["train"].samples
    for name, m in made.items():
        assert (m.tokenizer_sha256, _shards(m)) == (expected.tokenizer_sha256, _shards(expected)), name

    # A Parquet file larger than data.unit_mb is cut into runs of row groups, one task each: other
    # shard boundaries, the same documents in the same splits.
    cut = _prepare(sources["parquet"], tmp_path / "out-cut", text_field="body", unit_mb=0.02)
    assert len({s.key.split("-")[1] for split in cut.splits.values() for s in split.shards}) >= 3
    store = open_store(f"file://{tmp_path}")
    _all_documents_kept(_documents(store, f"file://{tmp_path}/out-cut", cut, "<|endoftext|>"))
    assert cut.splits["val"].tokens == expected.splits["val"].tokens


def test_a_tokenizer_reused_from_a_hugging_face_folder(tmp_path):
    hf = write_hf_model_folder(tmp_path / "hf-model", foreign_tokenizer(DOCS[:300]))
    hf_bytes = (hf / "tokenizer.json").read_bytes()
    src = write_parquet(tmp_path / "corpus" / "web.parquet", DOCS, row_group_size=200).parent
    m = _prepare(src, tmp_path / "web", tokenizer_uri=str(hf))
    store, uri = open_store(f"file://{tmp_path}"), f"file://{tmp_path}/web"

    assert m.tokenizer_sha256 == hashlib.sha256(hf_bytes).hexdigest()
    assert (tmp_path / "web" / m.tokenizer_key).read_bytes() == hf_bytes  # kept as read: checkpoints carry it
    tok = tokenizer_from_json(hf_bytes.decode())
    assert (m.vocab_size, m.eot_id) == (tok.get_vocab_size(), tok.token_to_id("</s>"))  # eos of tokenizer_config
    assert m.extra["tokenizer_from"] == f"file://{hf}/tokenizer.json"
    _all_documents_kept(_documents(store, uri, m, "</s>"))

    # The same tokenizer reached through the prepared dataset, or as the file itself: the same dataset.
    again = _prepare(write_jsonl(tmp_path / "jsonl" / "web.jsonl", DOCS).parent, tmp_path / "web2",
                     tokenizer_uri=uri)
    by_file = _prepare(src, tmp_path / "web3", tokenizer_uri=str(hf / "tokenizer.json"))
    assert again.tokenizer_sha256 == by_file.tokenizer_sha256 == m.tokenizer_sha256
    assert _shards(again) == _shards(by_file) == _shards(m)


MEASURE = textwrap.dedent("""
    import json, sys, time, tracemalloc
    import numpy, pyarrow as pa, pyarrow.parquet  # (imported before the baseline, as a task has them)
    from model.tokenizer import tokenizer_from_json
    from orchestrator.config.schema import DataConfig
    from orchestrator.data.prepare import local_runner, prepare_dataset
    from orchestrator.storage import open_store

    src, dst, tok, budget = sys.argv[1:5]
    tokenizer_from_json(open(tok[len("file://"):]).read()).encode_batch(["warm up the encoder"] * 64)
    def status(key):  # this process's current (VmRSS) or peak (VmHWM) resident memory, in bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from here (ru_maxrss would keep pytest's, inherited through fork)
    base = status("VmRSS")
    tracemalloc.start()  # Python objects and numpy arrays
    t0 = time.monotonic()
    cfg = DataConfig(name="big", kind="text", uri=dst, source=src, seq_len=64, tokenizer_uri=tok,
                     read_batch_mb=float(budget), shard_tokens=1 << 16, val_fraction=0.01)
    m = prepare_dataset(open_store(dst), cfg, runner=local_runner)
    print(json.dumps({"rss_base": base, "rss_growth": status("VmHWM") - base,
                      "python_peak": tracemalloc.get_traced_memory()[1],
                      "arrow_peak": pa.default_memory_pool().max_memory(), "seconds": time.monotonic() - t0,
                      "tokens": m.splits["train"].tokens + m.splits["val"].tokens}))
""")


def test_a_parquet_file_many_times_the_memory_budget_is_streamed(tmp_path):
    """8 MB of text in one row group, read and tokenized under a 0.125 MB budget: what the task holds
    stays near the budget (a whole-file read holds the 8 MB; the old whole-unit encoding ~40x that)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = stories(0, 2000, seed=5)
    docs = [f"{base[i % len(base)]} ({i})" for i in range(26_000)]
    text_bytes = sum(len(d) for d in docs)
    src = write_parquet(tmp_path / "big" / "web.parquet", docs, row_group_size=1 << 20)  # one row group
    # A word-level tokenizer: tokenizing fast is not what is measured here
    words = sorted({w for d in base for w in d.replace(".", " . ").replace(",", " , ").split()})
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    budget_mb = 0.125
    out = subprocess.run([sys.executable, "-c", MEASURE, f"file://{src}", f"file://{tmp_path}/out",
                          f"file://{tmp_path}/tokenizer.json", str(budget_mb)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nParquet: {src.stat().st_size / 1e6:.1f} MB file, {text_bytes / 1e6:.1f} MB text, budget {budget_mb} MB: "
          f"Python+numpy peak {got['python_peak'] / 1e6:.2f} MB, Arrow peak {got['arrow_peak'] / 1e6:.2f} MB, "
          f"peak RSS growth {got['rss_growth'] / 1e6:.1f} MB (from {got['rss_base'] / 1e6:.0f} MB), "
          f"{got['tokens']:,} tokens in {got['seconds']:.1f} s")
    assert src.stat().st_size > 8 * budget_mb * 1e6 and text_bytes > 60 * budget_mb * 1e6
    assert got["python_peak"] < text_bytes / 4  # documents and token arrays: a batch at a time
    assert got["arrow_peak"] < text_bytes * 3 / 4  # pyarrow's buffers: a few pages, not the column
    assert got["rss_growth"] < 16 * text_bytes  # all of it, native tokenizer memory too (whole-unit encoding: ~50x)


@pytest.mark.slow
def test_prepare_parquet_and_a_datasets_folder_in_s3_with_ray_tasks(orch, tmp_path, s3_server):
    """`orch data prepare` from S3: a Parquet file cut into row-group parts and a `datasets` folder,
    tokenized by Ray tasks with the tokenizer of a local Hugging Face folder, written to S3."""
    hf = write_hf_model_folder(tmp_path / "hf-model", foreign_tokenizer(DOCS[:300]))
    write_parquet(tmp_path / "raw" / "a" / "web.parquet", DOCS[:400], row_group_size=50)
    write_datasets_folder(tmp_path / "raw" / "b", DOCS[400:], shards=2)
    bucket = s3_server.make_bucket("tables")
    client = s3_server.client()
    for p in (tmp_path / "raw").rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"raw/{p.relative_to(tmp_path / 'raw').as_posix()}")
    dst = f"s3://{bucket}/datasets/web"
    result = orch("data", "prepare", f"s3://{bucket}/raw/", dst, f"data.tokenizer_uri={hf}", "data.unit_mb=0.02",
                  "data.seq_len=32", "data.shard_tokens=2048", "data.val_fraction=0.1", "storage=s3",
                  f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3_server.endpoint_url}",
                  "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    store = open_store(dst, endpoint_url=s3_server.endpoint_url)
    m = load_manifest(store, dst)
    assert m.tokenizer_sha256 == hashlib.sha256((hf / "tokenizer.json").read_bytes()).hexdigest()
    units = {s.key.split("-")[1] for split in m.splits.values() for s in split.shards}
    assert len(units) >= 4  # the Parquet file in several parts, and the folder's Arrow files: one task each
    _all_documents_kept(_documents(store, dst, m, "</s>"))


def test_weights_that_came_with_the_datasets_tokenizer_pass_the_checks(tmp_path):
    """The other side of the refusals in test_bad_data.py: `init_from` a Hugging Face folder whose
    tokenizer the dataset reuses passes `orch run`'s checks, before and after the dataset is prepared."""
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.execution.preflight import check_job_inputs, preflight

    hf = write_hf_model_folder(tmp_path / "hf-model", foreign_tokenizer(DOCS[:300]))
    src = write_parquet(tmp_path / "corpus" / "web.parquet", DOCS).parent
    root = compose_root(["pipeline=pretrain", "model=gpt_tiny", f"pipeline.jobs.pretrain.init_from={hf}",
                         f"data.source={src}", f"data.tokenizer_uri={hf}", "data.seq_len=32",
                         f"state_dir={tmp_path / 'state'}", f"storage.root=file://{tmp_path}/store"])
    (job,) = resolve_jobs(root)
    preflight([job])  # the dataset is still to be prepared: data.tokenizer_uri is compared
    prepare_dataset(open_store(job.data.uri), job.data, runner=local_runner)
    check_job_inputs(job, job.init_from)  # what the runner checks: the prepared dataset's tokenizer
    preflight([job])


def test_fine_tuning_pairs_from_parquet_match_jsonl(tmp_path):
    """sft data as Parquet columns (prompt/response) gives the shards and masks JSONL gives."""
    from orchestrator.data.corpus import qa

    pairs = qa(0, 300, seed=1)
    tok_src = _prepare(write_jsonl(tmp_path / "corpus" / "web.jsonl", DOCS).parent, tmp_path / "text")
    assert tok_src.splits["train"].samples
    jsonl = tmp_path / "pairs-jsonl" / "pairs.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    parquet = tmp_path / "pairs-parquet" / "pairs.parquet"
    parquet.parent.mkdir()
    parquet.write_bytes(parquet_bytes({"prompt": [p["prompt"] for p in pairs],
                                       "response": [p["response"] for p in pairs]}, row_group_size=64))
    made = [_prepare(src.parent, tmp_path / f"sft-{i}", kind="sft", seq_len=48, tokenizer_uri=f"file://{tmp_path}/text")
            for i, src in enumerate((jsonl, parquet))]
    assert made[0].splits["train"].samples > 200
    jsonl_shards, parquet_shards = ([(s.key, s.sha256, s.mask_sha256) for split in m.splits.values()
                                     for s in split.shards] for m in made)
    assert jsonl_shards == parquet_shards


def test_the_default_pipeline_passes_the_checks_before_its_datasets_exist(tmp_path):
    """The fine-tune's data reuses the tokenizer of the pretraining dataset, which the pretrain job
    prepares: at submit there is none yet, and that is no reason to refuse (the runner checks it)."""
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.execution.preflight import preflight

    jobs = resolve_jobs(compose_root(["model=gpt_tiny", f"state_dir={tmp_path / 'state'}",
                                      f"storage.root=file://{tmp_path}/store"]))
    assert [j.data.kind for j in jobs] == ["text", "sft", "sft"]  # (the fine-tune and its from-scratch baseline)
    preflight(jobs)


def test_a_local_corpus_prepared_into_s3(tmp_path, s3_server):
    """The source on another store than the dataset (README: `orch data prepare ./my-texts s3://...`):
    listed and read locally, written to S3, through one store that routes each URI by its scheme."""
    bucket = s3_server.make_bucket("local-to-s3")
    dst = f"s3://{bucket}/datasets/web"
    src = write_parquet(tmp_path / "corpus" / "web.parquet", DOCS, row_group_size=100).parent
    store = open_store(dst, endpoint_url=s3_server.endpoint_url)
    m = prepare_dataset(store, _config(f"file://{src}", dst, unit_mb=0.02), runner=local_runner)
    local = _prepare(write_jsonl(tmp_path / "jsonl" / "web.jsonl", DOCS).parent, tmp_path / "local", unit_mb=0.02)
    assert m.tokenizer_sha256 == local.tokenizer_sha256
    _all_documents_kept(_documents(store, dst, m, "<|endoftext|>"))
