"""Integrity of what the reader returns: a flipped bit or a truncated shard is an error naming
the scene, level, shard or the one chunk; never wrong pixels (issue 13)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.protocol import ReadRequest
from pipeline.read.reader import CorruptChunkError, CorruptShardError, ReadError, ZarrPixelSource
from pipeline.store import pyramid, storage
from pipeline.store.pyramid import write_pyramid
from pipeline.store.storage import join_uri
from tests.pipeline.scenes import CHUNK, textured

SIDE = 64  # one shard of 4 x 4 inner chunks, one level
WHOLE = ReadRequest(torch.tensor([[[0, 0, SIDE, SIDE]]]), 0, (SIDE, SIDE))


def _scene(root: str) -> tuple[str, str, bytes]:
    img = np.maximum(textured(3, SIDE, SIDE, seed=3), 1)  # every chunk stored
    uri = write_pyramid(root, "s", img, {}, chunk=CHUNK, shard=SIDE, coarsest=SIDE)
    shard = join_uri(uri, "0", "c", "0", "0", "0")
    return uri, shard, storage.read_bytes(shard)


def _chunk_table(data: bytes) -> dict[tuple[int, int], tuple[int, int]]:
    """(cy, cx) -> (offset, nbytes) of every chunk of a one-shard level, from its index (at the
    start of the object, ``pyramid.INDEX_LOCATION``)."""
    assert pyramid.INDEX_LOCATION == "start"
    n = SIDE // CHUNK
    index = np.frombuffer(data[: 16 * n * n], "<u8").reshape(n, n, 2)
    return {(cy, cx): (int(index[cy, cx, 0]), int(index[cy, cx, 1]))
            for cy in range(n) for cx in range(n)}


def _flips(data: bytes, rng: np.random.Generator) -> list[tuple[str, int, int, tuple | None]]:
    """~300 (class, byte, bit, chunk) single-bit flips: every chunk's zstd frame header (magic,
    descriptor, sizes: its first 6 bytes), compressed data, content checksum (last 4 bytes),
    and the shard index with its crc32c."""
    flips = []
    for chunk, (offset, nbytes) in _chunk_table(data).items():
        classes = {"header": range(offset, offset + 6),
                   "data": range(offset + 6, offset + nbytes - 4),
                   "checksum": range(offset + nbytes - 4, offset + nbytes)}
        for name, span in classes.items():
            for byte in rng.choice(np.asarray(span), 6, replace=len(span) < 6):
                flips.append((name, int(byte), int(rng.integers(8)), chunk))
    index_end = min(o for o, _ in _chunk_table(data).values())  # the index, then its crc32c
    for byte in rng.choice(np.arange(0, index_end), 24, replace=False):
        flips.append(("index", int(byte), int(rng.integers(8)), None))
    return flips


def test_every_single_bit_flip_raises_naming_the_chunk_or_reads_identical_pixels(tmp_path):
    uri, shard, clean = _scene(str(tmp_path))
    source = ZarrPixelSource()
    expected = source.read([uri], WHOLE)
    flips = _flips(clean, np.random.default_rng(0))
    assert len(flips) >= 300
    outcomes = {"raised": 0, "identical": 0}
    for name, byte, bit, chunk in flips:
        data = bytearray(clean)
        data[byte] ^= 1 << bit
        storage.write_bytes(shard, bytes(data))
        source.clear_cache()
        try:
            got = source.read([uri], WHOLE)
        except ReadError as err:
            outcomes["raised"] += 1
            message = str(err)
            assert f"scene {uri} level 0" in message, message
            if chunk is None:
                assert isinstance(err, CorruptShardError) and "shard (0, 0)" in message, message
            else:
                assert isinstance(err, CorruptChunkError), (name, byte, bit, message)
                named = re.findall(r"decoding chunk \((\d+), (\d+)\)", message)
                assert named == [tuple(str(c) for c in chunk)], (name, byte, bit, message)
            continue
        assert torch.equal(got, expected), f"{name} flip at byte {byte} bit {bit}: wrong pixels"
        outcomes["identical"] += 1
    print("bit flips:", len(flips), outcomes)
    assert outcomes["raised"] >= 0.9 * len(flips), outcomes
    source.close()


def test_format_2_pyramids_without_checksums_still_read(tmp_path, monkeypatch):
    """An older pyramid (no zstd checksum) reads as before; it is the one that lets a flipped
    data bit through (why format 3 exists)."""
    monkeypatch.setattr(pyramid, "ZSTD_CHECKSUM", False)
    uri, shard, clean = _scene(str(tmp_path))
    assert b'"checksum": false' in storage.read_bytes(join_uri(uri, "0", "zarr.json"))
    source = ZarrPixelSource()
    expected = source.read([uri], WHOLE)
    silent = 0
    for name, byte, bit, _ in _flips(clean, np.random.default_rng(1)):
        if name != "data":
            continue
        data = bytearray(clean)
        data[byte] ^= 1 << bit
        storage.write_bytes(shard, bytes(data))
        source.clear_cache()
        try:
            silent += not torch.equal(source.read([uri], WHOLE), expected)
        except ReadError:
            pass
    assert silent > 0  # without checksums some flips decode to wrong pixels
    source.close()


def test_a_truncated_shard_is_an_error_naming_scene_level_and_shard(tmp_path):
    uri, shard, clean = _scene(str(tmp_path))
    for cut in (1, 4, len(clean) // 2, len(clean) - 10):
        storage.write_bytes(shard, clean[:cut])
        # cut inside the index: its length check; after it: the chunk ranges' length check
        with pytest.raises(CorruptShardError, match=rf"scene {re.escape(uri)} level 0 (shard "
                                                    r"\(0, 0\)|object .*0/c/0/0/0 bytes).*truncated"):
            ZarrPixelSource().read([uri], WHOLE)
    storage.write_bytes(shard, clean)
    source = ZarrPixelSource()
    source.read([uri], WHOLE)  # the index is cached now; then the object is cut
    storage.write_bytes(shard, clean[: len(clean) // 2])
    with pytest.raises(CorruptShardError, match=r"object .*0/c/0/0/0 .*shorter than its index "
                                                r"says \(truncated\)"):
        source.read([uri], WHOLE)
    source.close()
