"""The dataset manifest: what a prepared dataset holds, written last so a crashed prepare leaves
no usable dataset behind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator.constants import DATASET_FORMAT_VERSION, MANIFEST
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectNotFound, ObjectStore, is_relative_key, join_uri


@dataclass(frozen=True)
class ShardInfo:
    key: str  # path of the token file relative to the dataset URI
    tokens: int  # tokens in the file
    samples: int  # training samples it yields
    bytes: int
    sha256: str
    mask_key: str | None = None  # sft: the loss-mask file (uint8, same shape as the tokens)
    mask_sha256: str | None = None


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str  # "text" | "sft"
    dtype: str  # numpy dtype of token files: uint16 or uint32
    seq_len: int  # tokens per sample (a sample holds seq_len + 1 tokens: inputs and shifted targets)
    vocab_size: int  # the tokenizer's vocabulary size
    eot_id: int
    tokenizer_key: str  # tokenizer JSON, relative to the dataset URI
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    signature: str  # hash of the settings the dataset was prepared with
    source: str
    format_version: int = DATASET_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> "Manifest":
        try:
            raw = json.loads(text)
            version = raw.get("format_version")
            if version != DATASET_FORMAT_VERSION:
                raise DatasetError(
                    f"dataset manifest {uri} has format version {version}, this orch reads {DATASET_FORMAT_VERSION}; "
                    f"prepare the dataset again"
                )
            splits = {
                name: SplitInfo(tuple(ShardInfo(**s) for s in split["shards"]))
                for name, split in raw.pop("splits").items()
            }
            manifest = cls(splits=splits, **raw)
            if manifest.dtype not in ("uint16", "uint32"):
                raise ValueError(f"dtype {manifest.dtype!r} is not uint16 or uint32")
        except DatasetError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DatasetError(f"dataset manifest {uri} is not a valid manifest ({e}); "
                               f"prepare the dataset again") from None
        keys = [manifest.tokenizer_key] + [k for sp in splits.values() for sh in sp.shards
                                           for k in (sh.key, sh.mask_key) if k is not None]
        for key in keys:
            if not is_relative_key(key):
                raise DatasetError(f"dataset manifest {uri} names the file {key!r}, which is not a path inside the "
                                   f"dataset; the manifest is damaged or not orch's: prepare the dataset again")
        return manifest

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def split(self, name: str, uri: str) -> SplitInfo:
        if name not in self.splits or not self.splits[name].samples:
            fix = "a larger data.val_fraction or more documents" if name == "val" else "more documents"
            raise DatasetError(
                f"dataset {uri} has no samples in split '{name}' (jobs train on 'train' and evaluate on 'val'); "
                f"prepare it again with {fix}"
            )
        return self.splits[name]

    def check_files(self, store: ObjectStore, dataset_uri: str) -> None:
        """Every shard the manifest lists is in the store with the size it says, and its counts agree
        with each other: one listing and no reads, so a damaged dataset fails before training starts,
        not when a worker reaches the shard. (A flipped byte keeps the size: the reader's sha256
        check finds it when the shard is fetched.)"""
        redo = f"delete {manifest_uri(dataset_uri)} and prepare the dataset again (from {self.source})"
        sizes = {o.uri: o.size for o in store.list(dataset_uri.rstrip("/") + "/")}
        for split in self.splits.values():
            for sh in split.shards:
                samples = (sh.tokens // (self.seq_len + 1) if self.kind == "sft"
                           else (sh.tokens - 1) // self.seq_len)
                if sh.samples != samples or sh.bytes != sh.tokens * self.np_dtype.itemsize:
                    raise DatasetError(
                        f"dataset manifest {manifest_uri(dataset_uri)} disagrees with itself on {sh.key}: "
                        f"{sh.tokens} tokens of seq_len {self.seq_len} make {samples} samples and "
                        f"{sh.tokens * self.np_dtype.itemsize} bytes, it says {sh.samples} and {sh.bytes}; {redo}"
                    )
                files = [(sh.key, sh.bytes)] + ([(sh.mask_key, sh.tokens)] if sh.mask_key else [])
                for key, size in files:
                    uri = join_uri(dataset_uri, key)
                    try:
                        found = sizes[uri] if uri in sizes else store.size(uri)  # (a listing skips symlinked folders)
                    except ObjectNotFound:
                        raise DatasetError(f"shard {uri} of the dataset's manifest is missing; {redo}") from None
                    if found != size:
                        raise DatasetError(f"shard {uri} is {found} bytes, its manifest says {size} (truncated "
                                           f"or replaced); {redo}")


def manifest_uri(dataset_uri: str) -> str:
    return join_uri(dataset_uri, MANIFEST)


def load_manifest(store: ObjectStore, dataset_uri: str) -> Manifest:
    """The manifest of a prepared dataset; DatasetError if there is none."""
    uri = manifest_uri(dataset_uri)
    try:
        text = store.get(uri)
    except ObjectNotFound:
        raise DatasetError(
            f"no dataset at {dataset_uri} (missing {MANIFEST}); run `orch data prepare` or `orch run`, "
            f"which prepares it, or fix data.uri"
        ) from None
    return Manifest.from_json(text, uri)


def try_load_manifest(store: ObjectStore, dataset_uri: str) -> Manifest | None:
    """The manifest, or None when there is none; a manifest that exists but is invalid is an error."""
    uri = manifest_uri(dataset_uri)
    try:
        text = store.get(uri)
    except ObjectNotFound:
        return None
    return Manifest.from_json(text, uri)
