"""A real S3 HTTP server on 127.0.0.1 for the tests, as session fixtures.

``s3_server`` (session scope) starts an S3 server on free loopback ports, exports the standard
``AWS_*`` variables so that ``pipeline.store.storage`` (obstore) and any other S3 client find it,
and stops it at the end. ``s3_server.new_bucket()`` creates a fresh bucket and returns its
``s3://`` URI, so tests never share state. Registered for every test package by
``tests/conftest.py``.

The back-end is chosen by ``TEST_S3_BACKEND``: ``seaweed`` (default; a real SeaweedFS,
``pipeline.store.seaweed``) or ``moto`` (opt-in: moto's threaded server, a mock costing ~6 ms of
CPU per request, which hides the reader's own behaviour). No test needs moto: every S3 test
passes on SeaweedFS (bucket names, list-after-write, range reads, request counts through the
counting proxy), so moto is kept only to compare against it.

The session's SeaweedFS is killed, not drained, when the session ends: its graceful stop takes
~15 s (the filer waits for its own gRPC streams) to protect data that a test session throws
away. SIGKILL of its own process group (weed is one process; ``stop`` signals the group only
while the process is unreaped, so the id cannot be someone else's) and removal of the Unix
sockets it left in ``/tmp`` leave nothing running; its data directory, with ``weed.log`` for
a failed test's post-mortem, is under pytest's ``tmp_path_factory`` and goes with pytest's own
retention of old base directories.

``seaweed_server`` gives SeaweedFS whatever the back-end: the same interface, one server per
session (shared with ``s3_server`` when that is SeaweedFS too), but function scope: it exports
the ``AWS_*`` variables for the requesting test only, so a session that also uses moto's
``s3_server`` keeps pointing at moto elsewhere. A module uses it by importing it from here.
"""

from __future__ import annotations

import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.store.seaweed import SeaweedServer

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BACKENDS = ("seaweed", "moto")  # the first is the default


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


@dataclass(frozen=True)
class SeaweedS3Server(S3Server):
    """SeaweedFS behind the ``S3Server`` interface; ``server`` has its pid, ports and log."""

    server: SeaweedServer | None = None

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 characters; SigV4-signed) and return ``s3://name``."""
        self.server.make_bucket(name)
        return f"s3://{name}"


def _aws_env(endpoint: str) -> dict[str, str]:
    return dict(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)


_SEAWEED: dict[str, SeaweedS3Server] = {}


def _session_seaweed(request: pytest.FixtureRequest) -> SeaweedS3Server:
    """The session's SeaweedFS, started on first use and killed when the session ends
    (``stop(timeout_s=0)``: SIGKILL at once; the module docstring says why that is safe)."""
    if "server" not in _SEAWEED:
        from pipeline.store.seaweed import start_seaweed

        data = request.getfixturevalue("tmp_path_factory").mktemp("seaweed")
        server = start_seaweed(data, access_key=_AWS_ENV["AWS_ACCESS_KEY_ID"],
                               secret_key=_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
        _SEAWEED["server"] = SeaweedS3Server(server.endpoint, server)
        request.config.add_cleanup(lambda: _SEAWEED.pop("server").server.stop(timeout_s=0))
    return _SEAWEED["server"]


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """An S3 server on 127.0.0.1 (``TEST_S3_BACKEND``) with ``AWS_*`` exported; restored after."""
    backend = os.environ.get("TEST_S3_BACKEND", BACKENDS[0])
    if backend not in BACKENDS:
        raise ValueError(f"TEST_S3_BACKEND={backend!r}: use one of {BACKENDS}")
    if backend == "seaweed":
        server = _session_seaweed(request)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in _aws_env(server.endpoint).items():
                mp.setenv(key, value)
            yield server
        return
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in _aws_env(endpoint).items():
                mp.setenv(key, value)
            yield S3Server(endpoint)
    finally:
        moto.stop()


@pytest.fixture
def seaweed_server(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> SeaweedS3Server:
    """The session's SeaweedFS with ``AWS_*`` exported for this test (restored after it)."""
    server = _session_seaweed(request)
    for key, value in _aws_env(server.endpoint).items():
        monkeypatch.setenv(key, value)
    return server
