"""A real S3 HTTP endpoint on loopback (moto in server mode) for tests.

Import the fixture from a conftest (`from tests.fixtures_s3 import s3_server`). `s3_server` is
session-scoped: it starts one moto server on a free loopback port and puts dummy AWS credentials in
`os.environ` for the whole session (restored at the end), so processes that tests spawn (Ray
workers) inherit them and reach the same endpoint.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Dummy credentials: moto accepts any keys. Region fixed so bucket creation needs no location.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on the instance metadata service
}
# Set in a developer's shell, these would override or confuse the dummy keys above.
_CLEARED_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Server:
    """A running moto server: its endpoint and helpers to make buckets and raw clients."""

    endpoint_url: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """A raw boto3 S3 client on this endpoint (for test setup and inspection)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)

    def make_bucket(self, prefix: str = "bucket") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto_server() -> tuple[ThreadedMotoServer, S3Server]:
    """Start moto on 127.0.0.1 at a free port; return the server (to stop) and its `S3Server`."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, S3Server(endpoint_url=f"http://{host}:{port}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session, with dummy credentials in os.environ meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _CLEARED_AWS_ENV:
            mp.delenv(name, raising=False)
        for name, value in DUMMY_AWS_ENV.items():
            mp.setenv(name, value)
        server, info = start_moto_server()
        try:
            yield info
        finally:
            server.stop()
