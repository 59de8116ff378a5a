"""Corpora and model folders written on the fly for data tests: the same documents as JSONL, Parquet,
Arrow IPC (file format) and a Hugging Face `datasets` folder laid out as `Dataset.save_to_disk`
writes it (Arrow IPC stream files + dataset_info.json + state.json; the `datasets` library is not
installed here), and Hugging Face model folders whose tokenizer is not orch's."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def parquet_bytes(columns: dict, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_parquet(path: Path, docs: list[str], column: str = "text", row_group_size: int | None = None) -> Path:
    """`docs` in `column`, beside an integer column (not read), in row groups of `row_group_size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes({"id": list(range(len(docs))), column: docs}, row_group_size))
    return path


def write_feather(path: Path, docs: list[str]) -> Path:
    """An Arrow IPC file (Feather v2), in batches of 100 rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": docs, "n": list(range(len(docs)))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=100):
            writer.write_batch(batch)
    return path


def write_datasets_folder(folder: Path, docs: list[str], shards: int = 2) -> Path:
    """What `datasets.Dataset.from_dict({"text": docs, "n": ...}).save_to_disk(folder, num_shards=shards)`
    writes: data-0000i-of-0000n.arrow (IPC streams, batches of 100 rows), dataset_info.json, state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names, step = [], -(-len(docs) // shards)
    for i in range(shards):
        part = docs[i * step : (i + 1) * step]
        table = pa.table({"text": part, "n": list(range(i * step, i * step + len(part)))})
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=100):
                writer.write_batch(batch)
        names.append(name)
    features = {"text": {"dtype": "string", "_type": "Value"}, "n": {"dtype": "int64", "_type": "Value"}}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features, "citation": "", "description": ""}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}, indent=2))
    return folder


def foreign_tokenizer(docs: list[str], vocab_size: int = 400) -> str:
    """A byte-level BPE like a Hugging Face model's: no <|endoftext|>, `</s>` ends a document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return json.dumps(json.loads(tok.to_str()), indent=2)  # as transformers writes it: indented, not orch's bytes


def write_hf_model_folder(folder: Path, tokenizer_json: str, vocab_size: int = 512) -> Path:
    """A Hugging Face GPT-2 folder of gpt_tiny's shape (config.json; no weights: the checks before any
    worker starts read none) with `tokenizer_json` and a tokenizer_config.json naming `</s>` as eos."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": 64,
                                                    "n_layer": 2, "n_head": 2, "n_embd": 64}))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "</s>", "bos_token": "<s>"}))
    return folder


def dataset_with_a_flipped_byte(uri: str, overrides: list[str], endpoint_url: str | None = None) -> str:
    """A small prepared dataset at `uri` (made in this process, no Ray; `overrides` pick the model and
    corpus) with one byte of its first training shard flipped: what only a worker finds, when it
    checks the shard's sha256 (submit checks sizes, not digests). Returns the shard's name."""
    import dataclasses

    from orchestrator.config.compose import compose_root
    from orchestrator.data.prepare import local_runner, prepare_dataset
    from orchestrator.storage import join_uri, open_store

    store = open_store(uri, endpoint_url=endpoint_url)
    root = compose_root([*overrides, "state_dir=/nonexistent/unused"])
    manifest = prepare_dataset(store, dataclasses.replace(root.data, uri=uri, name="broken"), runner=local_runner)
    shard = join_uri(uri, manifest.splits["train"].shards[0].key)
    raw = bytearray(store.get(shard))
    raw[len(raw) // 2] ^= 0xFF
    store.put(shard, bytes(raw))
    return shard.rsplit("/", 1)[-1]
