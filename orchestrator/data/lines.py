"""The lines of a text file in the store (optionally .gz/.zst-compressed), read as a stream.

A 10 GB .jsonl.zst is decompressed a chunk at a time from the store (ranged GETs on S3), so a
reader holds one chunk and the line it is in, never the file. Each line is checked as it comes:
UTF-8 (the error names the byte offset in the decompressed text) and no NUL bytes.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectStore, open_object

CHUNK = 1 << 18  # decompressed bytes read at a time (a reader holds a few times this)


def codec(name: str) -> str | None:
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None


def not_utf8(name: str, e: UnicodeDecodeError, offset: int = 0) -> DatasetError:
    return DatasetError(f"{name} is not UTF-8 text ({e.reason} at byte {offset + e.start}); convert it to UTF-8 "
                        f"(e.g. iconv -t UTF-8) or remove it from the corpus")


def not_compressed(name: str, e: Exception) -> DatasetError:
    return DatasetError(f"{name} is not a valid {codec(name)} file ({e}); recompress it or remove it from the corpus")


@contextmanager
def _decompressed(name: str, raw):
    """`raw` read through the decompressor its name asks for (itself when uncompressed)."""
    kind = codec(name)
    if kind is None:
        yield raw
    elif kind == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f
    else:
        import zstandard  # (only for .zst corpora)

        with zstandard.ZstdDecompressor().stream_reader(raw, closefd=False) as f:
            yield f


def _chunks(name: str, stream) -> Iterator[bytes]:
    import zstandard

    while True:
        try:
            chunk = stream.read(CHUNK)
        except (OSError, EOFError, zstandard.ZstdError) as e:
            raise not_compressed(name, e) from None
        if not chunk:
            return
        yield chunk


def read_lines(store: ObjectStore, uri: str, size: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its newline) of every line of the file at `uri`."""
    with open_object(store, uri, size) as raw, _decompressed(uri, raw) as stream:
        rest, offset, n = b"", 0, 0  # offset: of `rest` in the decompressed bytes
        for chunk in _chunks(uri, stream):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                n += 1
                yield n, _decode(uri, line, offset, n)
                offset += len(line) + 1
        if rest:
            yield n + 1, _decode(uri, rest, offset, n + 1)


def _decode(name: str, line: bytes, offset: int, n: int) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(name, e, offset) from None
    if "\x00" in text:  # valid UTF-8, but text files hold no NUL bytes: an image, an archive, padding
        raise DatasetError(f"{name} holds NUL bytes (line {n}): it is binary, not text; remove it from the corpus")
    return text
