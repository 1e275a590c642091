"""The attended-chunk reader: identical to the in-memory source, and reads only what it plans."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from models.memory import TensorPyramidSource
from models.protocol import PixelSource, ReadRequest
from pipeline.read import reader
from pipeline.read.plan import plan_ranges, plan_reads
from pipeline.read.reader import ByteLRU, ReadError, ZarrPixelSource, locate
from pipeline.store import storage
from pipeline.store.pyramid import write_pyramid
from pipeline.store.ranges import RangeStore
from pipeline.store.storage import join_uri
from tests.pipeline.scenes import (
    CHUNK,
    COARSEST,
    SHARD,
    random_boxes,
    textured,
    write_scenes,
)


@pytest.fixture
def scenes(store_root):
    return write_scenes(store_root, [(301, 517), (200, 150)])


def test_is_a_pixel_source():
    assert isinstance(ZarrPixelSource(), PixelSource)


def test_same_tensors_as_the_in_memory_source(scenes):
    memory = TensorPyramidSource.from_images(scenes, coarsest=COARSEST)
    source = ZarrPixelSource()
    keys = list(scenes)
    boxes = random_boxes(2, 12, 301, 517, seed=1)
    for level, size in [(0, (40, 40)), (0, (7, 13)), (1, (24, 24)), (2, (8, 8))]:
        request = ReadRequest(boxes, level, size)
        np.testing.assert_array_equal(source.read(keys, request), memory.read(keys, request))
    same_size = ReadRequest(torch.tensor([[[5, 6, 69, 70]], [[-3, -4, 61, 60]]]), 0, (64, 64))
    assert torch.equal(source.read(keys, same_size), memory.read(keys, same_size))
    empty = ReadRequest(torch.zeros((2, 0, 4), dtype=torch.int64), 0, (8, 8))
    assert source.read(keys, empty).shape == memory.read(keys, empty).shape == (2, 0, 3, 8, 8)
    for size in [(32, 32), (64, 100), (400, 400), (19, 77)]:
        assert torch.equal(source.view(keys, size), memory.view(keys, size)), size
    assert torch.equal(source.level0_sizes(keys), memory.level0_sizes(keys))
    source.close()


def test_pixels_land_where_the_box_says(tmp_path):
    # values encode (y, x): a misplaced or transposed patch fails loudly
    h, w = 300, 200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy % 251, xx % 241, (yy // 251) * 16 + xx // 241]).astype(np.uint8) + 1
    uri = write_pyramid(str(tmp_path), "coords", img, {}, chunk=CHUNK, shard=SHARD)
    source = ZarrPixelSource()
    boxes = torch.tensor([[[17, 33, 81, 97], [250, 180, 314, 244], [-5, -7, 59, 57]]])
    out = source.read([uri], ReadRequest(boxes, 0, (64, 64)))[0]
    for patch, (y0, x0, y1, x1) in zip(out, boxes[0].tolist(), strict=True):
        expected = np.zeros((3, 64, 64), np.float32)
        ys, xs = slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w))
        expected[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = (
            img[:, ys, xs] / 255.0)
        np.testing.assert_array_equal(patch.numpy(), expected)


def shard_index(scene_uri: str, level: int, sy: int, sx: int) -> np.ndarray | None:
    """The shard index parsed straight from the object's bytes (independent of the reader)."""
    uri = join_uri(scene_uri, str(level), "c", "0", str(sy), str(sx))
    if not storage.exists(uri):
        return None
    n = SHARD // CHUNK
    raw = storage.read_bytes(uri)[: 16 * n * n]  # the index is at the start of the object
    return np.frombuffer(raw, dtype="<u8").reshape(1, n, n, 2)


