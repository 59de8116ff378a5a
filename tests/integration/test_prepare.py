"""`orch data prepare SRC DST`: a corpus of .txt/.jsonl(.gz/.zst) files, local or in S3 (a real S3
HTTP endpoint on loopback), tokenized by Ray tasks into shards plus a manifest; then trained on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from model.tokenizer import tokenizer_from_json
from orchestrator.data.corpus import stories
from orchestrator.data.manifest import load_manifest
from orchestrator.storage import join_uri, open_store

pytestmark = pytest.mark.slow


def _write_corpus(folder: Path) -> list[str]:
    """Four files in four formats; returns every document."""
    folder.mkdir(parents=True)
    docs = stories(0, 1200, seed=7)
    parts = [docs[0:300], docs[300:600], docs[600:900], docs[900:1200]]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in parts[0]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": d}) + "\n" for d in parts[1]).encode()))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in parts[2]).encode()))
    sub = folder / "txt"
    sub.mkdir()
    for i, d in enumerate(parts[3]):
        (sub / f"doc{i:04d}.txt").write_text(d)
    (folder / "README.md").write_text("not part of the corpus")
    return docs


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(source URI, destination URI, storage overrides, store) on the local backend or on S3."""
    src_dir = tmp_path / "corpus"
    docs = _write_corpus(src_dir)
    if request.param == "local":
        dst = f"file://{tmp_path}/datasets/web"
        return {"src": str(src_dir), "dst": dst, "overrides": [], "store": open_store(dst), "docs": docs}
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.make_bucket("prep")
    client = s3.client()
    for p in src_dir.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"raw/{p.relative_to(src_dir).as_posix()}")
    dst = f"s3://{bucket}/datasets/web"
    overrides = ["storage=s3", f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3.endpoint_url}"]
    return {"src": f"s3://{bucket}/raw/", "dst": dst, "overrides": overrides,
            "store": open_store(dst, endpoint_url=s3.endpoint_url), "docs": docs}


