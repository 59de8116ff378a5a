"""Unit tests of dataset preparation and reading (orchestrator/data/prepare.py, manifest.py,
reader.py) on a LocalStore under tmp_path, with small generated and file corpora."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import EOT_TOKEN, tokenizer_from_json
from orchestrator.config.schema import DataConfig
from orchestrator.constants import MANIFEST
from orchestrator.data.corpus import generate_qa, generate_stories
from orchestrator.data.manifest import Manifest, load_manifest, manifest_uri, try_load_manifest
from orchestrator.data.prepare import prepare_dataset
from orchestrator.data.reader import IGNORE_INDEX, SplitReader
from orchestrator.errors import DatasetError, StorageError
from orchestrator.storage import join_uri, local_path, open_store

SEQ_LEN = 32
SFT_SEQ_LEN = 47  # the generated pairs are 40-55 tokens with a 300-token vocabulary: some fit, some are cut
NUM_DOCS = 200


def text_config(root: str, **kw) -> DataConfig:
    base = dict(name="stories", kind="text", uri=f"{root}/datasets/stories", source="generated:stories",
                seq_len=SEQ_LEN, vocab_size=300, num_documents=NUM_DOCS, shard_tokens=2048)
    return DataConfig(**{**base, **kw})


def sft_config(root: str, **kw) -> DataConfig:
    base = dict(name="qa", kind="sft", uri=f"{root}/datasets/qa", source="generated:qa", seq_len=SFT_SEQ_LEN,
                num_documents=NUM_DOCS, shard_tokens=2048, tokenizer_uri=f"{root}/datasets/stories")
    return DataConfig(**{**base, **kw})


def tokenizer_of(store, uri: str, manifest: Manifest):
    return tokenizer_from_json(store.get(join_uri(uri, manifest.tokenizer_key)).decode())


def files_with_mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def forbid_puts(monkeypatch, store) -> None:
    def put(uri, data):
        raise AssertionError(f"unexpected write to {uri}")
    monkeypatch.setattr(store, "put", put)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A text dataset and an sft dataset using its tokenizer, prepared once for the read-only tests."""
    base = tmp_path_factory.mktemp("datasets")
    root = f"file://{base}/store"
    store = open_store(root)
    text, sft = text_config(root), sft_config(root)
    return dict(base=base, root=root, store=store, text=text, sft=sft,
                text_manifest=prepare_dataset(store, text), sft_manifest=prepare_dataset(store, sft))


@pytest.fixture
def copied(prepared, tmp_path):
    """A private copy of the prepared store, safe to corrupt."""
    shutil.copytree(prepared["base"] / "store", tmp_path / "store")
    root = f"file://{tmp_path}/store"
    return dict(root=root, store=open_store(root), text=text_config(root), sft=sft_config(root),
                text_manifest=prepared["text_manifest"], sft_manifest=prepared["sft_manifest"])


# ------------------------------------------------------------------------------ text round trip
def test_text_manifest_describes_the_shards(prepared):
    m, store, uri = prepared["text_manifest"], prepared["store"], prepared["text"].uri
    assert (m.kind, m.seq_len, m.dtype, m.source) == ("text", SEQ_LEN, "uint16", "generated:stories")
    assert m.vocab_size <= 300 and m.eot_id == 0
    assert m.splits["train"].samples > 0 and m.splits["val"].samples > 0
    assert len(m.splits["train"].shards) >= 2
    for split in m.splits.values():
        for shard in split.shards:
            data = store.get(join_uri(uri, shard.key))
            assert len(data) == shard.bytes == shard.tokens * 2
            assert shard.samples == (shard.tokens - 1) // SEQ_LEN
    # The manifest round-trips through its JSON.
    assert Manifest.from_json(m.to_json(), "x") == m
    assert load_manifest(store, uri) == m


