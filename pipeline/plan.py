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
        ny, nx = self.chunks_per_shard
        out: dict[ShardKey, list[ChunkKey]] = {}
        for chunk in self.chunks:
            out.setdefault(ShardKey(chunk.level, chunk.cy // ny, chunk.cx // nx), []).append(chunk)
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
    h, w = _yx(level_shape)
    ch, cw = _yx(chunk_shape)
    sh, sw = _yx(shard_shape)
    if sh % ch or sw % cw:
        raise ValueError(f"shard shape {tuple(shard_shape)} is not a multiple of {tuple(chunk_shape)}")
    rows = boxes.tolist() if hasattr(boxes, "tolist") else boxes
    regions, chunks = [], set()
    for box in rows:
        y0, x0, y1, x1 = box_at_level(box, level)
        regions.append((y0, x0, y1, x1))
        cy0, cy1 = max(y0, 0) // ch, (min(y1, h) - 1) // ch
        cx0, cx1 = max(x0, 0) // cw, (min(x1, w) - 1) // cw
        if min(y1, h) <= max(y0, 0) or min(x1, w) <= max(x0, 0):
            continue  # entirely outside the level
        chunks.update(
            ChunkKey(level, cy, cx) for cy in range(cy0, cy1 + 1) for cx in range(cx0, cx1 + 1)
        )
    return ReadPlan(level, tuple(regions), tuple(sorted(chunks)), (sh // ch, sw // cw))


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
    # one vectorised lookup of every chunk's (offset, nbytes), then merge in offset order
    table = np.asarray(index).reshape(ny, nx, 2)
    cy = np.fromiter((c.cy % ny for c in chunks), np.int64, len(chunks))
    cx = np.fromiter((c.cx % nx for c in chunks), np.int64, len(chunks))
    entries = table[cy, cx]
    is_absent = (entries[:, 0] == ABSENT) & (entries[:, 1] == ABSENT)
    absent = tuple(sorted(c for c, a in zip(chunks, is_absent.tolist(), strict=True) if a))
    kept = np.flatnonzero(~is_absent)
    if kept.size == 0:
        return ShardRead(shard, (), absent)
    starts = entries[kept, 0].astype(np.int64)
    ends = starts + entries[kept, 1].astype(np.int64)
    order = np.lexsort((ends, starts))
    starts, ends, kept = starts[order], ends[order], kept[order]
    # a new request wherever the gap to everything before exceeds max_gap
    reach = np.maximum.accumulate(ends)
    breaks = np.flatnonzero(starts[1:] - reach[:-1] > max_gap) + 1
    out = []
    for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(starts)].tolist(), strict=True):
        r0, r1 = int(starts[lo]), int(reach[hi - 1])
        spans = tuple(ChunkSpan(chunks[i], s - r0, e - r0) for i, s, e in
                      zip(kept[lo:hi].tolist(), starts[lo:hi].tolist(), ends[lo:hi].tolist(),
                          strict=True))
        out.append(ByteRange(r0, r1, spans))
    return ShardRead(shard, tuple(out), absent)
