"""The reader in a child process: same tensors and counters as in process, errors that say what
failed, a dead child reported (and replaced on the next call), nothing left running."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import time

import pytest
import torch

from models.protocol import PixelSource, ReadRequest
from pipeline.read.process import ProcessPixelSource
from pipeline.read.reader import ReadError, ZarrPixelSource
from pipeline.read.settings import ReaderSettings
from pipeline.read.source import ZarrSourceFactory
from tests.pipeline.scenes import random_boxes, write_scenes


@pytest.fixture(params=["file", "s3"])
def shared_root(request, tmp_path) -> str:
    """A store both processes can see (``memory://`` lives in one process only)."""
    if request.param == "file":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").new_bucket("proc") + "/root"


@pytest.fixture
def source():
    src = ProcessPixelSource(ZarrSourceFactory(ReaderSettings(concurrency=8, max_gap=0, process=False,
                                                              prefetch_indexes=False)))
    yield src
    src.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _without_faults(counters):
    return dataclasses.replace(counters, retries=0, timeouts=0, errors=0, hedges=0)


def test_same_tensors_and_counters_as_in_process(shared_root, source):
    scenes = write_scenes(shared_root, [(301, 517), (200, 150)])
    keys = list(scenes)
    inner = ZarrPixelSource(concurrency=8)
    assert isinstance(source, PixelSource)
    for level, size in [(0, (40, 40)), (1, (24, 24)), (2, (8, 8))]:
        request = ReadRequest(random_boxes(2, 12, 301, 517, seed=level), level, size)
        theirs = source.submit(keys, request).result(timeout=60)
        assert torch.equal(theirs, inner.read(keys, request))
    assert torch.equal(source.view(keys, (32, 48)), inner.view(keys, (32, 48)))
    assert torch.equal(source.level0_sizes(keys), inner.level0_sizes(keys))
    # the same requests and bytes; how many S3 requests were hedged or retried depends on
    # timing (a loaded machine hedges more), not on the process
    assert _without_faults(source.counters()) == _without_faults(inner.counters())
    assert source.counters().chunk_requests > 0
    source.reset_counters()
    assert source.counters().requests == 0
    inner.close()


def test_concurrent_submits_each_get_their_own_answer(shared_root, source):
    scenes = write_scenes(shared_root, [(301, 517), (200, 150)])
    keys = list(scenes)
    inner = ZarrPixelSource()
    requests = [ReadRequest(random_boxes(2, 5, 301, 517, seed=s), s % 3, (16, 16)) for s in range(12)]
    futures = [source.submit(keys, r) for r in requests]  # all in flight at once
    for future, request in zip(futures, requests, strict=True):
        assert torch.equal(future.result(timeout=60), inner.read(keys, request))
    inner.close()


def test_a_failed_read_names_the_scene(tmp_path, source):
    missing = str(tmp_path / "store" / "no-such-scene")
    future = source.submit([missing], ReadRequest(torch.tensor([[[0, 0, 8, 8]]]), 0, (8, 8)))
    with pytest.raises(Exception, match="no-such-scene"):
        future.result(timeout=60)
    with pytest.raises(ValueError, match="2 keys for 1 rows"):  # raised in the child, sent back
        source.read([missing, missing], ReadRequest(torch.tensor([[[0, 0, 8, 8]]]), 0, (8, 8)))


def test_a_dead_child_fails_its_futures_and_the_next_call_starts_another(tmp_path, source):
    scenes = write_scenes(str(tmp_path / "store"), [(301, 517)])
    keys = list(scenes)
    request = ReadRequest(random_boxes(1, 4, 301, 517), 0, (8, 8))
    first = source.read(keys, request)
    pid = source.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while source._child.failed is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ReadError, match=f"reader process {pid} exited with status -9"):
        source._child.call("submit", keys, request).result(timeout=30)
    assert torch.equal(source.read(keys, request), first)  # a new child
    assert source.pid != pid


def test_pickles_as_its_factory_and_close_stops_the_child(tmp_path, source):
    scenes = write_scenes(str(tmp_path / "store"), [(200, 150)])
    source.level0_sizes(list(scenes))
    pid = source.pid
    assert alive(pid)
    clone = pickle.loads(pickle.dumps(source))
    assert clone.pid is None and clone.factory == source.factory
    source.close()
    assert not alive(pid)
    assert source.pid is None


def test_memory_stores_are_refused_with_a_clear_message(source):
    with pytest.raises(ValueError, match="memory:// store lives in one process"):
        source.view(["memory://bucket/scene"], (8, 8))
    assert source.pid is None  # nothing was started
