"""The pure read planner: exact tables of chunks and byte ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.read.plan import (
    ABSENT,
    ByteRange,
    ChunkKey,
    ChunkSpan,
    ShardKey,
    plan_ranges,
    plan_reads,
)


def keys(level, pairs):
    return tuple(ChunkKey(level, cy, cx) for cy, cx in pairs)


def test_one_box_at_level_0():
    plan = plan_reads([[10, 20, 40, 50]], 0, (3, 100, 130), (3, 16, 16), (3, 32, 32))
    assert plan.regions == ((10, 20, 40, 50),)
    assert plan.chunks == keys(0, [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3),
                                   (2, 1), (2, 2), (2, 3)])
    assert plan.chunks_per_shard == (2, 2)
    assert plan.by_shard() == {
        ShardKey(0, 0, 0): keys(0, [(0, 1), (1, 1)]),
        ShardKey(0, 0, 1): keys(0, [(0, 2), (0, 3), (1, 2), (1, 3)]),
        ShardKey(0, 1, 0): keys(0, [(2, 1)]),
        ShardKey(0, 1, 1): keys(0, [(2, 2), (2, 3)]),
    }


def test_box_maps_to_a_coarser_level_by_floor_and_ceil():
    # level 1: (10, 20, 41, 51) -> (5, 10, 21, 26): rows 5..20, cols 10..25
    plan = plan_reads(torch.tensor([[10, 20, 41, 51]]), 1, (50, 65), (16, 16), (32, 32))
    assert plan.regions == ((5, 10, 21, 26),)
    assert plan.chunks == keys(1, [(0, 0), (0, 1), (1, 0), (1, 1)])


def test_grid_aligned_patch_touches_exactly_its_chunks():
    plan = plan_reads([[32, 64, 96, 128]], 0, (3, 256, 256), (3, 16, 16), (3, 64, 64))
    assert len(plan.chunks) == 16
    assert plan.chunks == keys(0, [(y, x) for y in range(2, 6) for x in range(4, 8)])


def test_border_boxes_are_clipped_and_outside_boxes_touch_nothing():
    boxes = [[-10, -10, 5, 5], [95, 125, 120, 140], [200, 200, 210, 210], [0, 0, 0, 10]]
    plan = plan_reads(boxes, 0, (3, 100, 130), (3, 16, 16), (3, 32, 32))
    assert plan.regions == ((-10, -10, 5, 5), (95, 125, 120, 140), (200, 200, 210, 210),
                            (0, 0, 0, 10))
    # rows 95..99 -> chunk rows 5, 6; cols 125..129 (width 130) -> chunk cols 7, 8
    assert plan.chunks == keys(0, [(0, 0), (5, 7), (5, 8), (6, 7), (6, 8)])


def test_overlapping_boxes_share_chunks_once():
    plan = plan_reads([[0, 0, 20, 20], [10, 10, 30, 30]], 0, (64, 64), (16, 16), (64, 64))
    assert plan.chunks == keys(0, [(0, 0), (0, 1), (1, 0), (1, 1)])


def test_no_boxes_and_bad_shapes():
    assert plan_reads([], 0, (3, 10, 10), (3, 4, 4), (3, 8, 8)).chunks == ()
    with pytest.raises(ValueError, match="not a multiple"):
        plan_reads([[0, 0, 1, 1]], 0, (3, 10, 10), (3, 4, 4), (3, 6, 6))


def index_table(entries, ny=2, nx=2):
    table = np.full((1, ny, nx, 2), ABSENT, dtype=np.uint64)
    for (cy, cx), (offset, nbytes) in entries.items():
        table[0, cy, cx] = (offset, nbytes)
    return table


def test_plan_ranges_merges_back_to_back_chunks_only():
    index = index_table({(0, 0): (0, 10), (0, 1): (10, 5), (1, 1): (30, 7)})
    shard = ShardKey(0, 1, 2)
    chunks = keys(0, [(2, 4), (2, 5), (3, 4), (3, 5)])
    read = plan_ranges(shard, chunks, index, (2, 2))
    assert read.absent == keys(0, [(3, 4)])
    assert read.ranges == (
        ByteRange(0, 15, (ChunkSpan(ChunkKey(0, 2, 4), 0, 10), ChunkSpan(ChunkKey(0, 2, 5), 10, 15))),
        ByteRange(30, 37, (ChunkSpan(ChunkKey(0, 3, 5), 0, 7),)),
    )
    merged = plan_ranges(shard, chunks, index, (2, 2), max_gap=15)
    assert [(r.start, r.end) for r in merged.ranges] == [(0, 37)]
    assert [(s.start, s.end) for s in merged.ranges[0].spans] == [(0, 10), (10, 15), (30, 37)]


def test_plan_ranges_orders_by_offset_not_by_position():
    index = index_table({(0, 0): (20, 4), (0, 1): (0, 4), (1, 0): (4, 4)})  # Morton-like order
    read = plan_ranges(ShardKey(0, 0, 0), keys(0, [(0, 0), (0, 1), (1, 0)]), index, (2, 2))
    assert [(r.start, r.end) for r in read.ranges] == [(0, 8), (20, 24)]
    assert [s.chunk for s in read.ranges[0].spans] == list(keys(0, [(0, 1), (1, 0)]))


def test_plan_ranges_without_a_shard_object_and_foreign_chunks():
    read = plan_ranges(ShardKey(0, 0, 0), keys(0, [(1, 1), (0, 0)]), None, (2, 2))
    assert read.ranges == () and read.absent == keys(0, [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="not in ShardKey"):
        plan_ranges(ShardKey(0, 0, 0), keys(0, [(2, 0)]), None, (2, 2))


def test_plan_ranges_all_absent_and_gaps_measured_from_the_furthest_end():
    index = np.full((2, 2, 2), ABSENT, dtype=np.uint64)
    shard = ShardKey(0, 0, 0)
    got = plan_ranges(shard, keys(0, [(1, 1), (0, 0)]), index, (2, 2), max_gap=100)
    assert got.ranges == () and got.absent == keys(0, [(0, 0), (1, 1)])
    # (0, 0) spans [0, 100) and contains (0, 1) at [10, 20); (1, 0) at [130, 140) is 30 bytes
    # past the furthest end (100), not 110 past (0, 1)'s end
    index[0, 0], index[0, 1], index[1, 0] = (0, 100), (10, 10), (130, 10)
    got = plan_ranges(shard, keys(0, [(0, 0), (0, 1), (1, 0)]), index, (2, 2), max_gap=30)
    assert [(r.start, r.end) for r in got.ranges] == [(0, 140)]
    assert got.ranges[0].spans == (ChunkSpan(ChunkKey(0, 0, 0), 0, 100),
                                   ChunkSpan(ChunkKey(0, 0, 1), 10, 20),
                                   ChunkSpan(ChunkKey(0, 1, 0), 130, 140))
    got = plan_ranges(shard, keys(0, [(0, 0), (0, 1), (1, 0)]), index, (2, 2), max_gap=29)
    assert [(r.start, r.end) for r in got.ranges] == [(0, 100), (130, 140)]
