"""Object store on a local (or shared, e.g. NFS) folder: URIs `file:///abs/path` or plain absolute paths.

Writes go to a temporary file in the destination folder and are renamed into place with
`os.replace`, so a reader never sees a partial object. Temporary files are never listed.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from orchestrator.errors import StorageError
from orchestrator.storage.base import FILE_SCHEME, ObjectInfo, ObjectNotFound, ObjectStore, local_path

# Suffix of in-flight temporary files; `list` skips them.
PARTIAL_SUFFIX = ".orch-partial"


class LocalStore(ObjectStore):
    """`ObjectStore` on the local file system. Stateless, so it pickles trivially."""

    def get(self, uri: str) -> bytes:
        """Return the whole file; `ObjectNotFound` if it is missing."""
        with self._open(uri) as f:
            return f.read()

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes [start, end) of the file, cut short at its end."""
        _check_range(uri, start, end)
        with self._open(uri) as f:
            f.seek(start)
            return f.read(end - start)

    def put(self, uri: str, data: bytes) -> None:
        """Write `data` to a temporary file next to the target, then rename it into place."""
        with _atomic_target(local_path(uri)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                _flush(f)

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Copy a local file into the store, atomically."""
        _require_file(path)
        with _atomic_target(local_path(uri)) as tmp:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                _flush(f)

    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Copy a stored object to a local path, atomically."""
        src = self._existing_file(uri)
        with _atomic_target(os.path.abspath(path)) as tmp:
            shutil.copyfile(src, tmp)

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every file whose URI starts with `prefix_uri`, recursively, sorted by URI."""
        prefix = local_path(prefix_uri)
        scheme = FILE_SCHEME if prefix_uri.startswith(FILE_SCHEME) else ""
        infos = [ObjectInfo(scheme + p, os.path.getsize(p)) for p in _files_with_prefix(prefix)]
        return sorted(infos, key=lambda info: info.uri)

    def exists(self, uri: str) -> bool:
        """Whether a file (not a folder) exists at `uri`."""
        return os.path.isfile(local_path(uri))

    def size(self, uri: str) -> int:
        """Size of the file in bytes."""
        return os.path.getsize(self._existing_file(uri))

    def delete(self, uri: str) -> None:
        """Remove the file; a missing file is not an error."""
        try:
            os.remove(local_path(uri))
        except FileNotFoundError:
            pass
        except IsADirectoryError as err:
            raise StorageError(f"cannot delete {uri}: it is a folder, not an object") from err

    def delete_prefix(self, prefix_uri: str) -> int:
        """Remove every file under the prefix and any folders left empty; return the file count."""
        prefix = local_path(prefix_uri)
        files = list(_files_with_prefix(prefix))
        for path in files:
            os.remove(path)
        _remove_empty_dirs(prefix)
        return len(files)

    def check(self, root_uri: str) -> None:
        """Create the root folder if needed and prove it is writable with a probe file."""
        root = local_path(root_uri)
        probe = os.path.join(root, f".orch-probe-{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            os.makedirs(root, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
        except OSError as err:
            raise StorageError(
                f"local storage root {root} is not usable ({err.strerror or err}): "
                "make it a writable folder or set storage.root to one"
            ) from err

    def _existing_file(self, uri: str) -> str:
        path = local_path(uri)
        if not os.path.isfile(path):
            raise ObjectNotFound(f"object not found: {uri}")
        return path

    def _open(self, uri: str) -> BinaryIO:
        path = self._existing_file(uri)
        try:
            return open(path, "rb")
        except FileNotFoundError as err:  # deleted between the check and the open
            raise ObjectNotFound(f"object not found: {uri}") from err


class _atomic_target:  # noqa: N801 - used like a function, as a context manager
    """Yield a temporary path in the folder of `dest`; on success rename it to `dest`, else remove it."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        folder, name = os.path.split(dest)
        self.tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")

    def __enter__(self) -> str:
        try:
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        except OSError as err:
            raise write_error(f"cannot create the folder for {self.dest}", err, "storage.root") from err
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            try:
                os.replace(self.tmp, self.dest)
                return
            except OSError as err:
                exc = err
        _remove_quietly(self.tmp)
        if isinstance(exc, OSError):
            raise write_error(f"cannot write {self.dest}", exc, "storage.root") from exc


_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space on it or set {setting} to a folder on a larger disk",
    errno.EDQUOT: "the disk quota is used up: free space or set {setting} to a folder with room",
    errno.EROFS: "the file system is read-only: remount it writable or set {setting} to a writable folder",
    errno.EACCES: "permission denied: make the folder writable for this user or set {setting} to another one",
    errno.EPERM: "permission denied: make the folder writable for this user or set {setting} to another one",
}


def write_error(what: str, err: OSError, setting: str) -> StorageError:
    """One line for a failed local write: what, why, and the fix (`setting` names where to point
    elsewhere). A full or read-only disk is no reason to retry at once (not retryable)."""
    fix = _WRITE_FIXES.get(err.errno)
    if fix is None:
        return StorageError(f"{what}: {err.strerror or err}", retryable=True)
    return StorageError(f"{what}: {err.strerror} ({fix.format(setting=setting)})")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:  # gone already, or a read-only / full file system: nothing more to do
        pass


def _flush(f: BinaryIO) -> None:
    """Push the file's bytes to disk before it is renamed into place (a crash leaves old or new)."""
    f.flush()
    os.fsync(f.fileno())


def _require_file(path: str | os.PathLike[str]) -> None:
    if not os.path.isfile(path):
        raise StorageError(f"local file to upload does not exist: {os.fspath(path)}")


def _check_range(uri: str, start: int, end: int) -> None:
    if not 0 <= start <= end:
        raise StorageError(f"invalid byte range [{start}, {end}) for {uri}: need 0 <= start <= end")


def _files_with_prefix(prefix: str) -> Iterator[str]:
    """Paths of the files whose path starts with the string `prefix`, like an S3 key prefix.

    Only entries of the prefix's folder whose name starts with its last component are walked,
    so listing `/data/run1` never walks all of `/data`.
    """
    folder, stem = os.path.split(prefix)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith(stem) or entry.name.endswith(PARTIAL_SUFFIX):
            continue
        if entry.is_file():
            yield entry.path
        elif entry.is_dir():
            yield from _walk_files(entry.path)


def _walk_files(folder: str) -> Iterator[str]:
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            if not name.endswith(PARTIAL_SUFFIX):
                yield os.path.join(dirpath, name)


def _remove_empty_dirs(prefix: str) -> None:
    """Remove folders under the prefix (the prefix's own folder included) that hold nothing."""
    if prefix.endswith(("/", os.sep)):  # a folder prefix: that folder and what is under it
        for dirpath, _dirs, _files in os.walk(prefix, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:  # not empty (e.g. an in-flight temporary file)
                pass
        return
    folder, stem = os.path.split(prefix)
    if not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        if entry.name.startswith(stem) and entry.is_dir(follow_symlinks=False):
            for dirpath, _dirs, _files in os.walk(entry.path, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty (e.g. an in-flight temporary file)
                    pass
