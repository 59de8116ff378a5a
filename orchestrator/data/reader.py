"""Read samples of a prepared dataset: shards fetched from the store into a local cache, checked
against the manifest's sha256, then memory-mapped.

Which samples to read is decided elsewhere (`orchestrator.data.order`): this module only turns
global sample ids into (inputs, targets) tensors.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

from orchestrator.data.manifest import Manifest, ShardInfo
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectStore, join_uri

IGNORE_INDEX = -100  # same as model.gpt.IGNORE_INDEX; targets the loss skips


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SplitReader:
    """Random access to the samples of one split of a dataset."""

    def __init__(self, store: ObjectStore, dataset_uri: str, manifest: Manifest, split: str, cache_dir: str | os.PathLike):
        self.store = store
        self.uri = dataset_uri
        self.manifest = manifest
        self.split = manifest.split(split, dataset_uri)
        self.cache_dir = Path(cache_dir) / manifest.signature
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._starts = np.cumsum([0] + [s.samples for s in self.split.shards]).tolist()
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def _fetch(self, key: str, sha256: str) -> Path:
        path = self.cache_dir / key
        if path.exists() and path.stat().st_size and _file_sha256(path) == sha256:
            return path
        uri = join_uri(self.uri, key)
        self.store.get_file(uri, path)
        actual = _file_sha256(path)
        if actual != sha256:
            path.unlink(missing_ok=True)
            raise DatasetError(
                f"shard {uri} is corrupt: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}...; "
                f"prepare the dataset again"
            )
        return path

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if i not in self._arrays:
            info: ShardInfo = self.split.shards[i]
            tokens = np.memmap(self._fetch(info.key, info.sha256), dtype=self.manifest.np_dtype, mode="r")
            if tokens.size != info.tokens:
                raise DatasetError(f"shard {join_uri(self.uri, info.key)} holds {tokens.size} tokens, the manifest says {info.tokens}; prepare the dataset again")
            mask = None
            if info.mask_key:
                mask = np.memmap(self._fetch(info.mask_key, info.mask_sha256), dtype=np.uint8, mode="r")
                n = self.manifest.seq_len + 1
                tokens, mask = tokens.reshape(-1, n), mask.reshape(-1, n)
            self._arrays[i] = (tokens, mask)
        return self._arrays[i]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `index` of the split: seq_len + 1 tokens (and its loss mask for sft)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside split of {self.num_samples} samples at {self.uri}")
        shard = bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        tokens, mask = self._shard(shard)
        if mask is not None:
            return tokens[local], mask[local]
        n = self.manifest.seq_len
        return tokens[local * n : local * n + n + 1], None

    def batch(self, indices) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
        """(inputs, targets), each (B, seq_len) int64; masked targets are IGNORE_INDEX."""
        import torch

        rows = [self.sample(int(i)) for i in indices]
        tokens = np.stack([r[0] for r in rows]).astype(np.int64)
        x, y = tokens[:, :-1], tokens[:, 1:].copy()
        if rows[0][1] is not None:
            mask = np.stack([r[1] for r in rows])[:, 1:]
            y[mask == 0] = IGNORE_INDEX
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
