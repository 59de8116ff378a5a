"""Object store on S3 or any S3-compatible endpoint (AWS, MinIO, R2, moto), through boto3.

Credentials come only from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, instance roles, ...); this class never takes or keeps a key. The boto3 client is built
lazily and dropped when pickled, so a store can be shipped to Ray workers.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from orchestrator.errors import StorageError
from orchestrator.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, check_endpoint_url, parse_s3_uri

MiB = 1024 * 1024

# Defaults, in one place. S3 needs parts of at least 5 MiB (except the last one).
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB  # files at least this big are uploaded in parts
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB  # size of each part
DEFAULT_MAX_CONCURRENCY = 8  # parts uploaded or downloaded in parallel
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 5  # total attempts per request, first try included
# `check` (the first request of a command) waits less: an endpoint that accepts connections and never
# answers is named in about 2 x 8 s, not after the 5 x 60 s any other request may wait.
CHECK_READ_TIMEOUT_S = 8.0
CHECK_MAX_ATTEMPTS = 2
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes

# A response body cut short (a reset, a timeout, fewer bytes than Content-Length) after the status
# line arrived: botocore does not retry these, so `_read_object` does, up to `max_attempts` in all.
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "Forbidden",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError)
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed"}


class S3Store(ObjectStore):
    """`ObjectStore` on an S3-compatible endpoint; every method takes `s3://bucket/key` URIs."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """`endpoint_url` None means AWS; `region` None means the boto3 default (AWS_DEFAULT_REGION)."""
        if multipart_chunksize < 5 * MiB:
            raise StorageError(
                f"S3 multipart chunk size {multipart_chunksize} is below the 5 MiB S3 minimum: raise it"
            )
        check_endpoint_url(endpoint_url)
        self.endpoint_url = endpoint_url
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self._client: Any = None
        self._lock = threading.Lock()

    # -- pickling: drop the client (and its lock); the copy builds its own on first use --------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, built on first use (thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self, read_timeout: float | None = None, max_attempts: int | None = None) -> Any:
        config = Config(
            connect_timeout=self.connect_timeout,
            read_timeout=read_timeout or self.read_timeout,
            # (botocore's "max_attempts" counts retries only: one more request than it says)
            retries={"mode": "standard", "total_max_attempts": max_attempts or self.max_attempts},
            # Path-style (endpoint/bucket/key) works on every S3-compatible server; virtual-host
            # style needs DNS for bucket.endpoint, which MinIO and loopback servers lack.
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            max_pool_connections=max(10, self.max_concurrency * 2),
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )

    # -- ObjectStore ---------------------------------------------------------------------------

    def get(self, uri: str) -> bytes:
        """Return the whole object; `ObjectNotFound` if it is missing."""
        return self._read_object(uri)

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes [start, end) through a Range request, cut short at the object's end."""
        if not 0 <= start <= end:
            raise StorageError(f"invalid byte range [{start}, {end}) for {uri}: need 0 <= start <= end")
        if start == end:  # "bytes=5-4" is not a valid range; S3 would send the whole object
            return b""
        try:
            return self._read_object(uri, Range=f"bytes={start}-{end - 1}")
        except StorageError as err:
            if _error_code(err.__cause__) == "InvalidRange":  # start is at or past the end
                return b""
            raise

    def _read_object(self, uri: str, **get_args: Any) -> bytes:
        """GetObject and read its body; a body cut short is asked for again (bounded, with backoff)."""
        bucket, key = parse_s3_uri(uri)
        for attempt in range(1, self.max_attempts + 1):
            with self._errors(uri):
                response = self.client.get_object(Bucket=bucket, Key=key, **get_args)
                try:
                    return response["Body"].read()
                except _BODY_ERRORS as e:
                    cut = type(e).__name__
            if attempt < self.max_attempts:
                time.sleep(min(2.0, 0.05 * 2**attempt))
        raise StorageError(f"the S3 endpoint {self.endpoint_url or 'AWS'} cut the response for {uri} short "
                           f"{self.max_attempts} times in a row ({cut}): the endpoint answers but the transfer "
                           f"breaks; check the network or the endpoint's load, then run again", retryable=True)

    def put(self, uri: str, data: bytes) -> None:
        """Store `data` in one PutObject call (S3 writes are atomic)."""
        bucket, key = parse_s3_uri(uri)
        with self._errors(uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file; files of `multipart_threshold` bytes or more go in parallel parts."""
        if not os.path.isfile(path):
            raise StorageError(f"local file to upload does not exist: {os.fspath(path)}")
        bucket, key = parse_s3_uri(uri)
        with self._errors(uri):
            self.client.upload_file(os.fspath(path), bucket, key, Config=self._transfer_config())

    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Download to a temporary file next to `path`, then rename it into place."""
        bucket, key = parse_s3_uri(uri)
        dest = os.path.abspath(path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.orch-partial"
        try:
            with self._errors(uri):
                self.client.download_file(bucket, key, tmp, Config=self._transfer_config())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object whose URI starts with `prefix_uri` (paginated ListObjectsV2), sorted by URI."""
        bucket, _ = parse_s3_uri(prefix_uri)
        infos = [ObjectInfo(f"s3://{bucket}/{key}", size) for key, size in self._iter_objects(prefix_uri)]
        return sorted(infos, key=lambda info: info.uri)

    def exists(self, uri: str) -> bool:
        """Whether an object exists at `uri` (HeadObject)."""
        try:
            self.size(uri)
        except ObjectNotFound:
            return False
        return True

    def size(self, uri: str) -> int:
        """Size of the object in bytes (HeadObject)."""
        bucket, key = parse_s3_uri(uri)
        with self._errors(uri):
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def delete(self, uri: str) -> None:
        """Delete the object; S3 does not complain about a missing one."""
        bucket, key = parse_s3_uri(uri)
        with self._errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object under the prefix in batches of 1000; return how many were deleted."""
        bucket, _ = parse_s3_uri(prefix_uri)
        keys = [key for key, _size in self._iter_objects(prefix_uri)]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[i : i + DELETE_BATCH]]
            with self._errors(prefix_uri):
                response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(
                    f"S3 could not delete {len(response['Errors'])} objects under {prefix_uri}, "
                    f"e.g. s3://{bucket}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
                )
        return len(keys)

    def check(self, root_uri: str) -> None:
        """HeadBucket on the root's bucket: fails fast on a missing bucket, bad credentials or endpoint
        (one that never answers included: a client of its own with short timeouts and one retry)."""
        bucket, _ = parse_s3_uri(root_uri)
        read_timeout = min(self.read_timeout, CHECK_READ_TIMEOUT_S)
        client = self._make_client(read_timeout, min(self.max_attempts, CHECK_MAX_ATTEMPTS))
        with self._errors(root_uri, bucket_op=True, read_timeout=read_timeout):
            client.head_bucket(Bucket=bucket)

    # -- helpers -------------------------------------------------------------------------------

    def _iter_objects(self, prefix_uri: str) -> Iterator[tuple[str, int]]:
        bucket, prefix = parse_s3_uri(prefix_uri)
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(prefix_uri, bucket_op=True):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"], int(obj["Size"])

    @contextmanager
    def _errors(self, uri: str, *, bucket_op: bool = False, read_timeout: float | None = None) -> Iterator[None]:
        """Turn boto3 errors into one-line `StorageError`s that name the URI and the fix.

        `bucket_op`: a bare 404 means the bucket is missing (HeadBucket, listing), not an object.
        `read_timeout`: the requests' own, when not the store's (named in a timeout's line).
        """
        try:
            yield
        except Boto3Error as err:  # the transfer helpers wrap the real error; unwrap it
            cause = getattr(err, "last_exception", None) or err.__context__ or err
            raise self._translate(cause, uri, bucket_op) from err
        except (ClientError, BotoCoreError) as err:
            raise self._translate(err, uri, bucket_op, read_timeout) from err

    def _translate(self, err: Exception, uri: str, bucket_op: bool, read_timeout: float | None = None
                   ) -> StorageError:
        bucket, _ = parse_s3_uri(uri)
        endpoint = self.endpoint_url or "the AWS default endpoint"
        code = _error_code(err)
        if isinstance(err, ReadTimeoutError):
            return StorageError(
                f"the S3 endpoint {endpoint} accepted the connection for {uri} but did not answer within "
                f"{read_timeout or self.read_timeout:g} s: it is not an S3 endpoint, or it hangs; "
                "check the address and set storage.endpoint_url to the right one", retryable=True
            )
        if code == "NoSuchBucket" or (bucket_op and code in _NOT_FOUND_CODES):
            return StorageError(
                f"S3 bucket '{bucket}' does not exist at endpoint {endpoint}: "
                "create it or set storage.root to an existing bucket"
            )
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"object not found: {uri}")
        if isinstance(err, _CREDENTIAL_ERRORS) or code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 rejected the credentials for {uri} at endpoint {endpoint} ({code or 'no credentials found'}): "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that can use this bucket"
            )
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return StorageError(
                f"cannot reach the S3 endpoint {endpoint} for {uri} ({type(err).__name__}): "
                "check that it is up and set storage.endpoint_url to the right address", retryable=True
            )
        detail = f"{code}: {_error_message(err)}" if code else str(err)
        # throttling and server errors (past botocore's own retries) may pass; a refusal will not
        transient = code is None or code in _TRANSIENT_CODES or code.startswith("5")
        return StorageError(f"S3 request for {uri} at endpoint {endpoint} failed: {detail}", retryable=transient)


def _error_code(err: BaseException | None) -> str | None:
    """The S3 error code of a ClientError ("NoSuchKey", "404", ...), else None."""
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", "")) or None
    return None


def _error_message(err: BaseException) -> str:
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Message", "")) or str(err)
    return str(err)
