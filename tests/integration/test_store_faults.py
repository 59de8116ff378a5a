"""The S3 store through a fault-injecting proxy (tests/fault_proxy.py) in front of the moto
endpoint: every byte read back equals what was written, and the retries stay bounded."""

from __future__ import annotations

import hashlib
import os

import pytest

from orchestrator.storage import S3Store
from tests.fault_proxy import FaultProxy


@pytest.fixture
def objects(s3_server):
    bucket = s3_server.make_bucket("faults")
    client = s3_server.client()
    blobs = {f"s3://{bucket}/obj-{i}.bin": os.urandom(50_000 + 997 * i) for i in range(20)}
    for uri, data in blobs.items():
        client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=data)
    return blobs


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.reliability(category="fault: object store", case="S3 response bodies cut short (30% of GETs)",
                         lost="nothing: every byte read back equals what was written",
                         happened="read again (bounded retries); each object and range read back byte for byte")
def test_bodies_cut_short_are_read_again(objects, s3_server, reliability_tries):
    """botocore does not retry a body cut short after the status line; the store does."""
    with FaultProxy(s3_server.endpoint_url, truncate=0.3, only_get=True, seed=7) as proxy:
        store = S3Store(endpoint_url=proxy.url, max_attempts=8)
        for uri, data in objects.items():
            assert _digest(store.get(uri)) == _digest(data)
            assert store.get_range(uri, 1000, 21000) == data[1000:21000]
    reliability_tries(proxy.counts["truncate"])
    assert proxy.counts["truncate"] >= 5
    # bounded: at most max_attempts GETs per read, and no more requests than reads plus their retries
    assert proxy.counts["requests"] <= 2 * len(objects) * 8


@pytest.mark.reliability(category="fault: object store",
                         case="S3 503 SlowDown, connection resets and cut bodies together (gets, downloads, puts)",
                         lost="nothing: every object read back and written equals the original",
                         happened="retried with backoff (bounded); every read, download and upload byte for byte")
def test_slowdowns_resets_and_cut_bodies_together(objects, s3_server, tmp_path, reliability_tries):
    with FaultProxy(s3_server.endpoint_url, slowdown=0.2, reset=0.02, truncate=0.05, seed=3) as proxy:
        store = S3Store(endpoint_url=proxy.url, max_attempts=10)
        for uri, data in objects.items():
            assert _digest(store.get(uri)) == _digest(data)
            store.get_file(uri, tmp_path / "copy.bin")
            assert _digest((tmp_path / "copy.bin").read_bytes()) == _digest(data)
            store.put(uri + ".again", data)
        for uri, data in objects.items():
            assert store.size(uri + ".again") == len(data)
    reliability_tries(proxy.counts["slowdown"] + proxy.counts["reset"] + proxy.counts["truncate"])
    assert proxy.counts["slowdown"] > 0 and proxy.counts["truncate"] > 0
