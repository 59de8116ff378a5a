"""One store for URIs of any scheme, and a seekable file over any stored object.

A dataset in S3 may come from a local folder and reuse the tokenizer of a model in another bucket:
`routed(store)` answers each call with the backend of that call's URI (`s3://` -> one `S3Store` with
the S3 settings of `store`, `file://` or an absolute path -> `LocalStore`), so callers hold one
store and never compare schemes. `open_object(store, uri)` reads an object as a buffered, seekable
binary file through ranged GETs, so a reader (pyarrow's Parquet reader, a line reader) streams a
large object without holding it whole.
"""

from __future__ import annotations

import io
import os
from typing import Any

from orchestrator.errors import StorageError
from orchestrator.storage.base import (
    FILE_SCHEME,
    S3_SCHEME,
    SUPPORTED_SCHEMES,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    local_path,
)
from orchestrator.storage.local import LocalStore
from orchestrator.storage.s3 import S3Store

READ_BUFFER = 8 << 20  # bytes one ranged GET fetches when a file is read sequentially


class RoutingStore(ObjectStore):
    """An `ObjectStore` for every supported scheme: each call goes to the backend of its URI."""

    def __init__(self, s3: S3Store | None = None, local: LocalStore | None = None, **s3_options: Any) -> None:
        """`s3`: the S3 backend to use (built lazily from `s3_options` when None)."""
        self._s3, self._local, self._s3_options = s3, local or LocalStore(), s3_options

    def __repr__(self) -> str:
        return f"RoutingStore({self._s3 or self._s3_options!r})"

    def backend(self, uri: str) -> ObjectStore:
        """The store that holds `uri`."""
        if uri.startswith(S3_SCHEME):
            if self._s3 is None:
                self._s3 = S3Store(**self._s3_options)
            return self._s3
        if uri.startswith(FILE_SCHEME) or ("://" not in uri and os.path.isabs(uri)):
            return self._local
        raise StorageError(f"unsupported storage URI {uri!r}: use one of {', '.join(SUPPORTED_SCHEMES)} "
                           f"(file:///abs/path) or an absolute local path")

    def get(self, uri: str) -> bytes:
        return self.backend(uri).get(uri)

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        return self.backend(uri).get_range(uri, start, end)

    def put(self, uri: str, data: bytes) -> None:
        self.backend(uri).put(uri, data)

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        self.backend(uri).put_file(uri, path)

    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        self.backend(uri).get_file(uri, path)

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        return self.backend(prefix_uri).list(prefix_uri)

    def exists(self, uri: str) -> bool:
        return self.backend(uri).exists(uri)

    def size(self, uri: str) -> int:
        return self.backend(uri).size(uri)

    def delete(self, uri: str) -> None:
        self.backend(uri).delete(uri)

    def delete_prefix(self, prefix_uri: str) -> int:
        return self.backend(prefix_uri).delete_prefix(prefix_uri)

    def check(self, root_uri: str) -> None:
        self.backend(root_uri).check(root_uri)


def routed(store: ObjectStore) -> RoutingStore:
    """A store for URIs of any scheme that uses `store` for its own (and its S3 settings for S3)."""
    if isinstance(store, RoutingStore):
        return store
    if isinstance(store, S3Store):
        return RoutingStore(s3=store)
    if isinstance(store, LocalStore):
        return RoutingStore(local=store)
    raise StorageError(f"cannot route URIs around {store!r}: not a store of orchestrator.storage")


class _RangeFile(io.RawIOBase):
    """A read-only, seekable raw file over one stored object; every read is one ranged GET."""

    def __init__(self, store: ObjectStore, uri: str, size: int) -> None:
        self.store, self.uri, self.length, self.pos = store, uri, size, 0
        self.name = uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        want = min(len(buffer), self.length - self.pos)
        if want <= 0:
            return 0
        data = self.store.get_range(self.uri, self.pos, self.pos + want)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_object(store: ObjectStore, uri: str, size: int | None = None,
                buffer_size: int = READ_BUFFER) -> io.RawIOBase | io.BufferedReader:
    """`uri` as a seekable binary file: an S3 object buffered, read by ranged GETs of `buffer_size`
    bytes; a local file opened directly, unbuffered. `size`: the object's size when the caller
    knows it (saves a request)."""
    backend = routed(store).backend(uri)
    if isinstance(backend, LocalStore):  # unbuffered: a reader that asks for large pieces gets them directly
        try:
            return open(local_path(uri), "rb", buffering=0)
        except FileNotFoundError:
            raise ObjectNotFound(f"object not found: {uri}") from None
    raw = _RangeFile(backend, uri, backend.size(uri) if size is None else size)
    return io.BufferedReader(raw, buffer_size=buffer_size)
