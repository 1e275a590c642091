"""The counting proxy forwards S3 requests unchanged, counts them, and adds latency."""

from __future__ import annotations

import os
import time

from bench.http_proxy import CountingProxy
from pipeline.store import storage


def test_proxy_counts_and_delays_s3_requests(s3_server, monkeypatch):
    bucket = s3_server.new_bucket("proxy")
    with CountingProxy(s3_server.endpoint, latency_s=0.05) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert os.environ["AWS_ENDPOINT_URL"] == proxy.endpoint
        storage.write_bytes(f"{bucket}/a/b.bin", b"x" * 1000)
        t0 = time.perf_counter()
        data = storage.read_bytes(f"{bucket}/a/b.bin")
        elapsed = time.perf_counter() - t0
        counts = proxy.counts()
    assert data == b"x" * 1000
    assert counts["PUT"] == 1 and counts["GET"] == 1 and counts["total"] == 2
    assert elapsed >= 0.05
    assert proxy.response_bytes() >= 1000
