"""Object storage: one small interface (`ObjectStore`) over S3-compatible endpoints and local folders.

    store = open_store("s3://bucket/runs", endpoint_url="http://127.0.0.1:9000")
    store.put(join_uri("s3://bucket/runs", "a.bin"), b"...")
"""

from __future__ import annotations

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
    is_relative_key,
    join_uri,
    local_path,
    parse_s3_uri,
    to_uri,
)
from orchestrator.storage.local import LocalStore
from orchestrator.storage.routing import RoutingStore, open_object, routed
from orchestrator.storage.s3 import S3Store

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "RoutingStore",
    "S3Store",
    "StorageError",
    "is_relative_key",
    "join_uri",
    "local_path",
    "open_object",
    "open_store",
    "parse_s3_uri",
    "routed",
    "to_uri",
]


def open_store(
    uri_or_root: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    **s3_options: Any,
) -> ObjectStore:
    """The backend for a URI: `s3://` gives an `S3Store`, `file://` or an absolute path a `LocalStore`.

    `endpoint_url`, `region` and `s3_options` (e.g. `multipart_threshold`, `max_attempts`; see
    `S3Store`) apply to S3 only and are ignored for local folders.
    """
    text = os.fspath(uri_or_root)
    if text.startswith(S3_SCHEME):
        return S3Store(endpoint_url=endpoint_url, region=region, **s3_options)
    if text.startswith(FILE_SCHEME) and os.path.isabs(text[len(FILE_SCHEME) :]):
        return LocalStore()
    if "://" not in text and os.path.isabs(text):
        return LocalStore()
    raise StorageError(
        f"unsupported storage URI {text!r}: use one of {', '.join(SUPPORTED_SCHEMES)} "
        "(file:///abs/path) or an absolute local path in storage.root"
    )
