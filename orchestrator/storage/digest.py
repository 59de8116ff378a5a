"""The sha256 digests orch records and checks for stored files (checkpoints, exports, dataset shards)."""

from __future__ import annotations

import hashlib
import os

BLOCK_BYTES = 1 << 20  # read files in 1 MiB blocks


def sha256_hasher():
    """An incremental sha256 for data that streams by: `.update(bytes)`, then `.hexdigest()`."""
    return hashlib.sha256()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = sha256_hasher()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def file_matches(path: str | os.PathLike, size: int, sha256: str) -> bool:
    """Whether the file at `path` has this size and sha256 (the size first: it costs no read)."""
    return os.stat(path).st_size == size and sha256_file(path) == sha256