def test_prepare_round_trip_and_rerun(where, orch, tmp_path):
    args = ("data", "prepare", where["src"], where["dst"], "data.unit_mb=0.03", "data.vocab_size=300",
            "data.seq_len=32", "data.shard_tokens=4096", "data.val_fraction=0.1", *where["overrides"],
            "--state-dir", str(tmp_path / "state"))
    result = orch(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MB/s" in result.stdout and "documents" in result.stdout and "tokens" in result.stdout

    store, dst = where["store"], where["dst"]
    m = load_manifest(store, dst)
    assert (m.kind, m.seq_len, m.dtype, m.format_version) == ("text", 32, "uint16", 1)
    units = {s.key.split("-")[1] for split in m.splits.values() for s in split.shards}
    assert len(units) >= 3  # the corpus was cut into several units, tokenized as separate tasks
    tok = tokenizer_from_json(store.get(join_uri(dst, m.tokenizer_key)).decode())
    assert tok.get_vocab_size() == m.vocab_size <= 300

    # Every document is in exactly one split, intact, and each shard matches its manifest entry.
    decoded = []
    for split in m.splits.values():
        for s in split.shards:
            data = store.get(join_uri(dst, s.key))
            assert len(data) == s.bytes and s.tokens == len(data) // 2 and s.samples == (s.tokens - 1) // 32
            import hashlib

            assert hashlib.sha256(data).hexdigest() == s.sha256
            decoded.append(tok.decode(np.frombuffer(data, dtype=np.uint16).tolist(), skip_special_tokens=False))
    got = [d for text in decoded for d in text.split("<|endoftext|>") if d]
    # shards cut the token stream at fixed sizes, so a document may straddle two shards: compare
    # the whole stream instead of per-shard pieces
    stream = "".join(decoded).split("<|endoftext|>")
    assert sorted(d for d in stream if d) == sorted(where["docs"])
    assert got

    # Re-running is safe: it finds the same dataset and rewrites nothing.
    before = {o.uri: o.size for o in store.list(dst + "/")}
    again = orch(*args)
    assert again.returncode == 0 and "using the prepared dataset" in again.stdout
    assert {o.uri: o.size for o in store.list(dst + "/")} == before

    # Other settings at the same place are refused, never overwritten.
    other = orch(*args[:-2], "data.seq_len=16", "--state-dir", str(tmp_path / "state"))
    assert other.returncode == 2 and "different dataset already exists" in other.stderr


def test_train_on_a_prepared_dataset(orch, tmp_path):
    src = tmp_path / "corpus"
    _write_corpus(src)
    dst = f"file://{tmp_path}/datasets/web"
    assert orch("data", "prepare", str(src), dst, "data.vocab_size=512").returncode == 0
    state = str(tmp_path / "state")
    common = ("pipeline=pretrain", "model=gpt_tiny", f"data.uri={dst}", "data.source=null", "--state-dir", state)
    # A job asking for another sequence length than the dataset has: refused before anything starts.
    bad = orch("run", *common, "data.seq_len=32")
    assert bad.returncode == 2 and "seq_len=64" in bad.stderr and "data.seq_len=32" in bad.stderr
    # Nothing at data.uri and no source to make it from.
    missing = orch("run", *common[:2], f"data.uri=file://{tmp_path}/nothing", "data.source=null", "--state-dir", state)
    assert missing.returncode == 2 and "orch data prepare" in missing.stderr
    ok = orch("run", *common, "trainer.max_steps=6", "trainer.log_interval=2", "tracking=none")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "using the prepared dataset" in ok.stdout


def test_bad_corpora_fail_in_one_line(orch, tmp_path, s3_server):
    def one_line(result, *needles):
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        for n in needles:
            assert n in lines[0], lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(orch("data", "prepare", str(empty), f"file://{tmp_path}/out1"), "no .txt or .jsonl files", str(empty))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    one_line(orch("data", "prepare", str(blank), f"file://{tmp_path}/out2"), "no training samples")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    one_line(orch("data", "prepare", str(broken), f"file://{tmp_path}/out3"), "a.jsonl line 2", "'text'")
    one_line(orch("data", "prepare", str(broken), "s3://no-such-bucket-prep/ds", "storage=s3",
                  f"storage.endpoint_url={s3_server.endpoint_url}"), "no-such-bucket-prep")
    one_line(orch("data", "prepare", str(broken)), "SRC and DST")


def test_two_jobs_needing_one_dataset_prepare_it_once(tmp_path):
    """Two runners that need one dataset (one `data.uri`) at the same moment: one prepares it, the
    other waits for it and uses it. (Prepared at once into one folder, one's clearing of leftovers
    deleted the shards the other's manifest names: a sweep's job failed on a missing shard.)"""
    import threading

    import ray

    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.execution.prepare_once import prepare_dataset_once

    root = compose_root(["pipeline=pretrain", f"storage.root=file://{tmp_path}/store", "data.num_documents=20000",
                         "tracking=none"])
    job = resolve_jobs(root)[0]
    lines: list[list[str]] = []
    ray.init(address="local", num_cpus=2,  # (a new cluster even while another test's runs)
             include_dashboard=False, configure_logging=False)
    try:
        start = threading.Barrier(2)

        def prepare():
            start.wait()
            lines.append(prepare_dataset_once(job))

        threads = [threading.Thread(target=prepare) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        ray.shutdown()
    assert len(lines) == 2, lines
    trained = [ls for ls in lines if any("byte-level BPE tokenizer" in line for line in ls)]
    assert len(trained) == 1 and any("using the prepared dataset" in line for line in lines[1] + lines[0]), lines
    store = open_store(job.data.uri)
    m = load_manifest(store, job.data.uri)
    for split in m.splits.values():
        for shard in split.shards:
            assert store.exists(join_uri(job.data.uri, shard.key)), shard
