"""Turn a corpus into tokenized shards plus a manifest in the object store.

Text datasets train a byte-level BPE tokenizer on their training documents; fine-tuning (sft)
datasets reuse the tokenizer of the dataset named by `tokenizer_uri`, so fine-tuning speaks the
pretrained model's vocabulary. Shards are written first and the manifest last: a crashed prepare
leaves no usable dataset, and a re-run overwrites the leftovers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
from typing import Callable

import numpy as np

from orchestrator.config.schema import DataConfig
from orchestrator.constants import DATASET_FORMAT_VERSION, TOKENIZER
from orchestrator.data.corpus import GENERATORS
from orchestrator.data.manifest import Manifest, ShardInfo, SplitInfo, manifest_uri, try_load_manifest
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectStore, join_uri

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")


def dataset_signature(cfg: DataConfig, tokenizer_sha256: str | None = None) -> str:
    """A hash of every setting that changes the prepared bytes."""
    keys = dict(kind=cfg.kind, source=cfg.source, seq_len=cfg.seq_len, num_documents=cfg.num_documents,
                shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction, seed=cfg.seed,
                version=DATASET_FORMAT_VERSION)
    if cfg.kind == "text":
        keys["vocab_size"] = cfg.vocab_size
    else:
        keys["tokenizer"] = tokenizer_sha256
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- sources
def _decompress(name: str, data: bytes) -> str:
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data.decode("utf-8")


def _read_source_files(store: ObjectStore, source: str) -> list[tuple[str, str]]:
    objs = [o for o in store.list(source) if o.uri.endswith(TEXT_SUFFIXES)]
    if not objs:
        raise DatasetError(f"no .txt or .jsonl files (optionally .gz/.zst) under data.source={source}; check the URI")
    return [(o.uri, _decompress(o.uri, store.get(o.uri))) for o in objs]


def load_text_documents(store: ObjectStore, cfg: DataConfig) -> list[str]:
    """The documents of a text source: generated, or .txt files (one document each) and .jsonl
    files (one document per line, field `text`)."""
    if cfg.source.startswith("generated:"):
        return GENERATORS[_generator(cfg)](cfg.num_documents, cfg.seed)
    docs = []
    for uri, text in _read_source_files(store, cfg.source):
        if ".jsonl" in uri:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise DatasetError(f"{uri} line {n} is not a JSON object with a 'text' field; fix the file") from None
        else:
            docs.append(text)
    return docs


def load_sft_examples(store: ObjectStore, cfg: DataConfig) -> list[dict]:
    """Prompt/response pairs: generated, or .jsonl with `prompt`/`response` (or chat `messages`)."""
    if cfg.source.startswith("generated:"):
        return GENERATORS[_generator(cfg)](cfg.num_documents, cfg.seed)
    out = []
    for uri, text in _read_source_files(store, cfg.source):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "messages" in row:
                    msgs = row["messages"]
                    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + f"{msgs[-1]['role']}:"
                    out.append({"prompt": prompt, "response": " " + msgs[-1]["content"]})
                else:
                    out.append({"prompt": row["prompt"], "response": row["response"]})
            except (ValueError, KeyError, TypeError, IndexError):
                raise DatasetError(
                    f"{uri} line {n} needs 'prompt' and 'response' (or 'messages'); fix the file"
                ) from None
    return out


def _generator(cfg: DataConfig) -> str:
    name = cfg.source.split(":", 1)[1]
    if name not in GENERATORS:
        raise DatasetError(f"unknown generated source {cfg.source!r}; choose one of: "
                           + ", ".join(f"generated:{g}" for g in GENERATORS))
    return name


def _split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(items)))
    random.Random(f"split-{seed}").shuffle(idx)
    n_val = int(round(len(items) * val_fraction))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ---------------------------------------------------------------------------------------- writing
def _token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def _put(store: ObjectStore, uri: str, data: bytes) -> str:
    store.put(uri, data)
    return _sha256(data)


def _write_text_split(store, dataset_uri, split, tokens: np.ndarray, cfg: DataConfig) -> SplitInfo:
    shards = []
    size = max(cfg.shard_tokens, cfg.seq_len + 1)
    for i, start in enumerate(range(0, len(tokens), size)):
        chunk = tokens[start : start + size]
        samples = (len(chunk) - 1) // cfg.seq_len
        if samples <= 0:
            continue
        key = f"{split}/shard-{i:05d}.bin"
        data = chunk.tobytes()
        shards.append(ShardInfo(key=key, tokens=len(chunk), samples=samples, bytes=len(data),
                                sha256=_put(store, join_uri(dataset_uri, key), data)))
    return SplitInfo(tuple(shards))


def _write_sft_split(store, dataset_uri, split, tokens: np.ndarray, mask: np.ndarray, cfg: DataConfig) -> SplitInfo:
    shards = []
    per_shard = max(1, cfg.shard_tokens // (cfg.seq_len + 1))
    for i, start in enumerate(range(0, len(tokens), per_shard)):
        t, m = tokens[start : start + per_shard], mask[start : start + per_shard]
        key, mask_key = f"{split}/shard-{i:05d}.bin", f"{split}/shard-{i:05d}.mask.bin"
        data = t.tobytes()
        shards.append(ShardInfo(
            key=key, tokens=t.size, samples=len(t), bytes=len(data),
            sha256=_put(store, join_uri(dataset_uri, key), data),
            mask_key=mask_key, mask_sha256=_put(store, join_uri(dataset_uri, mask_key), m.tobytes()),
        ))
    return SplitInfo(tuple(shards))


def _encode_text(tok, docs: list[str], eot: int, dtype: str) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=dtype)


def _encode_sft(tok, examples: list[dict], eot: int, seq_len: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Each example: prompt + response + EOT, cut or padded (with EOT) to seq_len + 1 tokens; the
    mask is 1 on response tokens (and their EOT) only, so the loss ignores prompt and padding."""
    n = seq_len + 1
    tokens = np.full((len(examples), n), eot, dtype=dtype)
    mask = np.zeros((len(examples), n), dtype=np.uint8)
    prompts = tok.encode_batch([e["prompt"] for e in examples], add_special_tokens=False)
    responses = tok.encode_batch([e["response"] for e in examples], add_special_tokens=False)
    kept = 0
    for p, r in zip(prompts, responses):
        seq = p.ids + r.ids + [eot]
        if len(p.ids) + 1 >= n:  # nothing of the response would be trained on
            continue
        seq = seq[:n]
        tokens[kept, : len(seq)] = seq
        mask[kept, len(p.ids) : len(seq)] = 1
        kept += 1
    return tokens[:kept], mask[:kept]


