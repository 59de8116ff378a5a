"""The dataset manifest: what a prepared dataset holds, written last so a crashed prepare leaves
no usable dataset behind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator.constants import DATASET_FORMAT_VERSION, MANIFEST
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectNotFound, ObjectStore, join_uri


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
    def from_json(cls, text: str, uri: str) -> "Manifest":
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
            return cls(splits=splits, **raw)
        except DatasetError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DatasetError(f"dataset manifest {uri} is not a valid manifest ({e}); "
                               f"prepare the dataset again") from None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def split(self, name: str, uri: str) -> SplitInfo:
        if name not in self.splits or not self.splits[name].samples:
            raise DatasetError(
                f"dataset {uri} has no samples in split '{name}'; "
                f"prepare it with more documents or a larger val_fraction"
            )
        return self.splits[name]


def manifest_uri(dataset_uri: str) -> str:
    return join_uri(dataset_uri, MANIFEST)


def load_manifest(store: ObjectStore, dataset_uri: str) -> Manifest:
    """The manifest of a prepared dataset; DatasetError if there is none."""
    uri = manifest_uri(dataset_uri)
    try:
        text = store.get(uri).decode()
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
        text = store.get(uri).decode()
    except ObjectNotFound:
        return None
    return Manifest.from_json(text, uri)