def test_text_samples_decode_to_the_corpus(prepared, tmp_path):
    store, uri, m = prepared["store"], prepared["text"].uri, prepared["text_manifest"]
    docs = set(generate_stories(NUM_DOCS, 0))
    tok = tokenizer_of(store, uri, m)
    for split in ("train", "val"):
        reader = SplitReader(store, uri, m, split, tmp_path / "cache")
        assert reader.num_samples == m.splits[split].samples
        first_shard = m.splits[split].shards[0].samples
        samples = [reader.sample(i)[0] for i in range(first_shard)]
        assert all(len(s) == SEQ_LEN + 1 for s in samples)
        assert all(int(s.max()) < m.vocab_size for s in samples)
        # Within a shard, consecutive samples share one token (the last target is the next input).
        for a, b in zip(samples, samples[1:]):
            assert a[-1] == b[0]
        stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
        pieces = tok.decode(stream.tolist(), skip_special_tokens=False).split(EOT_TOKEN)
        # The shard starts at a document boundary: every piece but the cut-off last one is a whole story.
        assert len(pieces) > 3
        for piece in pieces[:-1]:
            assert piece in docs, f"{split}: decoded text is not a document of the corpus: {piece[:60]!r}"
        assert any(d.startswith(pieces[-1]) for d in docs)


def test_text_batch_targets_are_inputs_shifted_by_one(prepared, tmp_path):
    store, uri, m = prepared["store"], prepared["text"].uri, prepared["text_manifest"]
    reader = SplitReader(store, uri, m, "train", tmp_path / "cache")
    indices = [0, 5, reader.num_samples - 1, m.splits["train"].shards[0].samples]  # across shards too
    x, y = reader.batch(indices)
    assert tuple(x.shape) == tuple(y.shape) == (len(indices), SEQ_LEN)
    assert str(x.dtype) == str(y.dtype) == "torch.int64"
    for row, i in enumerate(indices):
        tokens = reader.sample(i)[0].astype(np.int64)
        np.testing.assert_array_equal(x[row].numpy(), tokens[:-1])
        np.testing.assert_array_equal(y[row].numpy(), tokens[1:])
    assert (y != IGNORE_INDEX).all()  # pretraining masks nothing


def test_ignore_index_matches_the_model():
    from model.gpt import IGNORE_INDEX as MODEL_IGNORE_INDEX

    assert IGNORE_INDEX == MODEL_IGNORE_INDEX == -100


# ------------------------------------------------------------------------------ sft
def test_sft_targets_mask_prompt_and_padding(prepared, tmp_path):
    store, uri, m = prepared["store"], prepared["sft"].uri, prepared["sft_manifest"]
    text_m = prepared["text_manifest"]
    assert m.kind == "sft" and m.seq_len == SFT_SEQ_LEN
    assert m.tokenizer_sha256 == text_m.tokenizer_sha256  # the pretraining tokenizer, reused
    tok = tokenizer_of(store, uri, m)
    examples = {(e["prompt"], e["response"]) for e in generate_qa(NUM_DOCS, 0)}
    reader = SplitReader(store, uri, m, "train", tmp_path / "cache")
    assert reader.num_samples == m.splits["train"].samples > 50
    x, y = reader.batch(range(reader.num_samples))
    x, y = x.numpy(), y.numpy()
    padded = truncated = 0
    for row in range(reader.num_samples):
        real = np.flatnonzero(y[row] != IGNORE_INDEX)
        assert len(real) > 0
        start, end = real[0], real[-1] + 1
        np.testing.assert_array_equal(real, np.arange(start, end), err_msg="trained targets are not one run")
        prompt = tok.decode(x[row, : start + 1].tolist(), skip_special_tokens=False)
        trained = y[row, start:end].tolist()
        if trained[-1] == m.eot_id:  # the whole response and its EOT, then padding
            response = tok.decode(trained[:-1], skip_special_tokens=False)
            assert (prompt, response) in examples, (prompt, response)
            # Padding: every position after the EOT is EOT in the inputs and ignored in the targets.
            assert (x[row, end:] == m.eot_id).all()
            padded += end < SFT_SEQ_LEN
        else:  # cut at seq_len + 1 tokens: a prefix of the response is trained on, up to the end
            assert end == SFT_SEQ_LEN
            response = tok.decode(trained, skip_special_tokens=False)
            assert any(p == prompt and r.startswith(response) for p, r in examples), (prompt, response)
            truncated += 1
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        assert EOT_TOKEN not in prompt
    # At this seq_len the generated set has both kinds, so both branches above were checked.
    assert padded > 0 and truncated > 0, (padded, truncated)


