"""bench/object_server.py: ranges as S3 answers them, and the reader gets the same pixels
through it (obstore's S3 client, signed requests) as from the local pyramids."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.http_proxy import COUNTS_PATH
from models.protocol import ReadRequest
from pipeline.read.reader import ZarrPixelSource
from tests.pipeline.scenes import random_boxes, write_scenes

SERVER = Path(__file__).resolve().parents[2] / "bench" / "object_server.py"


def load_server():
    spec = importlib.util.spec_from_file_location("bench_object_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ranges():
    parse = load_server().parse_range
    assert parse(None, 100) is None
    assert parse("bytes=0-9", 100) == (0, 10)
    assert parse("bytes=90-200", 100) == (90, 100)  # clipped to the object, as S3 does
    assert parse("bytes=95-", 100) == (95, 100)
    assert parse("bytes=-30", 100) == (70, 100)
    assert parse("bytes=-300", 100) == (0, 100)
    for bad in ("bytes=100-", "bytes=0-1,5-6", "items=0-1"):
        with pytest.raises(ValueError):
            parse(bad, 100)


@pytest.fixture
def object_server(tmp_path, monkeypatch):
    """The server over ``tmp_path/objects`` with 5 ms latency; ``AWS_*`` pointed at it."""
    root = tmp_path / "objects"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--root", str(root), "--latency-ms", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        yield root, endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_reader_reads_the_same_pixels_through_it(tmp_path, object_server):
    root, endpoint = object_server
    local = write_scenes(str(tmp_path / "pyr"), [(301, 517), (200, 150)])
    keys = list(local)
    for key in keys:
        shutil.copytree(key, root / "bucket" / "pyr" / os.path.basename(key))
    s3_keys = [f"s3://bucket/pyr/{os.path.basename(k)}" for k in keys]
    request = ReadRequest(random_boxes(2, 12, 301, 517, seed=3), 1, (24, 24))
    source = ZarrPixelSource(max_gap=4096)
    start = time.perf_counter()
    got = source.read(s3_keys, request)
    np.testing.assert_array_equal(got, ZarrPixelSource(max_gap=4096).read(keys, request))
    assert time.perf_counter() - start >= 0.005  # the added latency is paid
    np.testing.assert_array_equal(source.view(s3_keys, (32, 32)), ZarrPixelSource().view(keys, (32, 32)))
    with urllib.request.urlopen(endpoint + COUNTS_PATH, timeout=10) as response:
        counts = json.loads(response.read())
    assert counts["total"] == source.counters().requests  # every GET the reader made, no more
    with pytest.raises(FileNotFoundError, match="no pyramid group"):
        source.read(["s3://bucket/pyr/missing"], ReadRequest(request.boxes[:1], 1, (24, 24)))
