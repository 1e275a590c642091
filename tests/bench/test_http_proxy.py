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


def test_the_readers_s3_requests_are_exactly_those_the_server_sees_and_bounded(s3_server,
                                                                              monkeypatch, tmp_path):
    """Counted on the wire: every request the reader counts reaches the server once (none
    merged or split below it), bytes included, and no more than ``concurrency`` at a time."""
    import torch

    from models.protocol import ReadRequest
    from pipeline.read.reader import ZarrPixelSource
    from tests.pipeline.scenes import random_boxes, write_scenes

    bucket = s3_server.new_bucket("wire")
    scenes = write_scenes(f"{bucket}/pyr", [(301, 517), (200, 150)])
    request = ReadRequest(random_boxes(2, 24, 301, 517, seed=3), 0, (16, 16))
    # one proxy per setting: a hedge or timed-out copy of the first setting's reads, cancelled
    # by the reader but already on its way, must not reach the second setting's counts
    for concurrency, max_gap in ((3, 0), (64, 4096)):
        with CountingProxy(s3_server.endpoint, latency_s=0.02) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            source = ZarrPixelSource(concurrency=concurrency, max_gap=max_gap)
            out = source.read(list(scenes), request)
            counts, counted = proxy.counts(), source.counters()
            extra = counted.hedges + counted.retries
            if extra == 0:
                assert counts == {"GET": counted.requests, "total": counted.requests}
                assert proxy.response_bytes(ok_only=True) == counted.bytes
            else:  # a loaded machine: stragglers went a few round trips without an answer
                # (hedges sent; ``pipeline.store.ranges.tail_wait``) or a request timed out
                # (sent again); the used answers are counted, the other copies may reach the
                # server
                assert counted.requests <= counts["GET"] <= counted.requests + extra
                assert proxy.response_bytes(ok_only=True) >= counted.bytes
            assert 1 < proxy.most_in_flight() <= concurrency
            source.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the proxies are gone
    assert torch.equal(out, ZarrPixelSource().read(list(scenes), request))


def test_fault_rules_parse_and_refuse_unknown_kinds():
    import pytest

    from bench.http_proxy import FaultRule

    assert FaultRule.parse("503:0.05") == FaultRule("503", 0.05)
    assert FaultRule.parse("404:1:pyr/s/0/c/0/2/3") == FaultRule("404", 1.0, "pyr/s/0/c/0/2/3")
    with pytest.raises(ValueError, match="kind must be one of"):
        FaultRule("418", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        FaultRule("503", 1.5)


def test_injected_faults_are_answered_by_the_proxy_and_counted(s3_server, monkeypatch):
    """A 503 and a 404 answered by the proxy (obstore retries the 503 itself), a limit of one."""
    import pytest

    from bench.http_proxy import FaultRule

    bucket = s3_server.new_bucket("faulty")
    storage.write_bytes(f"{bucket}/k/a.bin", b"a")
    rules = [FaultRule("503", 1.0, match="/k/a.bin", limit=1), FaultRule("404", 1.0, match="/k/b")]
    with CountingProxy(s3_server.endpoint, faults=rules) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert storage.read_bytes(f"{bucket}/k/a.bin") == b"a"  # the 503, then retried
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{bucket}/k/b.bin")
        faults = proxy.faults()
    assert faults["503"] == 1 and faults["404"] >= 1 and faults["total"] == 1 + faults["404"]