def test_sft_without_its_tokenizer_dataset_names_the_uri(tmp_path):
    root = f"file://{tmp_path}/store"
    cfg = sft_config(root, tokenizer_uri=f"{root}/datasets/never-prepared")
    with pytest.raises(DatasetError, match="never-prepared"):
        prepare_dataset(open_store(root), cfg)


# ------------------------------------------------------------------------------ atomicity and reuse
def test_manifest_is_written_last(tmp_path, monkeypatch):
    root = f"file://{tmp_path}/store"
    store = open_store(root)
    cfg = text_config(root)
    real_put = store.put_file
    shard_puts = []

    def failing_put(uri, path):
        if "/shard-" in uri:
            shard_puts.append(uri)
            if len(shard_puts) == 2:
                raise StorageError(f"injected failure writing {uri}")
        real_put(uri, path)

    monkeypatch.setattr(store, "put_file", failing_put)
    with pytest.raises(StorageError, match="injected"):
        prepare_dataset(store, cfg)
    assert len(shard_puts) == 2  # it did crash half-way, after a shard was written ...
    assert not store.exists(manifest_uri(cfg.uri))  # ... and left no dataset behind
    assert not store.exists(shard_puts[0])  # (the destination was empty: what it wrote was removed)
    assert try_load_manifest(store, cfg.uri) is None
    with pytest.raises(DatasetError, match="missing"):
        load_manifest(store, cfg.uri)

    monkeypatch.undo()
    manifest = prepare_dataset(store, cfg)  # a re-run overwrites the leftovers
    assert load_manifest(store, cfg.uri) == manifest
    for split in ("train", "val"):
        reader = SplitReader(store, cfg.uri, manifest, split, tmp_path / "cache")
        x, y = reader.batch(range(reader.num_samples))  # every shard passes its checksum
        assert tuple(x.shape) == (reader.num_samples, SEQ_LEN)


@pytest.mark.parametrize("kind", ["text", "sft"])
def test_rerun_with_the_same_config_reuses_the_dataset(prepared, monkeypatch, kind):
    store, cfg, manifest = prepared["store"], prepared[kind], prepared[f"{kind}_manifest"]
    before = files_with_mtimes(prepared["base"])
    forbid_puts(monkeypatch, store)
    messages = []
    again = prepare_dataset(store, cfg, progress=messages.append)
    assert again == manifest and again.signature == manifest.signature
    assert files_with_mtimes(prepared["base"]) == before
    assert any("using the prepared dataset" in msg for msg in messages)


@pytest.mark.parametrize("change", [dict(seq_len=16), dict(vocab_size=320), dict(num_documents=150), dict(seed=1)])
def test_different_settings_at_the_same_uri_are_refused(prepared, monkeypatch, change):
    store, cfg = prepared["store"], prepared["text"]
    before = files_with_mtimes(prepared["base"])
    forbid_puts(monkeypatch, store)
    with pytest.raises(DatasetError) as info:
        prepare_dataset(store, dataclasses.replace(cfg, **change))
    assert cfg.uri in str(info.value) and "\n" not in str(info.value)
    assert files_with_mtimes(prepared["base"]) == before


def test_same_settings_at_another_uri_prepare_the_same_bytes(prepared, tmp_path):
    root = f"file://{tmp_path}/store"
    store = open_store(root)
    manifest = prepare_dataset(store, text_config(root))
    assert manifest == prepared["text_manifest"]  # deterministic: same signature, same shard hashes


# ------------------------------------------------------------------------------ corruption
def _shard_path(root: str, dataset: str, key: str) -> Path:
    return Path(local_path(f"{root}/datasets/{dataset}/{key}"))


