"""A real S3 HTTP server (moto) on 127.0.0.1 for the tests, as a session fixture.

``s3_server`` (session scope) starts moto's threaded server on a free loopback port, exports
the standard ``AWS_*`` variables so that ``pipeline.store.storage`` (obstore) and any other S3 client
find it, and stops it at the end. ``s3_server.new_bucket()`` creates a fresh bucket and returns
its ``s3://`` URI, so tests never share state. Registered for every test package by
``tests/conftest.py``.
"""

from __future__ import annotations

import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint: ``endpoint`` is ``http://127.0.0.1:PORT``."""

    endpoint: str

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3+ characters) and return ``s3://name``."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"creating bucket {name} on {self.endpoint}: {response.status}")
        return f"s3://{name}"

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name and return its ``s3://`` URI."""
        return self.make_bucket(f"{prefix}-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 with ``AWS_*`` exported; restored and stopped after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = dict(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
