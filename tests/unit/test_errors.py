"""Which errors a restart of the worker group can fix (`OrchError.retryable`): the flag survives
the trip from a Ray worker to the driver (pickling), and the stores set it from the cause."""

from __future__ import annotations

import errno
import pickle

from botocore.exceptions import ClientError, EndpointConnectionError

from orchestrator.errors import CheckpointError, ConfigError, DatasetError, StorageError
from orchestrator.storage.local import write_error
from orchestrator.storage.s3 import S3Store


def test_retryable_by_class_and_by_instance_survives_pickling():
    assert not ConfigError("x").retryable and not DatasetError("x").retryable
    assert CheckpointError("x").retryable and not StorageError("x").retryable
    err = pickle.loads(pickle.dumps(StorageError("endpoint down", retryable=True)))
    assert err.retryable and str(err) == "endpoint down" and type(err) is StorageError


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


def test_s3_errors_retryable_only_when_waiting_can_help():
    store = S3Store(endpoint_url="http://127.0.0.1:9")
    uri = "s3://bucket/key"
    assert not store._translate(_client_error("InvalidAccessKeyId"), uri, False).retryable
    assert not store._translate(_client_error("NoSuchBucket"), uri, False).retryable
    assert not store._translate(_client_error("AccessDenied"), uri, False).retryable
    assert store._translate(_client_error("SlowDown"), uri, False).retryable
    assert store._translate(_client_error("InternalError"), uri, False).retryable
    assert store._translate(_client_error("503"), uri, False).retryable
    assert store._translate(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), uri, False).retryable


def test_local_write_errors_name_the_fix():
    full = write_error("cannot write /x/y", OSError(errno.ENOSPC, "No space left on device"), "storage.root")
    assert "disk is full" in str(full) and "storage.root" in str(full) and not full.retryable
    ro = write_error("cannot write /x/y", OSError(errno.EROFS, "Read-only file system"), "ORCH_LOCAL_DIR")
    assert "read-only" in str(ro) and "ORCH_LOCAL_DIR" in str(ro) and not ro.retryable
    other = write_error("cannot write /x/y", OSError(errno.EIO, "Input/output error"), "storage.root")
    assert other.retryable


def test_the_one_line_of_an_orch_error_raised_in_a_ray_task():
    """A job's dataset is prepared in a Ray task: its runner fails the job with the task's own line
    (`orch data prepare`'s), not Ray's text with the task's traceback."""
    from ray.exceptions import RayTaskError

    from orchestrator.execution.failures import own_error

    line = "/c/junk.txt is not UTF-8 text (invalid start byte at byte 128); convert it to UTF-8"
    err = RayTaskError("prepare", "Traceback (most recent call last):\n  File ...", DatasetError(line))
    err = err.as_instanceof_cause()  # as ray.get raises it: also a DatasetError, whose text is Ray's
    assert isinstance(err, DatasetError) and str(err) != line
    assert str(own_error(err)) == line
    other = RayTaskError("prepare", "Traceback ...", ValueError("boom"))
    assert own_error(other) is other