def test_corrupted_shard_is_detected(copied, tmp_path):
    m, cfg = copied["text_manifest"], copied["text"]
    shard = m.splits["train"].shards[1]
    path = _shard_path(copied["root"], "stories", shard.key)
    data = bytearray(path.read_bytes())
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
    path.write_bytes(bytes(data))
    reader = SplitReader(copied["store"], cfg.uri, m, "train", tmp_path / "fresh-cache")
    reader.sample(0)  # shard 0 is intact
    with pytest.raises(DatasetError) as info:
        reader.sample(m.splits["train"].shards[0].samples)  # first sample of shard 1
    assert join_uri(cfg.uri, shard.key) in str(info.value) and "corrupt" in str(info.value)
    assert not (tmp_path / "fresh-cache" / m.signature / shard.key).exists()  # the bad copy is not kept


def test_truncated_shard_is_detected(copied, tmp_path):
    m, cfg = copied["text_manifest"], copied["text"]
    shard = m.splits["train"].shards[0]
    path = _shard_path(copied["root"], "stories", shard.key)
    with open(path, "r+b") as f:
        f.truncate(shard.bytes // 2)
    reader = SplitReader(copied["store"], cfg.uri, m, "train", tmp_path / "fresh-cache")
    with pytest.raises(DatasetError, match=join_uri(cfg.uri, shard.key)):
        reader.sample(0)


def test_corrupted_sft_mask_is_detected(copied, tmp_path):
    m, cfg = copied["sft_manifest"], copied["sft"]
    shard = m.splits["train"].shards[0]
    path = _shard_path(copied["root"], "qa", shard.mask_key)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    reader = SplitReader(copied["store"], cfg.uri, m, "train", tmp_path / "fresh-cache")
    with pytest.raises(DatasetError, match=join_uri(cfg.uri, shard.mask_key)):
        reader.batch([0])


def test_corrupted_cache_copy_is_fetched_again(copied, tmp_path):
    m, cfg, store = copied["text_manifest"], copied["text"], copied["store"]
    cache = tmp_path / "cache"
    expected = SplitReader(store, cfg.uri, m, "train", cache).sample(3)[0].copy()
    cached = cache / m.signature / m.splits["train"].shards[0].key
    assert cached.is_file()
    cached.write_bytes(b"\x00" * cached.stat().st_size)  # a damaged local copy
    again = SplitReader(store, cfg.uri, m, "train", cache).sample(3)[0]
    np.testing.assert_array_equal(again, expected)
    assert cached.read_bytes() == store.get(join_uri(cfg.uri, m.splits["train"].shards[0].key))


# ------------------------------------------------------------------------------ missing and empty
def test_missing_manifest_names_the_uri(tmp_path):
    root = f"file://{tmp_path}/store"
    uri = f"{root}/datasets/nothing-here"
    with pytest.raises(DatasetError) as info:
        load_manifest(open_store(root), uri)
    assert uri in str(info.value) and MANIFEST in str(info.value)
    assert try_load_manifest(open_store(root), uri) is None


@pytest.mark.parametrize("body", [
    b"{not json",
    json.dumps({"format_version": 1, "splits": {}}).encode(),
], ids=["not-json", "fields-missing"])
def test_invalid_manifest_is_an_error_not_a_missing_dataset(tmp_path, body):
    root = f"file://{tmp_path}/store"
    store = open_store(root)
    uri = f"{root}/datasets/broken"
    store.put(manifest_uri(uri), body)
    with pytest.raises(DatasetError, match="not a valid manifest"):
        try_load_manifest(store, uri)
    with pytest.raises(DatasetError, match="not a valid manifest"):
        prepare_dataset(store, text_config(root, uri=uri))


@pytest.mark.parametrize("folder", [
    "data",
    "missing-data",  # once a bug: an error text containing "missing" was taken for an absent manifest
])
def test_manifest_of_another_format_version_is_not_overwritten(tmp_path, folder):
    root = f"file://{tmp_path}/store"
    store = open_store(root)
    uri = f"{root}/{folder}/stories"
    store.put(manifest_uri(uri), json.dumps({"format_version": 999}).encode())
    with pytest.raises(DatasetError, match="format version 999"):
        try_load_manifest(store, uri)
    with pytest.raises(DatasetError, match="format version 999"):
        prepare_dataset(store, text_config(root, uri=uri))


def test_split_without_samples_names_the_split(prepared, tmp_path):
    with pytest.raises(DatasetError, match="'test'"):
        SplitReader(prepared["store"], prepared["text"].uri, prepared["text_manifest"], "test", tmp_path / "c")


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_corpus_is_refused(tmp_path, content):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "empty.txt").write_text(content)
    root = f"file://{tmp_path}/store"
    cfg = text_config(root, source=f"file://{src}")
    with pytest.raises(DatasetError, match="empty"):
        prepare_dataset(open_store(root), cfg)
    assert not open_store(root).exists(manifest_uri(cfg.uri))


