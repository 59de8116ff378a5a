"""Unit tests of how a corpus is listed, cut and written (orchestrator/data/sources.py, tables.py,
shards.py) on a LocalStore under tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.config.schema import DataConfig
from orchestrator.data.shards import ShardWriter, _slices
from orchestrator.data.sources import is_validation, list_files, plan_units, read_unit
from orchestrator.data.tables import parquet_parts
from orchestrator.storage import open_store
from tests.corpora import write_datasets_folder, write_jsonl, write_parquet


def _cfg(tmp_path, kind="text", **kw) -> DataConfig:
    return DataConfig(**{**dict(name="d", kind=kind, uri=f"file://{tmp_path}/out", source="x", seq_len=8,
                                shard_tokens=50), **kw})


@pytest.mark.parametrize("pieces", [[7], [3, 200, 1, 49, 50], [50] * 4, [1] * 120, [0, 60, 0, 9]])
def test_shard_writer_cuts_the_stream_as_if_it_were_whole(tmp_path, pieces):
    rng = np.random.default_rng(len(pieces))
    stream = rng.integers(0, 500, size=sum(pieces)).astype("uint16")
    w = ShardWriter(open_store(f"file://{tmp_path}"), _cfg(tmp_path), "train/shard-00000")
    for start, n in zip(np.cumsum([0] + pieces[:-1]), pieces):
        w.add(stream[start : start + n])
    shards = w.close()
    expected = [stream[a : a + 50] for a in range(0, len(stream), 50)]
    expected = [(f"train/shard-00000-{i:04d}.bin", c) for i, c in enumerate(expected) if (len(c) - 1) // 8 > 0]
    assert [s["key"] for s in shards] == [k for k, _ in expected]
    for s, (_, chunk) in zip(shards, expected):
        assert (tmp_path / "out" / s["key"]).read_bytes() == chunk.tobytes()
        assert (s["tokens"], s["samples"]) == (len(chunk), (len(chunk) - 1) // 8)


def test_shard_writer_keeps_sft_rows_and_masks_together(tmp_path):
    cfg = _cfg(tmp_path, kind="sft", tokenizer_uri="x", shard_tokens=27)  # 3 rows of 9 tokens per shard
    w = ShardWriter(open_store(f"file://{tmp_path}"), cfg, "val/shard-00002")
    rows = np.arange(7 * 9, dtype="uint16").reshape(7, 9)
    masks = (rows % 2).astype("uint8")
    w.add(rows[:2], masks[:2])
    w.add(rows[2:], masks[2:])
    shards = w.close()
    assert [s["samples"] for s in shards] == [3, 3, 1]
    got = np.concatenate([np.frombuffer((tmp_path / "out" / s["key"]).read_bytes(), "uint16") for s in shards])
    mask = np.concatenate([np.frombuffer((tmp_path / "out" / s["mask_key"]).read_bytes(), "uint8") for s in shards])
    assert (got == rows.ravel()).all() and (mask == masks.ravel()).all()


def test_slices_cover_the_texts_in_order():
    texts = ["a" * n for n in (5, 1, 300, 2, 2, 2, 1000, 1)]
    pieces = list(_slices(texts, limit=10))
    assert [t for p in pieces for t in p] == texts
    assert all(sum(map(len, p)) <= 10 or len(p) == 1 for p in pieces)


def test_parquet_parts_are_runs_of_whole_row_groups(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [f"document {i} " * 20 for i in range(400)], row_group_size=40)
    store = open_store(f"file://{tmp_path}")
    parts = parquet_parts(store, f"file://{path}", path.stat().st_size, unit_bytes=path.stat().st_size // 3)
    assert parts[0][0][0] == 0 and parts[-1][0][1] == 10  # 10 row groups, all of them, in order
    assert all(a[0][1] == b[0][0] for a, b in zip(parts, parts[1:]))
    assert 3 <= len(parts) <= 5
    units = plan_units(store, f"file://{tmp_path}", 0, unit_bytes=path.stat().st_size // 3)
    assert [f.part for u in units for f in u.files] == [p for p, _ in parts]
    docs = [d for u in units for batch in read_unit(store, "", u, "text", 0) for _, d in batch]
    assert docs == [f"document {i} " * 20 for i in range(400)]


def test_a_datasets_folder_is_read_in_the_order_its_state_json_gives(tmp_path):
    folder = write_datasets_folder(tmp_path / "ds", [f"doc {i}" for i in range(30)], shards=3)
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "cache-1234.arrow").write_bytes(b"a cache file that state.json does not list")
    write_jsonl(tmp_path / "ds" / "notes" / "more.jsonl", ["more"])  # in a folder beside: read too
    files = list_files(open_store(f"file://{tmp_path}"), f"file://{folder}")
    names = [f.uri.rsplit("/", 1)[-1] for f in files]
    # sorted by URI, the folder's Arrow files where its state.json sorts (ds/notes/... < ds/state.json)
    assert names == ["more.jsonl", "data-00002-of-00003.arrow", "data-00001-of-00003.arrow",
                     "data-00000-of-00003.arrow"]


def test_the_split_is_a_hash_of_the_text_not_of_the_file():
    docs = [f"story number {i}" for i in range(2000)]
    held = [d for d in docs if is_validation(d, 0, 0.1)]
    assert 150 < len(held) < 250
    assert held == [d for d in docs if is_validation(d, 0, 0.1)]  # deterministic
    assert held != [d for d in docs if is_validation(d, 1, 0.1)]  # and a function of the seed


@pytest.mark.parametrize("name", ["web.jsonl.gz", "web.jsonl.zst", "web.parquet"])
def test_a_large_file_is_read_a_batch_at_a_time(tmp_path, name):
    """What a reader holds at once (Python objects and numpy arrays, traced) stays near the batch
    size, not the file's 9 MB of text."""
    import gzip
    import tracemalloc

    import zstandard

    docs = [f"document {i}: " + "some words of text " * 10 for i in range(40_000)]
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, docs, row_group_size=1 << 20)
    else:
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(text))
    store = open_store(f"file://{tmp_path}")
    (unit,) = plan_units(store, f"file://{path}", 0, unit_bytes=1 << 30)
    tracemalloc.start()
    try:
        count = batches = 0
        for batch in read_unit(store, "", unit, "text", 0, batch_bytes=64 << 10):
            count, batches = count + len(batch), batches + 1
            assert batch[-1][1] == docs[count - 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(docs) and batches >= 40
    assert peak < len(text) / 4, peak
