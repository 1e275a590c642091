"""Shard-index layout: entry runs of an index at the start of its object, exact tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.read.layout import (
    EntryTable,
    decode_entries,
    decode_index,
    entry_span,
    level_meta,
    object_index,
)
from pipeline.read.plan import ABSENT, plan_chunks
from pipeline.read.plan import entry_ids_by_shard as ids_by_shard
from pipeline.store import storage
from pipeline.store.pyramid import encode_shard, write_pyramid
from pipeline.store.storage import join_uri
from tests.pipeline.scenes import textured


def _meta(tmp_path, location: str = "start"):
    """A level of 4 x 4 chunks of 8 px per 32 px shard (index 16 x 16 + 4 bytes)."""
    uri = write_pyramid(str(tmp_path), "s", textured(3, 64, 96), {}, chunk=8, shard=32,
                        coarsest=1000)
    doc = json.loads(storage.read_bytes(join_uri(uri, "0", "zarr.json")))
    doc["codecs"][0]["configuration"]["index_location"] = location
    return uri, level_meta(uri, 0, "s/0", doc)


def test_the_writer_puts_the_index_first_and_the_meta_says_so(tmp_path):
    uri, meta = _meta(tmp_path)
    assert meta.index_at_start and meta.index_size == 16 * 16 + 4 and meta.entries == 16
    assert meta.index_range == (0, meta.index_size)
    data = storage.read_bytes(join_uri(uri, "0", "c", "0", "0", "0"))
    table = decode_index(meta, object_index(meta, data)).reshape(-1, 2)
    table = table[table[:, 0] != ABSENT].astype(np.int64)  # the chunks stored
    assert table[:, 0].min() == meta.index_size  # the first chunk follows the index
    assert (table[:, 0] + table[:, 1]).max() == len(data)


def test_an_index_at_the_end_reads_as_before(tmp_path):
    _, meta = _meta(tmp_path, "end")
    assert not meta.index_at_start and meta.index_range == (-meta.index_size, None)
    with pytest.raises(ValueError, match="at the end"):
        entry_span(meta, np.array([3]))


@pytest.mark.parametrize(("entries", "span"), [
    ([5], (80, 96)),  # one entry
    ([6, 1, 9], (16, 160)),  # first..last, in any order
    ([0, 15], (0, 260)),  # every entry: the whole index, crc32c included
])
def test_entry_span_is_the_run_from_the_first_to_the_last_entry(tmp_path, entries, span):
    _, meta = _meta(tmp_path)
    assert entry_span(meta, np.array(entries)) == span


def test_decode_entries_fills_only_the_run_and_checks_its_length(tmp_path):
    uri, meta = _meta(tmp_path)
    data = storage.read_bytes(join_uri(uri, "0", "c", "0", "0", "1"))
    whole = decode_index(meta, data[: meta.index_size]).reshape(-1, 2)
    part = decode_entries(meta, data[16:160], (16, 160)).reshape(-1, 2)
    np.testing.assert_array_equal(part[1:10], whole[1:10])
    assert (part[[0, *range(10, 16)]] == ABSENT).all()
    with pytest.raises(ValueError, match="truncated"):
        decode_entries(meta, data[16:150], (16, 160))
    bad = bytearray(data[: meta.index_size])
    bad[20] ^= 4  # the whole index is checked against its crc32c
    with pytest.raises(ValueError, match="crc32c"):
        decode_entries(meta, bytes(bad), (0, meta.index_size))


def test_entry_tables_merge_what_was_read(tmp_path):
    uri, meta = _meta(tmp_path)
    data = storage.read_bytes(join_uri(uri, "0", "c", "0", "0", "0"))
    first = EntryTable.merge(None, decode_entries(meta, data[32:64], (32, 64)), (32, 64))
    both = EntryTable.merge(first, decode_entries(meta, data[160:176], (160, 176)), (160, 176))
    assert np.flatnonzero(both.known).tolist() == [2, 3, 10]
    whole = decode_index(meta, data[: meta.index_size]).reshape(-1, 2)
    np.testing.assert_array_equal(both.table.reshape(-1, 2)[[2, 3, 10]], whole[[2, 3, 10]])
    assert np.flatnonzero(first.known).tolist() == [2, 3]  # merge copies


def test_entry_ids_by_shard_are_row_major_within_each_shard():
    # chunks of 8 px, shards of 16 px (2 x 2 chunks): a box over rows 8..24, cols 0..24
    plan = plan_chunks(np.array([[8, 0, 24, 24]]), 0, (3, 64, 64), (3, 8, 8), (3, 16, 16))
    got = {tuple(s): ids.tolist() for s, ids in zip(plan.shards.tolist(), ids_by_shard(plan),
                                                     strict=True)}
    assert got == {(0, 0): [2, 3], (0, 1): [2], (1, 0): [0, 1], (1, 1): [0]}


def test_encode_shard_offsets_start_after_the_index():
    block = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
    data = encode_shard(block, 8, 16)
    index = np.frombuffer(data[:64], "<u8").reshape(-1, 2)
    assert index[:, 0].min() == 64 + 4