def load_tokenizer_json(uri: str, store: ObjectStore) -> str:
    """The tokenizer of a prepared dataset (via its manifest) or of a model folder (tokenizer.json)."""
    from orchestrator.storage import ObjectNotFound, S3Store, open_store

    if isinstance(store, S3Store) != uri.startswith("s3://"):  # e.g. a local model folder, data in S3
        store = open_store(uri)
    manifest = try_load_manifest(store, uri)
    key = manifest.tokenizer_key if manifest else TOKENIZER
    try:
        return store.get(join_uri(uri, key)).decode()
    except ObjectNotFound:
        raise DatasetError(
            f"no tokenizer at {uri}: it is neither a prepared dataset nor a model folder with {TOKENIZER}; "
            f"fix data.tokenizer_uri (or the job's init_from)"
        ) from None


# ---------------------------------------------------------------------------------------- entry
def prepare_dataset(store: ObjectStore, cfg: DataConfig, progress: Callable[[str], None] | None = None) -> Manifest:
    """Prepare `cfg` at `cfg.uri` unless a dataset with the same signature is already there."""
    from model.tokenizer import eot_id, tokenizer_from_json, tokenizer_to_json, train_bpe_tokenizer

    say = progress or (lambda msg: log.info(msg))
    tok_json = None
    if cfg.kind == "sft":
        tok_json = load_tokenizer_json(cfg.tokenizer_uri, store)
    signature = dataset_signature(cfg, _sha256(tok_json.encode()) if tok_json else None)

    existing = try_load_manifest(store, cfg.uri)
    if existing is not None:
        if existing.signature == signature:
            say(f"dataset {cfg.name}: using the prepared dataset at {cfg.uri}")
            return existing
        raise DatasetError(
            f"a different dataset already exists at {cfg.uri} (prepared with other settings); "
            f"set data.name or data.uri to a new location, or delete {manifest_uri(cfg.uri)} to rebuild it"
        )

    if cfg.kind == "text":
        docs = load_text_documents(store, cfg)
        if not any(d.strip() for d in docs):
            raise DatasetError(f"corpus data.source={cfg.source} is empty; point it at files with text")
        train_docs, val_docs = _split(docs, cfg.val_fraction, cfg.seed)
        say(f"dataset {cfg.name}: training a {cfg.vocab_size}-token BPE on {len(train_docs)} documents")
        tok = train_bpe_tokenizer(train_docs, cfg.vocab_size)
        tok_json = tokenizer_to_json(tok)
    else:
        examples = load_sft_examples(store, cfg)
        if not examples:
            raise DatasetError(f"fine-tuning data.source={cfg.source} holds no examples; point it at .jsonl prompt/response pairs")
        train_docs, val_docs = _split(examples, cfg.val_fraction, cfg.seed)
        tok = tokenizer_from_json(tok_json)

    vocab = tok.get_vocab_size()
    eot, dtype = eot_id(tok), _token_dtype(vocab)
    tok_sha = _put(store, join_uri(cfg.uri, TOKENIZER), tok_json.encode())
    splits = {}
    for split, items in (("train", train_docs), ("val", val_docs)):
        if cfg.kind == "text":
            tokens = _encode_text(tok, items, eot, dtype)
            splits[split] = _write_text_split(store, cfg.uri, split, tokens, cfg)
        else:
            tokens, mask = _encode_sft(tok, items, eot, cfg.seq_len, dtype)
            splits[split] = _write_sft_split(store, cfg.uri, split, tokens, mask, cfg)
        say(f"dataset {cfg.name}: {split}: {splits[split].tokens} tokens, {splits[split].samples} samples, "
            f"{len(splits[split].shards)} shards")
    manifest = Manifest(
        name=cfg.name, kind=cfg.kind, dtype=dtype, seq_len=cfg.seq_len, vocab_size=vocab, eot_id=eot,
        tokenizer_key=TOKENIZER, tokenizer_sha256=tok_sha, splits=splits, signature=signature, source=cfg.source,
    )
    store.put(manifest_uri(cfg.uri), manifest.to_json().encode())  # last: the dataset now exists
    return manifest
