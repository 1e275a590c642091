"""Fixtures for pipeline tests: store URIs of every kind (the S3 server is ``tests/s3.py``)."""

from __future__ import annotations

import uuid

import pytest

from tests.s3 import S3Server


@pytest.fixture(params=["file", "memory", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty root URI on every kind of store (the conformance suite runs on each)."""
    if request.param == "file":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex[:12]}/root"
    server: S3Server = request.getfixturevalue("s3_server")
    return server.new_bucket("conf") + "/root"