def expected_requests(scene_uri: str, boxes, level: int, shape, read_before=None):
    """(index (key, start, end) set, chunk (key, start, end) set, number of chunks) the plan
    names. The index is at the start of each shard object: per shard, one request for the run
    of 16-byte entries from the first to the last planned chunk whose entry was not read before
    (``read_before``: key -> set of entry numbers, updated), the whole index with its crc32c
    when the run is every entry."""
    read_before = {} if read_before is None else read_before
    plan = plan_reads(boxes, level, shape, (3, CHUNK, CHUNK), (3, SHARD, SHARD))
    _, prefix = locate(scene_uri)
    n = SHARD // CHUNK
    index_ranges, chunk_ranges = set(), set()
    for shard, chunks in plan.by_shard().items():
        key = f"{prefix}/{level}/c/0/{shard.sy}/{shard.sx}"
        known = read_before.setdefault(key, set())
        entries = {(c.cy % n) * n + c.cx % n for c in chunks} - known
        if entries:
            first, last = min(entries), max(entries)
            whole = (first, last) == (0, n * n - 1)
            index_ranges.add((key, 0, 16 * n * n + 4) if whole else (key, 16 * first, 16 * (last + 1)))
            known.update(range(first, last + 1))
        index = shard_index(scene_uri, level, shard.sy, shard.sx)
        for r in plan_ranges(shard, chunks, index, plan.chunks_per_shard).ranges:
            chunk_ranges.add((key, r.start, r.end))
    return index_ranges, chunk_ranges, len(plan.chunks)


