"""The object-store interface every backend implements, and the URI helpers they share.

Every method takes full string URIs (`s3://bucket/key`, `file:///abs/path`), never bare keys, so a
caller can hold one URI for a checkpoint or a dataset and not care where it lives.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from urllib.parse import urlparse

from orchestrator.errors import StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
SUPPORTED_SCHEMES = ("s3://", "file://")


class ObjectNotFound(StorageError):
    """An object asked for by URI does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as returned by `ObjectStore.list`."""

    uri: str  # full URI of the object, same scheme as the listed prefix
    size: int  # size in bytes


class ObjectStore(ABC):
    """A small blob store addressed by full URIs.

    Writes are atomic: a reader sees either the previous object or the whole new one, never a part.
    """

    @abstractmethod
    def get(self, uri: str) -> bytes:
        """Return the whole object; raise `ObjectNotFound` if it does not exist."""

    @abstractmethod
    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes [start, end) of the object, cut short at its end (b"" past the end)."""

    @abstractmethod
    def put(self, uri: str, data: bytes) -> None:
        """Store `data` at `uri`, replacing any object there, atomically."""

    @abstractmethod
    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Upload the local file at `path` to `uri` (multipart for large files on S3)."""

    @abstractmethod
    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Download `uri` to the local `path`, creating parent folders; the local write is atomic."""

    @abstractmethod
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object whose URI starts with `prefix_uri` (recursively), sorted by URI."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether an object exists at `uri`."""

    @abstractmethod
    def size(self, uri: str) -> int:
        """Size of the object in bytes; raise `ObjectNotFound` if it does not exist."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete the object at `uri`; a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object whose URI starts with `prefix_uri`; return how many were deleted."""

    @abstractmethod
    def check(self, root_uri: str) -> None:
        """Raise `StorageError` now if `root_uri` cannot be used (missing bucket, bad credentials,
        unreachable endpoint, local folder not writable)."""


def check_endpoint_url(url: str | None) -> None:
    """An S3 endpoint must be an http(s) URL with a host (boto3 would fail later with a traceback)."""
    if url is None:
        return
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageError(f"S3 endpoint {url!r} is not a URL; give http(s)://HOST[:PORT] in storage.endpoint_url "
                           f"(or AWS_ENDPOINT_URL_S3), or leave it unset for AWS")


def join_uri(base: str, *parts: str) -> str:
    """Join a URI and path parts with single slashes: join_uri("s3://b/", "/x", "y") == "s3://b/x/y".

    A trailing slash on the last part is kept, so a prefix stays a prefix. A part never climbs out
    of `base`: a `..` segment (from a name, or a path listed in a manifest or marker read from the
    store) is refused.
    """
    for part in parts:
        if ".." in part.replace("\\", "/").split("/"):
            raise StorageError(f"refusing the path {part!r} under {base}: its '..' segment would leave that folder "
                               f"(a name or a listed file path that climbs out of its prefix)")
    scheme, rest = _split_scheme(base)
    pieces = [rest.strip("/")] + [p.strip("/") for p in parts]
    joined = "/".join(p for p in pieces if p)
    if rest.startswith("/"):  # keep an absolute path absolute (file:///x, /x)
        joined = "/" + joined
    if parts and parts[-1].endswith("/"):
        joined += "/"
    return scheme + joined


def is_relative_key(key: object) -> bool:
    """Whether `key` is a path inside a folder (`train/shard-0.bin`): not absolute, no `..`, so a
    damaged or hostile manifest or commit marker cannot reach files outside its dataset or checkpoint."""
    return (isinstance(key, str) and bool(key) and not key.startswith("/") and "\\" not in key
            and "://" not in key and all(part not in ("", ".", "..") for part in key.split("/")))


def _split_scheme(uri: str) -> tuple[str, str]:
    """("s3://", "b/k") for "s3://b/k"; ("", uri) for a plain path."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", uri
    return scheme + sep, rest


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split "s3://bucket/some/key" into ("bucket", "some/key"); the key may be empty."""
    if not uri.startswith(S3_SCHEME):
        raise StorageError(f"not an S3 URI: {uri!r}: expected s3://bucket/key")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI has no bucket: {uri!r}: expected s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> str:
    """The absolute local path of a file:// URI or of a plain absolute path."""
    path = uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else uri
    if not os.path.isabs(path):
        raise StorageError(
            f"local storage path is not absolute: {uri!r}: use file:///abs/path or an absolute path"
        )
    return path


def to_uri(path_or_uri: str | os.PathLike[str]) -> str:
    """Return URIs unchanged and turn a local path (relative or absolute) into a file:// URI.

    Paths are not percent-encoded: `local_path(to_uri(p))` gives back the absolute path.
    """
    text = os.fspath(path_or_uri)
    if "://" in text:
        return text
    return FILE_SCHEME + os.path.abspath(text)