def test_source_without_text_files_is_refused(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "notes.csv").write_text("a,b\n")
    root = f"file://{tmp_path}/store"
    with pytest.raises(DatasetError, match=f"data.source=file://{src}"):
        prepare_dataset(open_store(root), text_config(root, source=f"file://{src}"))


# ------------------------------------------------------------------------------ file sources
def _check_file_dataset(store, cfg: DataConfig, docs: list[str], cache: Path) -> None:
    m = prepare_dataset(store, cfg)
    assert m.source == cfg.source and m.splits["train"].samples > 0
    tok = tokenizer_of(store, cfg.uri, m)
    reader = SplitReader(store, cfg.uri, m, "train", cache)
    n = m.splits["train"].shards[0].samples
    stream = np.concatenate([reader.sample(0)[0]] + [reader.sample(i)[0][1:] for i in range(1, n)])
    pieces = tok.decode(stream.tolist(), skip_special_tokens=False).split(EOT_TOKEN)
    assert len(pieces) > 2
    for piece in pieces[:-1]:
        assert piece in docs


def test_jsonl_source_with_a_text_field(tmp_path):
    docs = generate_stories(80, seed=3)
    src = tmp_path / "jsonl-corpus"
    src.mkdir()
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    (src / "part-0.jsonl").write_text("\n".join(lines[:40]) + "\n\n")  # blank lines are skipped
    (src / "part-1.jsonl").write_text("\n".join(lines[40:]) + "\n")
    root = f"file://{tmp_path}/store"
    _check_file_dataset(open_store(root), text_config(root, source=f"file://{src}"), docs, tmp_path / "cache")


def test_gzipped_text_source(tmp_path):
    docs = generate_stories(60, seed=4)
    src = tmp_path / "gz-corpus"
    src.mkdir()
    for i, d in enumerate(docs):  # one document per .txt.gz file
        (src / f"doc-{i:03d}.txt.gz").write_bytes(gzip.compress(d.encode()))
    root = f"file://{tmp_path}/store"
    _check_file_dataset(open_store(root), text_config(root, source=f"file://{src}"), docs, tmp_path / "cache")


def test_jsonl_line_without_text_names_file_and_line(tmp_path):
    src = tmp_path / "bad-corpus"
    src.mkdir()
    (src / "rows.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    root = f"file://{tmp_path}/store"
    with pytest.raises(DatasetError, match=r"rows\.jsonl line 2 .*'text'"):
        prepare_dataset(open_store(root), text_config(root, source=f"file://{src}"))


def test_progress_bar_of_the_parts_instead_of_lines(tmp_path):
    """On a terminal `orch data prepare` moves a bar per dataset (parts done of all, with tokens/s)
    instead of printing a line per part; the other lines are said as before."""
    store = open_store(f"file://{tmp_path}/store")
    cfg = text_config(f"file://{tmp_path}/store", name="bar", unit_mb=0.01, num_documents=300)
    moves, lines = [], []
    prepare_dataset(store, cfg, progress=lines.append, parts=lambda *a: moves.append(a))
    total = moves[0][3]
    assert total >= 1 and moves[0][:5] == ("dataset bar", "dataset bar: tokenizing", 0, total, "parts")
    assert [m[2] for m in moves] == list(range(total + 1)) and all(m[3] == total for m in moves)
    assert "tokens/s" in moves[-1][5] and not any("tokenized" in line for line in lines)
    assert any("train:" in line for line in lines)