def test_reads_exactly_the_planned_chunks_and_never_repeats_metadata(scenes):
    uri = next(iter(scenes))
    _, prefix = locate(uri)
    source = ZarrPixelSource(record_requests=True)
    shape = tuple(scenes[uri].shape)
    boxes = random_boxes(1, 6, 301, 517, seed=2)
    source.read([uri], ReadRequest(boxes, 0, (32, 32)))
    log = source.requests()
    read_before: dict = {}
    index_ranges, chunk_ranges, n_chunks = expected_requests(uri, boxes[0], 0, shape, read_before)
    assert sorted(r.key for r in log if r.kind == "metadata") == [
        f"{prefix}/0/zarr.json", f"{prefix}/zarr.json"]
    index_log = [(r.key, r.start, r.end) for r in log if r.kind == "index"]
    assert sorted(index_log) == sorted(index_ranges)  # each shard's entry run once
    chunk_log = [(r.key, r.start, r.end) for r in log if r.kind == "chunk"]
    assert len(chunk_log) == len(set(chunk_log))
    assert set(chunk_log) == chunk_ranges
    counters = source.counters()
    assert counters.chunks == n_chunks and counters.pixels == n_chunks * 3 * CHUNK * CHUNK
    assert counters.requests == len(log) and counters.bytes == sum(r.nbytes for r in log)
    assert counters.chunk_bytes == sum(e - s for _, s, e in chunk_ranges)
    assert counters.index_bytes == sum(e - s for _, s, e in index_ranges)
    assert counters.index_bytes < len(index_ranges) * (16 * (SHARD // CHUNK) ** 2 + 4)

    # new boxes on the same scene: no metadata again, only index entries not read yet
    source.reset_counters()
    more = random_boxes(1, 6, 301, 517, seed=3)
    source.read([uri], ReadRequest(more, 0, (32, 32)))
    log = source.requests()
    new_index_ranges, new_ranges, _ = expected_requests(uri, more[0], 0, shape, read_before)
    assert [r for r in log if r.kind == "metadata"] == []
    assert sorted((r.key, r.start, r.end) for r in log if r.kind == "index") == sorted(new_index_ranges)
    assert {(r.key, r.start, r.end) for r in log if r.kind == "chunk"} == new_ranges

    # the first boxes again: chunk data only
    source.reset_counters()
    source.read([uri], ReadRequest(boxes, 0, (32, 32)))
    again = source.counters()
    assert (again.metadata_requests, again.index_requests) == (0, 0)
    assert again.chunk_requests == len(chunk_ranges)


def test_grid_aligned_patches_fetch_exactly_the_requested_pixels(tmp_path):
    uri = write_pyramid(str(tmp_path), "s", textured(3, 256, 256), {}, chunk=CHUNK, shard=SHARD)
    source = ZarrPixelSource()
    boxes = torch.tensor([[[0, 0, 64, 64], [64, 128, 128, 192], [192, 16, 256, 80]]])
    source.read([uri], ReadRequest(boxes, 0, (64, 64)))
    assert source.counters().pixels == 3 * 3 * 64 * 64


def test_a_batch_with_the_same_scene_twice_reads_its_metadata_once(scenes):
    uri = next(iter(scenes))
    source = ZarrPixelSource()
    boxes = random_boxes(2, 3, 301, 517, seed=4)
    out = source.read([uri, uri], ReadRequest(boxes, 0, (16, 16)))
    assert out.shape == (2, 3, 3, 16, 16)
    assert source.counters().metadata_requests == 2  # group + level 0, not 4


def test_reads_an_array_written_by_zarr_python_itself(tmp_path):
    """The layout the reader parses is zarr's, not only our writer's: a sharded array written
    by zarr-python's public API (zstd and uncompressed) reads pixel for pixel the same."""
    import zarr

    img = textured(3, 150, 210)
    for name, compressors in (("zstd", zarr.codecs.ZstdCodec(level=3)), ("raw", None)):
        uri = write_pyramid(str(tmp_path), name, img, {}, chunk=CHUNK, shard=SHARD, coarsest=10**6)
        store = storage.open_store(join_uri(uri, "0"), read_only=False)
        for key in storage.list_prefix(join_uri(uri, "0", "c")):
            storage.delete_object(key)
        array = zarr.create_array(store, shape=img.shape, dtype="uint8", chunks=(3, CHUNK, CHUNK),
                                  shards=(3, SHARD, SHARD), compressors=compressors,
                                  zarr_format=3, overwrite=True, fill_value=0)
        array[...] = img
        boxes = torch.tensor([[[0, 0, 150, 210], [17, 33, 90, 150]]])
        out = ZarrPixelSource().read([uri], ReadRequest(boxes, 0, (30, 30)))
        memory = TensorPyramidSource.from_images({uri: torch.from_numpy(img)}, coarsest=10**6)
        assert torch.equal(out, memory.read([uri], ReadRequest(boxes, 0, (30, 30)))), name


def test_level_paths_other_than_the_writers_cost_one_more_request(tmp_path):
    """The first read guesses a level's path as ``str(level)`` to ask for the group's and the
    level's metadata at once; a pyramid whose levels live elsewhere still reads right."""
    img = textured(3, 120, 90)
    uri = write_pyramid(str(tmp_path), "s", img, {}, chunk=CHUNK, shard=SHARD, coarsest=10**6)
    os.rename(os.path.join(uri, "0"), os.path.join(uri, "full"))
    group = json.loads(storage.read_bytes(join_uri(uri, "zarr.json")))
    group["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"] = "full"
    storage.write_bytes(join_uri(uri, "zarr.json"), json.dumps(group).encode())
    request = ReadRequest(torch.tensor([[[3, 4, 50, 60]]]), 0, (20, 20))
    source = ZarrPixelSource(record_requests=True)
    out = source.read([uri], request)
    memory = TensorPyramidSource.from_images({uri: torch.from_numpy(img)}, coarsest=10**6)
    assert torch.equal(out, memory.read([uri], request))
    metadata = [(r.key.split("/s/")[-1], r.nbytes > 0) for r in source.requests() if r.kind == "metadata"]
    assert sorted(metadata) == [("0/zarr.json", False), ("full/zarr.json", True), ("zarr.json", True)]


def test_a_level_with_codecs_it_cannot_decode_is_refused_naming_it(tmp_path):
    uri = write_pyramid(str(tmp_path), "s", textured(3, 100, 100), {}, chunk=CHUNK, shard=SHARD)
    meta_uri = join_uri(uri, "0", "zarr.json")
    document = json.loads(storage.read_bytes(meta_uri))
    document["codecs"][0]["configuration"]["codecs"][1] = {"name": "blosc", "configuration": {}}
    storage.write_bytes(meta_uri, json.dumps(document).encode())
    request = ReadRequest(torch.tensor([[[0, 0, 10, 10]]]), 0, (10, 10))
    with pytest.raises(ValueError, match=r"scene .*/s level 0: unsupported inner codecs \['blosc'\]"):
        ZarrPixelSource().read([uri], request)


def test_submit_returns_a_future_and_the_source_pickles_without_its_loop(scenes):
    keys = list(scenes)
    request = ReadRequest(random_boxes(2, 4, 301, 517, seed=6), 1, (12, 12))
    source = ZarrPixelSource(concurrency=4, cache_bytes=1 << 20)
    future = source.submit(keys, request)
    direct = source.read(keys, request)
    assert torch.equal(future.result(timeout=60), direct)
    data = pickle.dumps(source)
    assert len(data) < 500
    clone = pickle.loads(data)
    assert clone._loop is None and clone.concurrency == 4
    assert torch.equal(clone.read(keys, request), direct)
    assert clone.counters().metadata_requests == 4  # fresh caches in the copy
    source.close()
    assert torch.equal(source.read(keys, request), direct)  # a closed source restarts


def test_cache_bound_in_bytes():
    lru = ByteLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    lru.get("a")  # a is now the most recent
    lru.put("c", 3, 40)
    assert "a" in lru and "b" not in lru and "c" in lru and lru.nbytes == 80
    lru.put("huge", 4, 101)
    assert "huge" not in lru and lru.nbytes == 80


def test_a_tiny_cache_refetches_metadata(scenes):
    uri = next(iter(scenes))
    source = ZarrPixelSource(cache_bytes=0)
    request = ReadRequest(torch.tensor([[[0, 0, 8, 8]]]), 0, (8, 8))
    source.read([uri], request)
    first = source.counters().metadata_requests
    source.read([uri], request)
    assert source.counters().metadata_requests == 2 * first


class SlowRanges(RangeStore):
    """Reads another store asynchronously (like S3) after a delay, and records the most
    requests in flight at once."""

    in_flight = 0
    most = 0

    def __init__(self, inner):
        super().__init__(inner.root, inner.log)
        self.inner = inner

    async def _fetch(self, key, byte_range):
        SlowRanges.in_flight += 1
        SlowRanges.most = max(SlowRanges.most, SlowRanges.in_flight)
        try:
            await asyncio.sleep(0.005)
            if self.inner.immediate:
                return self.inner._fetch_now(key, byte_range)
            return await self.inner._fetch(key, byte_range)
        finally:
            SlowRanges.in_flight -= 1


def test_concurrency_is_bounded(scenes, monkeypatch):
    real_open = reader.open_ranges
    monkeypatch.setattr(reader, "open_ranges", lambda root, log, **kw: SlowRanges(real_open(root, log, **kw)))
    SlowRanges.most = 0
    source = ZarrPixelSource(concurrency=3)
    out = source.read(list(scenes), ReadRequest(random_boxes(2, 20, 301, 517, seed=7), 0, (8, 8)))
    assert SlowRanges.most == 3
    assert torch.equal(out, ZarrPixelSource().read(list(scenes), ReadRequest(
        random_boxes(2, 20, 301, 517, seed=7), 0, (8, 8))))


def test_errors_name_the_scene_level_and_object(tmp_path):
    root = str(tmp_path)
    img = np.maximum(textured(3, 130, 130), 1)  # no empty chunk: chunk (0, 0) follows the index
    uri = write_pyramid(root, "s", img, {}, chunk=CHUNK, shard=SHARD)
    first = 16 * (SHARD // CHUNK) ** 2 + 4  # the index (at the start) and its crc32c
    source = ZarrPixelSource()
    box = ReadRequest(torch.tensor([[[0, 0, 10, 10]]]), 0, (10, 10))
    with pytest.raises(FileNotFoundError, match="no pyramid group at .*nope"):
        source.read([join_uri(root, "nope")], box)
    with pytest.raises(ValueError, match="has 1 levels, asked for 5"):
        source.read([uri], ReadRequest(box.boxes, 5, (10, 10)))
    shard = join_uri(uri, "0", "c", "0", "0", "0")
    data = bytearray(storage.read_bytes(shard))
    data[first : first + 4] = bytes(4)  # break the zstd magic number of the first chunk
    storage.write_bytes(shard, bytes(data))
    with pytest.raises(ReadError, match=rf"scene .*/s level 0 object .*0/c/0/0/0 bytes \[{first}, "):
        ZarrPixelSource().read([uri], box)
    storage.write_bytes(shard, bytes(data[: first + 3]))  # truncated inside the first chunk
    with pytest.raises(ReadError, match=rf"object .*0/c/0/0/0 bytes \[{first}, .*truncated"):
        ZarrPixelSource().read([uri], box)
    data[5] ^= 1  # a flipped bit in the index: reading every entry checks its crc32c
    storage.write_bytes(shard, bytes(data))
    whole = ReadRequest(torch.tensor([[[0, 0, SHARD, SHARD]]]), 0, (SHARD, SHARD))
    with pytest.raises(ReadError, match="shard index of .*0/c/0/0/0.*crc32c mismatch"):
        ZarrPixelSource().read([uri], whole)


def test_incomplete_scene_is_refused(tmp_path):
    root = str(tmp_path)
    uri = write_pyramid(root, "s", textured(3, 100, 100), {}, chunk=CHUNK, shard=SHARD)
    meta = join_uri(uri, "zarr.json")
    storage.write_bytes(meta, storage.read_bytes(meta).replace(b'"complete": true',
                                                               b'"complete": false'))
    with pytest.raises(ValueError, match="incomplete"):
        ZarrPixelSource().level0_sizes([uri])


def test_absent_chunks_read_as_zero(tmp_path):
    img = textured(3, 128, 128)
    img[:, :64, :] = 0  # a whole shard row is zero: no objects, so no index either
    uri = write_pyramid(str(tmp_path), "z", img, {}, chunk=CHUNK, shard=SHARD)
    source = ZarrPixelSource(record_requests=True)
    out = source.read([uri], ReadRequest(torch.tensor([[[0, 0, 70, 70]]]), 0, (70, 70)))
    np.testing.assert_array_equal(out[0, 0].numpy(), img[:, :70, :70] / np.float32(255))
    assert source.counters().chunks == 25
    log = source.requests()
    assert len([r for r in log if r.kind == "index"]) == 4  # a missing object is learnt once
    assert {r.key.rsplit("/", 2)[-2] for r in log if r.kind == "chunk"} == {"1"}  # shard row 1


def test_local_ranges_are_read_directly_and_counted_like_any_store(tmp_path, monkeypatch):
    shapes = [(301, 517), (200, 150)]
    on_disk = write_scenes(str(tmp_path / "disk"), shapes)
    in_memory = write_scenes(f"memory://{tmp_path.name}/mem", shapes)
    boxes = random_boxes(2, 12, 301, 517, seed=4)
    logs = []
    for scenes in (on_disk, in_memory):
        source = ZarrPixelSource(record_requests=True)
        out = source.read(list(scenes), ReadRequest(boxes, 1, (16, 16)))
        logs.append(([(r.kind, r.key, r.start, r.end, r.nbytes) for r in source.requests()],
                     source.counters(), out))
    (disk_log, disk_counts, disk_out), (mem_log, mem_counts, mem_out) = logs
    assert torch.equal(disk_out, mem_out)
    assert disk_counts == mem_counts and disk_counts.chunk_requests > 0
    strip = lambda log: sorted((k, key[key.index("scene-"):], s, e, n) for k, key, s, e, n in log)  # noqa: E731
    assert strip(disk_log) == strip(mem_log)


def test_a_shard_gone_after_its_index_was_read_names_the_object(tmp_path):
    img = np.maximum(textured(3, 130, 130), 1)  # no empty chunk: chunk (0, 0) follows the index
    uri = write_pyramid(str(tmp_path), "s", img, {}, chunk=CHUNK, shard=SHARD)
    first = 16 * (SHARD // CHUNK) ** 2 + 4  # the index (at the start) and its crc32c
    source = ZarrPixelSource()
    box = ReadRequest(torch.tensor([[[0, 0, 10, 10]]]), 0, (10, 10))
    source.read([uri], box)  # the shard index is cached now
    shard = join_uri(uri, "0", "c", "0", "0", "0")
    data = storage.read_bytes(shard)
    storage.write_bytes(shard, data[: first + 10])
    with pytest.raises(ReadError, match=rf"object .*0/c/0/0/0 bytes \[{first}, \d+\): expected \d+ "
                                        "bytes, got 10"):
        source.read([uri], box)
    os.remove(shard)
    with pytest.raises(ReadError, match=rf"object .*0/c/0/0/0 bytes \[{first}, \d+\): expected \d+ "
                                        r"bytes, got nothing \(the object is gone\)"):
        source.read([uri], box)


def test_prefetching_indexes_asks_for_every_shard_of_the_level_once(scenes):
    uri = next(iter(scenes))
    shape = tuple(scenes[uri].shape)
    plain, eager = ZarrPixelSource(), ZarrPixelSource(prefetch_indexes=True)
    first, second = (ReadRequest(random_boxes(1, 4, 301, 517, seed=s), 0, (8, 8)) for s in (5, 6))
    shards = math.ceil(shape[1] / SHARD) * math.ceil(shape[2] / SHARD)
    for request, index_requests in ((first, shards), (second, 0)):
        plain.reset_counters()
        eager.reset_counters()
        assert torch.equal(eager.read([uri], request), plain.read([uri], request))
        assert eager.counters().index_requests == index_requests
        assert eager.counters().chunk_requests == plain.counters().chunk_requests
    assert plain.counters().index_requests > 0  # without prefetch, new shards cost an index read
    eager.reset_counters()
    eager.read([uri], ReadRequest(first.boxes, 1, (8, 8)))  # another level: its own indexes
    level1 = math.ceil(math.ceil(shape[1] / 2) / SHARD) * math.ceil(math.ceil(shape[2] / 2) / SHARD)
    assert eager.counters().index_requests == level1


def test_levels_with_more_shards_than_the_cap_are_not_prefetched(scenes):
    uri = next(iter(scenes))
    shape = tuple(scenes[uri].shape)
    shards = math.ceil(shape[1] / SHARD) * math.ceil(shape[2] / SHARD)
    plain = ZarrPixelSource()
    capped = ZarrPixelSource(prefetch_indexes=True, prefetch_max_shards=shards - 1)
    request = ReadRequest(random_boxes(1, 4, 301, 517, seed=5), 0, (8, 8))
    assert torch.equal(capped.read([uri], request), plain.read([uri], request))
    assert capped.counters().index_requests == plain.counters().index_requests < shards


def test_concurrent_reads_come_back_in_the_order_they_were_asked(scenes):
    source = ZarrPixelSource()
    keys = list(scenes)
    done = []
    requests = [ReadRequest(random_boxes(2, 30 - 8 * i, 301, 517, seed=i), 0, (8, 8)) for i in range(4)]
    futures = [source.submit(keys, r) for r in requests]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _, i=i: done.append(i))
    for f in futures:
        f.result(timeout=60)
    assert done == [0, 1, 2, 3]
    source.close()


def test_turns_let_a_request_decode_only_after_every_earlier_one_and_skip_failed_ones():
    async def run() -> list[int]:
        turns, order = reader.Turns(), []

        async def request(delay: float, fail: bool) -> None:
            ticket = turns.take()
            try:
                await asyncio.sleep(delay)  # the fetch
                if fail:
                    raise OSError("fetch failed")
                await turns.wait_below(ticket)
                order.append(ticket)
            finally:
                turns.mark(ticket)

        await asyncio.gather(request(0.05, False), request(0.0, False), request(0.03, True),
                             request(0.01, False), return_exceptions=True)
        return order

    assert asyncio.run(run()) == [0, 1, 3]


# --------------------------------------------------------------------------- missing shards


def _delete(scene_uri: str, key: str) -> bytes:
    """Delete object ``key`` of a scene on any store kind; return its bytes (to put back)."""
    data = storage.read_bytes(join_uri(scene_uri, key))
    storage.delete_object(join_uri(scene_uri, key))
    assert not storage.exists(join_uri(scene_uri, key))
    return data


def test_a_missing_shard_is_an_error_naming_it_and_is_not_cached(store_root):
    img = np.maximum(textured(3, 128, 128), 1)  # every shard holds pixels: none is empty
    uri = write_pyramid(store_root, "m", img, {}, chunk=CHUNK, shard=SHARD)
    saved = _delete(uri, "0/c/0/1/0")  # level 0, shard (1, 0): rows 64-127, columns 0-63
    request = ReadRequest(torch.tensor([[[70, 5, 90, 40]]]), 0, (20, 35))
    source = ZarrPixelSource(record_requests=True)
    for _ in range(2):  # the second read asks the store again: "missing" is never cached
        with pytest.raises(reader.MissingShardError) as err:
            source.read([uri], request)
        message = str(err.value)
        assert uri in message and "level 0" in message and "shard (1, 0)" in message
        assert "0/c/0/1/0" in message and "chunks (4..7, 0..3)" in message
    assert isinstance(err.value, ReadError)
    assert len([r for r in source.requests() if r.kind == "index"]) == 2
    storage.write_bytes(join_uri(uri, "0/c/0/1/0"), saved)  # back (a transient 404 ended)
    out = source.read([uri], request)
    np.testing.assert_array_equal(out[0, 0].numpy(), img[:, 70:90, 5:40] / np.float32(255))


def test_a_missing_shard_elsewhere_does_not_fail_a_prefetching_read(tmp_path):
    img = np.maximum(textured(3, 128, 128), 1)
    uri = write_pyramid(str(tmp_path), "m", img, {}, chunk=CHUNK, shard=SHARD)
    _delete(uri, "0/c/0/1/1")
    source = ZarrPixelSource(prefetch_indexes=True)
    out = source.read([uri], ReadRequest(torch.tensor([[[3, 3, 60, 60]]]), 0, (57, 57)))
    np.testing.assert_array_equal(out[0, 0].numpy(), img[:, 3:60, 3:60] / np.float32(255))
    with pytest.raises(reader.MissingShardError, match=r"shard \(1, 1\)"):
        source.read([uri], ReadRequest(torch.tensor([[[100, 100, 110, 110]]]), 0, (10, 10)))


def test_a_missing_shard_fails_the_view_too(tmp_path):
    img = np.maximum(textured(3, 128, 128), 1)
    uri = write_pyramid(str(tmp_path), "m", img, {}, coarsest=64, chunk=CHUNK, shard=SHARD)
    _delete(uri, "1/c/0/0/0")  # the coarsest level (64 px) is one shard
    with pytest.raises(reader.MissingShardError, match=r"level 1 shard \(0, 0\)"):
        ZarrPixelSource().view([uri], (32, 32))


def test_a_pyramid_without_the_empty_shard_record_reads_absent_shards_as_errors(tmp_path):
    """Pyramids written before the record (format 1): a present shard reads as always, an
    absent one cannot be told from a lost one, so it is an error that says to re-ingest."""
    img = textured(3, 128, 128)
    img[:, :64, :64] = 0  # shard (0, 0) of level 0 is empty: no object
    uri = write_pyramid(str(tmp_path), "old", img, {}, chunk=CHUNK, shard=SHARD)
    level = join_uri(uri, "0", "zarr.json")
    document = json.loads(storage.read_bytes(level))
    assert document["attributes"]["pipeline"]["empty_shards"]
    del document["attributes"]["pipeline"]
    storage.write_bytes(level, json.dumps(document).encode())
    source = ZarrPixelSource()
    out = source.read([uri], ReadRequest(torch.tensor([[[70, 70, 90, 90]]]), 0, (20, 20)))
    np.testing.assert_array_equal(out[0, 0].numpy(), img[:, 70:90, 70:90] / np.float32(255))
    with pytest.raises(reader.MissingShardError, match=r"shard \(0, 0\).*re-ingest"):
        source.read([uri], ReadRequest(torch.tensor([[[0, 0, 10, 10]]]), 0, (10, 10)))
