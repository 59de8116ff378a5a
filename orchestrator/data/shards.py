"""One unit of a corpus into shards: read it batch by batch, split each document into train or
validation, tokenize, and upload fixed-size shards as they fill (a Ray task runs `tokenize_unit`).

Nothing here holds a whole unit: a batch of source text (`data.read_batch_mb`) is read, encoded a
slice at a time (a `tokenizers` Encoding costs far more than its text), and its tokens appended to
the shard being filled; a shard is uploaded as soon as it is full. The shards are the same as if
the unit's token stream had been built whole and cut: shard n of a split holds tokens [n * size,
(n + 1) * size) of that split's stream.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from orchestrator.config.schema import DataConfig
from orchestrator.data.sources import Unit, is_validation, read_unit
from orchestrator.storage import ObjectStore, join_uri
from orchestrator.storage.digest import sha256_bytes

SPLITS = ("train", "val")
ENCODE_CHARS = 1 << 18  # text encoded in one call: its Encodings (ids, offsets, token strings) take ~40x its size


def _upload(store: ObjectStore, uri: str, array: np.ndarray) -> tuple[int, str]:
    """Write an array as a shard file (multipart upload when large); its size and sha256."""
    data = array.tobytes()
    with tempfile.NamedTemporaryFile(prefix="orch-shard-", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        store.put_file(uri, path)
    finally:
        os.unlink(path)
    return len(data), sha256_bytes(data)


def _slices(texts: list[str], limit: int = ENCODE_CHARS):
    """`texts` in consecutive runs of about `limit` characters (a longer text alone)."""
    start, size = 0, 0
    for i, t in enumerate(texts):
        if i > start and size + len(t) > limit:
            yield texts[start:i]
            start, size = i, 0
        size += len(t)
    if start < len(texts):
        yield texts[start:]


def encode_text(tok, texts: list[str], eot: int, dtype: str) -> np.ndarray:
    """The documents' tokens, each followed by EOT, as one array."""
    parts = []
    for piece in _slices(texts):
        encs = tok.encode_batch(piece, add_special_tokens=False)
        out = np.empty(sum(len(e.ids) + 1 for e in encs), dtype=dtype)
        pos = 0
        for e in encs:
            n = len(e.ids)
            out[pos : pos + n] = e.ids
            out[pos + n] = eot
            pos += n + 1
        parts.append(out)
        del encs
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def encode_sft(tok, examples: list[dict], eot: int, seq_len: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Each example: prompt + response + EOT, cut or padded (with EOT) to seq_len + 1 tokens; the
    mask is 1 on response tokens (and their EOT) only, so the loss ignores prompt and padding."""
    n = seq_len + 1
    tokens = np.full((len(examples), n), eot, dtype=dtype)
    mask = np.zeros((len(examples), n), dtype=np.uint8)
    prompts = tok.encode_batch([e["prompt"] for e in examples], add_special_tokens=False)
    responses = tok.encode_batch([e["response"] for e in examples], add_special_tokens=False)
    kept = 0
    for p, r in zip(prompts, responses):
        if len(p.ids) + 1 >= n:  # nothing of the response would be trained on
            continue
        seq = (p.ids + r.ids + [eot])[:n]
        tokens[kept, : len(seq)] = seq
        mask[kept, len(p.ids) : len(seq)] = 1
        kept += 1
    return tokens[:kept], mask[:kept]


class ShardWriter:
    """One split of one unit: takes tokens (text: a 1-D stream; sft: rows of seq_len + 1 with their
    masks) as they come and uploads every full shard of `size` (tokens or rows) at once."""

    def __init__(self, store: ObjectStore, cfg: DataConfig, prefix: str):
        self.store, self.cfg, self.prefix = store, cfg, prefix
        self.sft = cfg.kind == "sft"
        self.size = max(1, cfg.shard_tokens // (cfg.seq_len + 1)) if self.sft else max(cfg.shard_tokens,
                                                                                      cfg.seq_len + 1)
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.held = 0  # tokens (text) or rows (sft) in `pending`
        self.count = 0  # shards cut so far (a last one too short for a sample is cut but not kept)
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        if len(tokens):
            self.pending.append((tokens, mask))
            self.held += len(tokens)
        while self.held >= self.size:
            self._cut(self.size)

    def close(self) -> list[dict]:
        if self.held:
            self._cut(self.held)
        return self.shards

    def _cut(self, n: int) -> None:
        tokens = np.concatenate([t for t, _ in self.pending])
        mask = np.concatenate([m for _, m in self.pending]) if self.sft else None
        chunk, rest = tokens[:n], tokens[n:]
        self.pending = [(rest, mask[n:] if self.sft else None)] if len(rest) else []
        self.held = len(rest)
        key = f"{self.prefix}-{self.count:04d}"
        self.count += 1
        uri = join_uri(self.cfg.uri, key + ".bin")
        if not self.sft:
            samples = (len(chunk) - 1) // self.cfg.seq_len
            if samples > 0:
                nbytes, sha = _upload(self.store, uri, chunk)
                self.shards.append(dict(key=key + ".bin", tokens=len(chunk), samples=samples, bytes=nbytes,
                                        sha256=sha))
            return
        nbytes, sha = _upload(self.store, uri, chunk)
        _, mask_sha = _upload(self.store, join_uri(self.cfg.uri, key + ".mask.bin"), mask[:n])
        self.shards.append(dict(key=key + ".bin", tokens=int(chunk.size), samples=len(chunk), bytes=nbytes,
                                sha256=sha, mask_key=key + ".mask.bin", mask_sha256=mask_sha))


def tokenize_unit(store: ObjectStore, cfg: DataConfig, source: str, unit: Unit, tok_json: str, dtype: str,
                  eot: int) -> dict:
    """Tokenize one unit and upload its shards. Runs as a Ray task; returns what the manifest needs."""
    from model.tokenizer import tokenizer_from_json  # (model/ loads torch: not at import)

    tok = tokenizer_from_json(tok_json)
    writers = {s: ShardWriter(store, cfg, f"{s}/shard-{unit.index:05d}") for s in SPLITS}
    documents = tokens_total = 0
    for batch in read_unit(store, source, unit, cfg.kind, cfg.seed, cfg.text_field,
                           int(cfg.read_batch_mb * (1 << 20))):
        documents += len(batch)
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        for identity, item in batch:
            by_split["val" if is_validation(identity, cfg.seed, cfg.val_fraction) else "train"].append(item)
        del batch
        for split, items in by_split.items():
            if not items:
                continue
            if cfg.kind == "text":
                ids = encode_text(tok, items, eot, dtype)
                writers[split].add(ids)
                tokens_total += len(ids)
            else:
                ids, mask = encode_sft(tok, items, eot, cfg.seq_len, dtype)
                writers[split].add(ids, mask)
                tokens_total += int(mask.sum())
    shards = {s: w.close() for s, w in writers.items()}
    return {"unit": unit.index, "shards": shards, "documents": documents, "tokens": tokens_total,
            "source_bytes": unit.bytes}
