"""Pure read planning: boxes -> the chunks they touch -> the byte ranges to fetch.

No I/O here. ``plan_reads`` needs only shapes; ``plan_ranges`` also needs the shard index
(offsets and lengths of the inner chunks), which the executor reads once per shard and caches.

Conventions: level 0 is full resolution; boxes are ``[y0, x0, y1, x1]`` half-open in level-0
pixels (``models.protocol``); a box maps to level ``l`` by ``box_at_level`` (floor of the
start, ceil of the end). Chunk and shard grids are over the level's ``(y, x)`` pixels; every
chunk spans all channels, so the channel chunk index is always 0. Parts of a box outside the
level touch no chunk (they read as zero padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from models.protocol import box_at_level

ABSENT = 2**64 - 1  # shard-index value of a chunk that was never written (all fill value)


@dataclass(frozen=True, slots=True, order=True)
class ChunkKey:
    """One inner chunk of a level: ``(cy, cx)`` in the level's chunk grid."""

    level: int
    cy: int
    cx: int


@dataclass(frozen=True, slots=True, order=True)
class ShardKey:
    """One shard object of a level: ``(sy, sx)`` in the level's shard grid."""

    level: int
    sy: int
    sx: int


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What a batch of boxes needs from one level of one scene.

    Attributes:
        level: pyramid level.
        regions: per box, ``(y0, x0, y1, x1)`` half-open in that level's pixels (may extend
            beyond the level; the outside is zero padding).
        chunks: the de-duplicated chunks the boxes touch, sorted.
        chunks_per_shard: ``(ny, nx)`` inner chunks per shard side.
    """

    level: int
    regions: tuple[tuple[int, int, int, int], ...]
    chunks: tuple[ChunkKey, ...]
    chunks_per_shard: tuple[int, int]

    def shard_of(self, chunk: ChunkKey) -> ShardKey:
        """The shard holding ``chunk``."""
        ny, nx = self.chunks_per_shard
        return ShardKey(chunk.level, chunk.cy // ny, chunk.cx // nx)

    def by_shard(self) -> dict[ShardKey, tuple[ChunkKey, ...]]:
        """The planned chunks grouped by shard, shards and chunks sorted."""
        out: dict[ShardKey, list[ChunkKey]] = {}
        for chunk in self.chunks:
            out.setdefault(self.shard_of(chunk), []).append(chunk)
        return {k: tuple(v) for k, v in sorted(out.items())}


def _yx(shape: Sequence[int]) -> tuple[int, int]:
    """The spatial (y, x) part of a (C, y, x) or (y, x) shape."""
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a (C, H, W) or (H, W) shape, got {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def plan_reads(
    boxes: Iterable[Sequence[int]],
    level: int,
    level_shape: Sequence[int],
    chunk_shape: Sequence[int],
    shard_shape: Sequence[int],
) -> ReadPlan:
    """The chunks that ``boxes`` (level-0 pixels) touch at ``level``.

    Args:
        boxes: K boxes ``[y0, x0, y1, x1]`` in level-0 pixels (a (K, 4) tensor works too).
        level: the level to read.
        level_shape: (C, H, W) or (H, W) of that level.
        chunk_shape: inner chunk shape, (C, ch, cw) or (ch, cw).
        shard_shape: shard shape, a multiple of the chunk shape.
    Returns a ``ReadPlan`` whose ``chunks`` hold every chunk that overlaps at least one box
    inside the level, once.
    """
    ch, cw = _yx(chunk_shape)
    sh, sw = _yx(shard_shape)
    if sh % ch or sw % cw:
        raise ValueError(f"shard shape {tuple(shard_shape)} is not a multiple of {tuple(chunk_shape)}")
    regions = box_regions(boxes, level)
    cyx = touched_chunks(regions, level_shape, chunk_shape)
    return ReadPlan(level, tuple(tuple(r) for r in regions.tolist()),
                    tuple(ChunkKey(level, cy, cx) for cy, cx in cyx.tolist()), (sh // ch, sw // cw))


def box_regions(boxes: Iterable[Sequence[int]], level: int) -> np.ndarray:
    """(K, 4) int64 ``(y0, x0, y1, x1)`` of each level-0 box at ``level`` (``box_at_level``)."""
    rows = boxes.tolist() if hasattr(boxes, "tolist") else boxes
    return np.array([box_at_level(box, level) for box in rows], dtype=np.int64).reshape(-1, 4)


def touched_chunks(regions: np.ndarray, level_shape: Sequence[int],
                   chunk_shape: Sequence[int]) -> np.ndarray:
    """(N, 2) int64 ``(cy, cx)`` of every chunk that overlaps a region inside the level, once,
    sorted by row then column. ``regions``: (K, 4) level pixels, half-open, possibly outside."""
    h, w = _yx(level_shape)
    ch, cw = _yx(chunk_shape)
    y0, x0 = np.maximum(regions[:, 0], 0), np.maximum(regions[:, 1], 0)
    y1, x1 = np.minimum(regions[:, 2], h), np.minimum(regions[:, 3], w)
    inside = (y1 > y0) & (x1 > x0)
    cy0, cx0 = y0[inside] // ch, x0[inside] // cw
    cy1, cx1 = (y1[inside] - 1) // ch, (x1[inside] - 1) // cw
    grid_w = -(-w // cw)
    lin = [(np.arange(a, b + 1)[:, None] * grid_w + np.arange(c, d + 1)[None, :]).ravel()
           for a, b, c, d in zip(cy0.tolist(), cy1.tolist(), cx0.tolist(), cx1.tolist(), strict=True)]
    lin = np.unique(np.concatenate(lin)) if lin else np.zeros(0, dtype=np.int64)
    return np.stack([lin // grid_w, lin % grid_w], 1).astype(np.int64)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where one chunk's bytes sit inside a fetched range: ``[start, end)`` relative to it."""

    chunk: ChunkKey
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One range request ``[start, end)`` into a shard object and the chunks it carries."""

    start: int
    end: int
    spans: tuple[ChunkSpan, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ShardRead:
    """The requests for one shard: coalesced byte ranges, and the chunks absent from it."""

    shard: ShardKey
    ranges: tuple[ByteRange, ...]
    absent: tuple[ChunkKey, ...]


def plan_ranges(
    shard: ShardKey,
    chunks: Sequence[ChunkKey],
    index: np.ndarray | None,
    chunks_per_shard: tuple[int, int],
    max_gap: int = 0,
) -> ShardRead:
    """Byte ranges to fetch ``chunks`` of ``shard`` given its decoded index.

    Args:
        shard: the shard.
        chunks: chunks of that shard to read.
        index: (..., ny, nx, 2) uint64 ``(offset, nbytes)`` per inner chunk (leading singleton
            dims, such as the channel chunk axis, are allowed); None when the shard object does
            not exist (then every chunk is absent).
        chunks_per_shard: ``(ny, nx)``.
        max_gap: merge two chunks into one request when at most this many unwanted bytes lie
            between them (0: only chunks stored back to back are merged).
    Returns the ranges sorted by offset and the chunks with no bytes (read as fill value).
    """
    ny, nx = chunks_per_shard
    chunks = list(chunks)
    for chunk in chunks:
        if (chunk.level, chunk.cy // ny, chunk.cx // nx) != (shard.level, shard.sy, shard.sx):
            raise ValueError(f"{chunk} is not in {shard}")
    if index is None or not chunks:
        return ShardRead(shard, (), tuple(sorted(chunks)))
    table = np.asarray(index).reshape(ny, nx, 2)
    cy = np.fromiter((c.cy % ny for c in chunks), np.int64, len(chunks))
    cx = np.fromiter((c.cx % nx for c in chunks), np.int64, len(chunks))
    rt = range_table(table[cy, cx], max_gap)
    absent = tuple(sorted(c for c, a in zip(chunks, rt.absent.tolist(), strict=True) if a))
    ranges = []
    for r in range(rt.count):
        lo, hi = int(rt.bounds[r]), int(rt.bounds[r + 1])
        r0 = int(rt.range_start[r])
        spans = tuple(ChunkSpan(chunks[i], s - r0, e - r0) for i, s, e in
                      zip(rt.chunk[lo:hi].tolist(), rt.start[lo:hi].tolist(),
                          rt.end[lo:hi].tolist(), strict=True))
        ranges.append(ByteRange(r0, int(rt.range_end[r]), spans))
    return ShardRead(shard, tuple(ranges), absent)


@dataclass(frozen=True)
class RangeTable:
    """Requests for n chunks of one shard, as arrays (what ``plan_ranges`` builds objects from).

    Attributes:
        absent: (n,) bool, chunks with no bytes in the shard (read as fill value).
        chunk: (m,) int64 indices (into the n chunks) of the present ones, in offset order.
        start, end: (m,) int64 byte range of each of those chunks in the shard object.
        bounds: (R + 1,) int64: request r carries ``chunk[bounds[r]:bounds[r + 1]]``.
        range_start, range_end: (R,) int64 byte range of each request.
    """

    absent: np.ndarray
    chunk: np.ndarray
    start: np.ndarray
    end: np.ndarray
    bounds: np.ndarray
    range_start: np.ndarray
    range_end: np.ndarray

    @property
    def count(self) -> int:
        """Number of requests."""
        return len(self.range_start)


def range_table(entries: np.ndarray, max_gap: int = 0) -> RangeTable:
    """Coalesced requests for chunks whose shard-index entries are ``entries``: (n, 2) uint64
    ``(offset, nbytes)``, ``ABSENT`` in both for a chunk never written. Chunks are taken in
    offset order; a new request starts where more than ``max_gap`` bytes separate a chunk from
    the furthest end so far."""
    entries = np.asarray(entries, dtype=np.uint64).reshape(-1, 2)
    absent = (entries[:, 0] == ABSENT) & (entries[:, 1] == ABSENT)
    kept = np.flatnonzero(~absent)
    start = entries[kept, 0].astype(np.int64)
    end = start + entries[kept, 1].astype(np.int64)
    order = np.lexsort((end, start))
    kept, start, end = kept[order], start[order], end[order]
    reach = np.maximum.accumulate(end) if len(end) else end
    breaks = np.flatnonzero(start[1:] - reach[:-1] > max_gap) + 1
    bounds = np.concatenate([[0], breaks, [len(start)]]) if len(start) else np.zeros(1, np.int64)
    return RangeTable(absent, kept.astype(np.int64), start, end, bounds.astype(np.int64),
                      start[bounds[:-1]], reach[bounds[1:] - 1])
