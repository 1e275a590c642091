"""The pyramid format: one OME-Zarr 0.5 multiscale group per scene (zarr v3, sharded).

Layout of a scene group ``<root>/<scene_id>``:
- arrays ``"0"``, ``"1"``, ...: uint8 ``(C, H, W)`` with ``dimension_names = ("c", "y", "x")``;
  level 0 is full resolution, level ``l + 1`` is ``downsample2x`` of level ``l`` (rounded integer
  mean of each 2x2 block, odd sides padded by edge replication, exactly
  ``models.memory.downsample2x``), down to the first level whose long side is ``<= coarsest``;
- every array is sharded: shards of ``(C, shard, shard)`` objects holding inner chunks of
  ``(C, chunk, chunk)`` (all channels in one chunk) compressed with zstd with its content
  checksum (format 3; a flipped bit fails the chunk's decode), the shard index followed by its
  crc32c; fill value 0;
- every level records which of its shards are empty (all fill value, so no object is stored):
  array attribute ``"pipeline": {"empty_shards": {"grid": [gy, gx], "bits": hex}}``
  (``encode_empty_shards``). A reader may take an absent shard for fill value only when this
  record says it is empty; any other absent shard was lost (deleted, or a 404 from the store);
- group attributes: ``"ome"`` (OME-Zarr 0.5 ``multiscales`` with a scale and a translation per
  level, so that standard readers place every level on the level-0 pixel grid), ``"scene"``
  (the caller's free-form dict: label, source URI, fMoW boxes in level-0 pixels, gsd,
  timestamp, ...) and ``"pipeline"`` (format facts and ``"complete"``).

``"pipeline": {"complete": true}`` is written last, after every level: a crash leaves a scene
that ``pyramid_complete`` reports as incomplete, and ``write_pyramid`` replaces it cleanly.

Chunking (measured with ``bench/read_amplification.py --sweep``; numbers in the README):
inner chunks of 16 px keep the pixels fetched for a randomly placed 64 px patch at
``((64 + 15) / 64) ** 2 = 1.52x`` the pixels requested (32 px chunks: 2.2x, above the 2.0
target). Shards of 128 px keep each shard index at 1 KiB: a first (cold) read of 16 patches
then costs 1.03-1.05x as many bytes on an 8k scene as on a 1k scene, where 256 px shards
(4 KiB indexes) cost 1.09-1.17x and 512 px shards 1.36-1.82x, because an 8k scene's patches
land in more distinct shards, each needing its index once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.store import storage
from pipeline.store.storage import join_uri

DEFAULT_CHUNK = 16
DEFAULT_SHARD = 128
DEFAULT_COARSEST = 256
ZSTD_LEVEL = 3
# The smallest side, in px, of a scene the ingest accepts: one inner chunk, and the smallest
# patch any shipped config reads (jobs/configs/tiny.yaml: 16 px). A smaller image (a 1 x 1 px
# thumbnail, a broken export) holds no patch worth of evidence; every patch read from it would
# be mostly zero padding. Training also needs the levels its model reads (level 1 in every
# shipped config: a long side above the pyramid's ``coarsest``), which the ingest cannot know.
MIN_SCENE_SIDE = 16
WRITE_CONCURRENCY = 16  # shard objects stored at once
# 3: every inner chunk's zstd frame carries zstd's content checksum (``ZSTD_CHECKSUM``), so a
#    flipped bit in a chunk fails its decode instead of giving wrong pixels.
# 2: every level records its empty shards. Still readable, but nothing detects a flipped bit
#    inside a chunk whose frame still decodes (only the shard index has a crc32c): the ingest
#    rewrites it (``pyramid_complete`` is False).
# 1: no empty-shard record either: a reader refuses its absent shards; the ingest rewrites it.
FORMAT_VERSION = 3
ZSTD_CHECKSUM = True  # 4 bytes per inner chunk (xxhash64 of the decoded chunk, low 32 bits)
# Where a shard object keeps its index (zarr's ``index_location``). At the start, a reader that
# knows which chunks it wants reads just their run of entries by offset (about 0.3 KB for a
# patch, not the whole 1 KB index): on large levels every patch meets new shards, and whole
# indexes were most of a 32k scene's bytes per sample (README "Ingest"). Pyramids written with
# the index at the end (before 2026-12-02) read as before: the location is in each level's
# zarr.json, so it needs no format version of its own.
INDEX_LOCATION = "start"
_MAX_UINT64 = 2**64 - 1
# rows of a level processed at once while downsampling: bounds the uint16 temporaries
_BAND_ROWS = 512


@dataclass(frozen=True, slots=True)
class PyramidInfo:
    """What a scene group holds.

    Attributes:
        uri: the scene group URI.
        level_shapes: ``(C, H, W)`` of each level, level 0 first.
        chunk_shape: inner chunk shape ``(C, chunk, chunk)`` (the same for every level).
        shard_shape: shard shape ``(C, shard, shard)``.
        attrs: the caller's scene attributes (``"scene"`` group attribute).
        complete: whether every level was written (``"pipeline"."complete"``).
    """

    uri: str
    level_shapes: tuple[tuple[int, int, int], ...]
    chunk_shape: tuple[int, int, int]
    shard_shape: tuple[int, int, int]
    attrs: dict[str, Any]
    complete: bool

    @property
    def num_levels(self) -> int:
        """How many levels the scene has (written so far, if incomplete)."""
        return len(self.level_shapes)


def downsample2x(image: np.ndarray) -> np.ndarray:
    """Halve (C, H, W) uint8 by the rounded mean of each 2x2 block: ``(a+b+c+d+2) // 4``.

    Odd sides are padded by replicating the last row / column, giving
    (C, ceil(H/2), ceil(W/2)). Identical to ``models.memory.downsample2x``; works in bands of
    rows so that the uint16 temporaries stay small for a 9,000 x 9,000 scene.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"downsample2x needs (C, H, W) uint8, got {image.dtype} {image.shape}")
    c, h, w = image.shape
    out = np.empty((c, (h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
    for y0 in range(0, h, _BAND_ROWS):
        band = image[:, y0 : min(y0 + _BAND_ROWS, h)].astype(np.uint16)
        if band.shape[1] % 2:  # only the last band can be odd (_BAND_ROWS is even)
            band = np.concatenate([band, band[:, -1:]], axis=1)
        if w % 2:
            band = np.concatenate([band, band[:, :, -1:]], axis=2)
        s = band[:, 0::2, 0::2] + band[:, 1::2, 0::2] + band[:, 0::2, 1::2] + band[:, 1::2, 1::2]
        out[:, y0 // 2 : y0 // 2 + s.shape[1]] = ((s + 2) // 4).astype(np.uint8)
    return out


def pyramid_shapes(height: int, width: int, coarsest: int = DEFAULT_COARSEST) -> list[tuple[int, int]]:
    """(H, W) of every level for a level-0 (height, width): halve (rounding up) until the long
    side is ``<= coarsest``."""
    if coarsest < 1:
        raise ValueError(f"coarsest must be >= 1, got {coarsest}")
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > coarsest:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def ome_multiscales(name: str, num_levels: int) -> dict[str, Any]:
    """OME-Zarr 0.5 ``attributes["ome"]`` for ``num_levels`` levels of 2x downsampling.

    Scale ``2**l`` maps level-``l`` pixels to level-0 pixels; the translation
    ``(2**l - 1) / 2`` puts each coarse pixel's centre at the centre of the block it averages.
    """
    datasets = []
    for level in range(num_levels):
        f = float(2**level)
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, f, f]},
                {"type": "translation", "translation": [0.0, (f - 1) / 2, (f - 1) / 2]},
            ],
        })
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ],
            "datasets": datasets,
            "type": "mean",
            "metadata": {"method": "2x2 rounded integer mean, edge replication for odd sides"},
        }],
    }


def _check_image(image: np.ndarray, scene_id: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
        raise ValueError(f"scene {scene_id!r}: image must be (C, H, W) uint8, got {got}")
    if min(image.shape) < 1:
        raise ValueError(f"scene {scene_id!r}: empty image of shape {image.shape}")


def write_pyramid(
    root_uri: str,
    scene_id: str,
    image: np.ndarray,
    attrs: dict[str, Any],
    *,
    coarsest: int = DEFAULT_COARSEST,
    chunk: int = DEFAULT_CHUNK,
    shard: int = DEFAULT_SHARD,
) -> str:
    """Write ``image`` as the pyramid of ``scene_id`` under ``root_uri``; return the scene URI.

    Args:
        root_uri: the pyramid root (any ``pipeline.store.storage`` URI).
        scene_id: the scene's name; the group is ``join_uri(root_uri, scene_id)``.
        image: (C, H, W) uint8 level 0.
        attrs: JSON-serialisable scene attributes (label, source URI, boxes in level-0
            pixels, gsd, timestamp, ...), stored as the group attribute ``"scene"``.
        coarsest: the last level's long side is at most this many pixels.
        chunk: inner chunk side in pixels (chunks span all channels).
        shard: shard side in pixels, a multiple of ``chunk``.

    Any previous content of the scene group is replaced. The scene is marked complete only
    after every level is written, and a rewrite of the same input gives identical bytes.
    Memory: the image plus one shard row per level (``write_pyramid_rows`` on its bands).
    """
    _check_image(image, scene_id)
    bands = (image[:, y0 : y0 + shard] for y0 in range(0, image.shape[1], max(shard, 1)))
    return write_pyramid_rows(root_uri, scene_id, image.shape, bands, attrs,
                              coarsest=coarsest, chunk=chunk, shard=shard)


def write_pyramid_rows(
    root_uri: str,
    scene_id: str,
    shape: tuple[int, int, int],
    bands: Iterable[np.ndarray],
    attrs: dict[str, Any],
    *,
    coarsest: int = DEFAULT_COARSEST,
    chunk: int = DEFAULT_CHUNK,
    shard: int = DEFAULT_SHARD,
) -> str:
    """``write_pyramid`` from level 0 given as bands of rows, never holding the whole image.

    Args:
        shape: (C, H, W) of level 0.
        bands: (C, rows, W) uint8 arrays, top to bottom, of any heights summing to H (e.g. one
            row of a tiled TIFF's tiles at a time).
        the rest: as ``write_pyramid``; the stored bytes equal ``write_pyramid`` of the
            concatenated bands.

    Each level keeps fewer than ``shard`` pending rows: a full shard row is encoded, stored
    and handed, downsampled, to the next level. Memory: about two shard rows per level
    (``C * shard * W_l`` bytes each) plus the caller's band, whatever H is.
    """
    c, h, w = (int(n) for n in shape)
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"scene {scene_id!r}: empty image of shape {tuple(shape)}")
    if chunk < 1 or shard % chunk:
        raise ValueError(f"scene {scene_id!r}: shard ({shard}) must be a multiple of chunk ({chunk})")
    json.dumps(attrs)  # fail before writing anything if the attributes are not JSON
    scene_uri = join_uri(root_uri, scene_id)
    store = storage.open_store(scene_uri, read_only=False)
    _mark_incomplete(store)
    shapes = pyramid_shapes(h, w, coarsest)
    pipeline_attrs = {"format": FORMAT_VERSION, "complete": False, "chunk": chunk,
                      "shard": shard, "coarsest": coarsest, "levels": len(shapes)}
    storer = _Storer(store)
    try:
        group, sinks = _open_levels(storer, scene_id, c, shapes, attrs, pipeline_attrs, chunk,
                                    shard)
        _feed(sinks[0], bands, (c, h, w), scene_id)
        storer.wait()
    finally:
        storer.close()
    for index, sink in enumerate(sinks):
        group[str(index)].update_attributes(
            {"pipeline": {"empty_shards": encode_empty_shards(sink.empty)}})
    group.update_attributes({"pipeline": {**pipeline_attrs, "complete": True}})
    return scene_uri


def _feed(top: _LevelSink, bands: Iterable[np.ndarray], shape: tuple[int, int, int],
          scene_id: str) -> None:
    """Push every band into level 0's sink, checking shapes and the row count, then finish."""
    c, h, w = shape
    received = 0
    for band in bands:
        _check_band(band, (c, w), scene_id)
        received += band.shape[1]
        if received > h:
            raise ValueError(f"scene {scene_id!r}: bands hold more than the {h} rows of {shape}")
        top.push(band)
    if received != h:
        raise ValueError(f"scene {scene_id!r}: bands held {received} rows, expected {h}")
    top.finish()


class _Storer:
    """Stores shard rows on an event loop in a helper thread, one row in flight: the next
    row is encoded while the previous one is being stored (memory: two rows of encoded
    shards). A failed store raises at the next ``put`` or ``wait``, before the scene is marked
    complete. zarr's stores keep no state bound to a loop (``LocalStore`` works in threads,
    ``ObjectStore`` in obstore's runtime, ``MemoryStore`` in a dict)."""

    def __init__(self, store: Any):
        self.store = store
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pyramid-store",
                                        daemon=True)
        self._thread.start()
        self._pending: Any = None

    def put(self, objects: dict[str, Any]) -> None:
        """Wait for the previous row, then start storing ``objects`` (key -> zarr buffer)."""
        self.wait()
        self._pending = asyncio.run_coroutine_threadsafe(_store_band(self.store, objects),
                                                         self._loop)

    def wait(self) -> None:
        """Wait for the row in flight; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Stop the helper thread (after the row in flight, whatever its outcome)."""
        try:
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.exception()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def _check_band(band: np.ndarray, cw: tuple[int, int], scene_id: str) -> None:
    """``ValueError`` naming the scene unless ``band`` is (C, rows >= 1, W) uint8."""
    if (not isinstance(band, np.ndarray) or band.dtype != np.uint8 or band.ndim != 3
            or (band.shape[0], band.shape[2]) != cw or band.shape[1] < 1):
        got = f"{getattr(band, 'dtype', type(band))} {getattr(band, 'shape', '')}"
        raise ValueError(f"scene {scene_id!r}: a band must be (C, rows, W) = ({cw[0]}, *, "
                         f"{cw[1]}) uint8, got {got}")


def _open_levels(storer: _Storer, scene_id: str, c: int, shapes: list[tuple[int, int]],
                 attrs: dict[str, Any], pipeline_attrs: dict[str, Any], chunk: int,
                 shard: int) -> tuple[Any, list[_LevelSink]]:
    """Create the group (incomplete) and every level's array; return the group and one
    ``_LevelSink`` per level, each feeding the next."""
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(storer.store, mode="w", zarr_format=3,
                            attributes={"ome": ome_multiscales(scene_id, len(shapes)),
                                        "scene": attrs, "pipeline": pipeline_attrs})
    sinks: list[_LevelSink] = []
    for index in reversed(range(len(shapes))):
        array = group.create_array(
            str(index), shape=(c, *shapes[index]), dtype="uint8", chunks=(c, chunk, chunk),
            shards={"shape": (c, shard, shard), "index_location": INDEX_LOCATION},
            compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=ZSTD_CHECKSUM), fill_value=0,
            dimension_names=("c", "y", "x"),
        )
        sinks.insert(0, _LevelSink(storer, str(index), shapes[index], array.metadata, chunk,
                                   shard, sinks[0] if sinks else None))
    return group, sinks


class _LevelSink:
    """One level being written row by row: stores every full shard row as it completes and
    passes its rows, downsampled (``downsample2x``, pairs of rows), to the next level.

    Pending rows stay below ``shard``; an odd row left after a shard row waits for its pair
    (only the level's last row can be unpaired: it is then padded by edge replication, exactly
    as ``downsample2x`` of the whole level does).
    """

    def __init__(self, storer: _Storer, path: str, hw: tuple[int, int], metadata: Any,
                 chunk: int, shard: int, down: _LevelSink | None):
        self.storer, self.path, self.metadata = storer, path, metadata
        self.chunk, self.shard, self.down = chunk, shard, down
        self.height = hw[0]
        self.empty = np.zeros((-(-hw[0] // shard), -(-hw[1] // shard)), dtype=bool)
        self._pending: list[np.ndarray] = []
        self._rows = 0  # rows pending
        self._done = 0  # rows stored
        self._odd: np.ndarray | None = None  # a row waiting for its pair (downsampling)

    def push(self, rows: np.ndarray) -> None:
        """Take (C, n, W) rows of this level, in order; store each shard row they complete."""
        self._pending.append(rows)
        self._rows += rows.shape[1]
        while self._rows >= self.shard:
            pending = self._pending
            joined = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            self._emit(joined[:, : self.shard])
            rest = joined[:, self.shard :]
            self._pending, self._rows = ([rest] if rest.shape[1] else []), rest.shape[1]

    def finish(self) -> None:
        """Store the last (partial) shard row, then finish the next levels."""
        if self._rows:
            self._emit(np.concatenate(self._pending, axis=1))
            self._pending, self._rows = [], 0
        if self._done != self.height:
            raise ValueError(f"level {self.path}: {self._done} rows written, expected {self.height}")
        if self.down is not None:
            if self._odd is not None:
                self.down.push(downsample2x(self._odd))
                self._odd = None
            self.down.finish()

    def _emit(self, block: np.ndarray) -> None:
        """Store one shard row (rows ``_done`` onwards) and pass it down."""
        sy = self._done // self.shard
        self.empty[sy] = _write_shards(self.storer, self.path, block, sy, self.metadata,
                                       self.chunk, self.shard)
        self._done += block.shape[1]
        if self.down is None:
            return
        if self._odd is not None:
            block = np.concatenate([self._odd, block], axis=1)
        even = block.shape[1] - block.shape[1] % 2
        self._odd = block[:, even:].copy() if even < block.shape[1] else None
        if even:
            self.down.push(downsample2x(block[:, :even]))


def _write_shards(storer: _Storer, path: str, block: np.ndarray, sy: int, metadata: Any, chunk: int,
                  shard: int) -> np.ndarray:
    """Encode and store the shards of one shard row ``sy`` of array ``path`` from ``block``
    (C, <=shard, W); return the (gx,) bool row of the shards that were all zero, so not stored.

    zarr-python's own sharded write costs about 1 ms of CPU per inner chunk (90 s for a
    4,096 px scene at 16 px chunks), so the shards are built here with the same codecs, in the
    same layout zarr writes them (inner chunks in Morton order, edge chunks padded with the
    fill value 0, all-zero chunks left out, then the uint64 index and its crc32c). A test
    checks that the bytes equal zarr's own. The row's shards are encoded, then stored
    concurrently (``_Storer``: while the next row is encoded).
    """
    from zarr.buffer import cpu

    compressor = _compressor()
    w = block.shape[2]
    objects, empty = {}, np.zeros(-(-w // shard), dtype=bool)
    for sx, x0 in enumerate(range(0, w, shard)):
        data = encode_shard(block[:, :, x0 : x0 + shard], chunk, shard, compressor)
        empty[sx] = not data
        if data:
            key = f"{path}/{metadata.encode_chunk_key((0, sy, sx))}"
            objects[key] = cpu.Buffer.from_bytes(data)
    storer.put(objects)
    return empty


def _compressor() -> Any:
    """A zstd compressor with the format's settings (``ZSTD_LEVEL``, ``ZSTD_CHECKSUM`` read at
    call time): its frames are byte-identical to numcodecs' ``Zstd``, zarr's codec, at half
    the CPU per 768-byte chunk (9 vs 19 us)."""
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=ZSTD_CHECKSUM)


def _run_sync(coro: Any) -> Any:
    """Run ``coro`` (zarr store calls) to completion from synchronous code; return its result.

    zarr's public API has no sync wrapper for a store's async methods (``zarr.core.sync`` is
    private), so each call gets a fresh loop (``asyncio.run``; once per level, not per shard).
    zarr's stores keep no state bound to a loop: ``LocalStore`` works in threads,
    ``ObjectStore`` in obstore's own runtime, ``MemoryStore`` in a dict. A caller already inside
    a running loop (async code, a notebook) gets the fresh loop in a helper thread instead,
    since ``asyncio.run`` refuses to nest.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="pyramid-store") as pool:
        return pool.submit(asyncio.run, coro).result()


def encode_empty_shards(empty: np.ndarray) -> dict[str, Any]:
    """The JSON record of a level's empty shards from its (gy, gx) bool grid.

    ``{"grid": [gy, gx], "bits": hex}``: bit ``sy * gx + sx`` (``np.packbits`` order, most
    significant bit first, zero-padded to whole bytes) is set when shard (sy, sx) is all fill
    value and has no object. Two hex characters per 8 shards: 1.3 KB for a 9,000 px level of
    128 px shards, whatever the number of empty ones.
    """
    gy, gx = (int(n) for n in empty.shape)
    return {"grid": [gy, gx], "bits": np.packbits(empty.ravel()).tobytes().hex()}


def decode_empty_shards(record: Any, grid: tuple[int, int], where: str) -> frozenset[tuple[int, int]]:
    """The ``(sy, sx)`` of every empty shard in ``record`` (``encode_empty_shards``), checked
    against the level's shard grid ``(gy, gx)``; ``ValueError`` naming ``where`` if malformed."""
    gy, gx = grid
    try:
        if [int(n) for n in record["grid"]] != [gy, gx]:
            raise ValueError(f"grid {record['grid']}, the level has a {gy} x {gx} shard grid")
        raw = np.frombuffer(bytes.fromhex(record["bits"]), dtype=np.uint8)
        if len(raw) != -(-gy * gx // 8):
            raise ValueError(f"{len(raw)} bytes of bits for {gy} x {gx} shards")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: empty-shard record {record!r} is malformed: {err}") from None
    empty = np.unpackbits(raw)[: gy * gx].reshape(gy, gx)
    return frozenset((int(sy), int(sx)) for sy, sx in np.argwhere(empty))


async def _store_band(store: Any, objects: dict[str, Any]) -> None:
    limit = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def put(key: str, buf: Any) -> None:
        async with limit:
            await store.set(key, buf)

    await asyncio.gather(*(put(key, buf) for key, buf in objects.items()))


def encode_shard(block: np.ndarray, chunk: int, shard: int, compressor: Any = None) -> bytes:
    """The bytes of one shard object holding ``block`` (C, <=shard, <=shard) uint8.

    Layout (zarr v3 ``sharding_indexed``, index at the start: ``INDEX_LOCATION``): the index
    (1, n, n, 2) little-endian uint64 ``(offset, nbytes)`` with ``2**64 - 1`` for absent
    chunks, then the crc32c of the index (little-endian uint32), then the zstd-compressed inner
    chunks of shape (C, chunk, chunk) in Morton order of their (0, cy, cx) position. ``b""`` when every chunk is
    all zero (zarr writes no object then). ``compressor``: a ``zstandard.ZstdCompressor``
    (default: ``_compressor()``). Vectorised but the one compress call per chunk: about 1 ms
    for a 128 px RGB shard of 64 chunks (a loop over chunks with numcodecs: 8.8 ms).
    """
    import google_crc32c

    compressor = compressor or _compressor()
    c, bh, bw = block.shape
    n = shard // chunk
    ny, nx = -(-bh // chunk), -(-bw // chunk)
    padded = np.zeros((c, ny * chunk, nx * chunk), dtype=np.uint8)
    padded[:, :bh, :bw] = block
    chunks = np.ascontiguousarray(
        padded.reshape(c, ny, chunk, nx, chunk).transpose(1, 3, 0, 2, 4)).reshape(ny, nx, -1)
    live = chunks.any(axis=-1)
    order = [(cy, cx) for cy, cx in morton_order(n) if cy < ny and cx < nx and live[cy, cx]]
    if not order:
        return b""
    parts = [compressor.compress(chunks[cy, cx]) for cy, cx in order]
    sizes = np.array([len(p) for p in parts], dtype="<u8")
    yx = np.array(order)
    index = np.full((1, n, n, 2), _MAX_UINT64, dtype="<u8")
    index_size = index.nbytes + 4  # the crc32c after it
    index[0, yx[:, 0], yx[:, 1], 0] = np.cumsum(sizes) - sizes + index_size
    index[0, yx[:, 0], yx[:, 1], 1] = sizes
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    return index_bytes + crc + b"".join(parts)


@functools.lru_cache(maxsize=16)
def morton_order(n: int) -> tuple[tuple[int, int], ...]:
    """The ``(cy, cx)`` of an ``n`` x ``n`` grid of inner chunks in the order zarr's sharding
    codec lays them out in a shard: Morton (Z) order of the chunks-per-shard shape
    ``(1, n, n)``, where the size-1 channel axis has no bits and, at every bit, y's bit comes
    below x's; when ``n`` is not a power of two, the codes that fall outside the grid are
    skipped. (zarr's own helper is private; a test checks the bytes equal zarr's write.)"""
    bits = (n - 1).bit_length()

    def code(yx: tuple[int, int]) -> int:
        cy, cx = yx
        return sum((((cy >> b) & 1) << 2 * b) | (((cx >> b) & 1) << (2 * b + 1))
                   for b in range(bits))

    return tuple(sorted(((cy, cx) for cy in range(n) for cx in range(n)), key=code))


def _mark_incomplete(store: Any) -> None:
    """Delete the group's ``zarr.json`` before anything else: a crash while replacing a
    complete scene must not leave it looking complete."""

    async def unmark() -> None:
        if await store.exists("zarr.json"):
            await store.delete("zarr.json")

    _run_sync(unmark())


def read_group_attrs(scene_uri: str) -> dict[str, Any] | None:
    """The group attributes of ``scene_uri`` (one small read), or None if there is no group."""
    try:
        meta = json.loads(storage.read_bytes(join_uri(scene_uri, "zarr.json")))
    except FileNotFoundError:
        return None
    return meta.get("attributes", {})


def pyramid_coarsest(scene_uri: str) -> int | None:
    """The ``coarsest`` the scene's pyramid was written with (``write_pyramid``), or None when
    there is no group or it does not say."""
    value = ((read_group_attrs(scene_uri) or {}).get("pipeline") or {}).get("coarsest")
    return int(value) if value is not None else None


def pyramid_complete(root_uri: str, scene_id: str) -> bool:
    """Whether ``scene_id`` under ``root_uri`` was written to the end by ``write_pyramid`` in
    the current format (``FORMAT_VERSION``); an older scene counts as incomplete, so that the
    ingest rewrites it with its empty-shard record."""
    attrs = read_group_attrs(join_uri(root_uri, scene_id))
    facts = (attrs or {}).get("pipeline", {})
    return facts.get("complete") is True and facts.get("format", 0) >= FORMAT_VERSION


def open_pyramid(scene_uri: str) -> PyramidInfo:
    """Read the metadata of the scene group at ``scene_uri`` (no pixels).

    For an incomplete scene (``complete`` False) only the levels written so far are listed.
    Raises ``FileNotFoundError`` if there is no group, ``ValueError`` if it is not a pyramid.
    """
    import zarr

    store = storage.open_store(scene_uri, read_only=True)
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no pyramid group at {scene_uri}") from err
    attrs = dict(group.attrs)
    try:
        datasets = attrs["ome"]["multiscales"][0]["datasets"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{scene_uri} has no OME-Zarr multiscales metadata") from None
    complete = attrs.get("pipeline", {}).get("complete") is True
    shapes, chunk, shard = [], None, None
    for dataset in datasets:
        try:
            array = group[dataset["path"]]
        except KeyError:
            if complete:
                raise ValueError(f"{scene_uri}: level {dataset['path']} is missing") from None
            break  # an incomplete scene: report the levels written so far
        shapes.append(tuple(int(s) for s in array.shape))
        chunk, shard = tuple(array.chunks), tuple(array.shards or array.chunks)
    return PyramidInfo(
        uri=scene_uri,
        level_shapes=tuple(shapes),
        chunk_shape=chunk,
        shard_shape=shard,
        attrs=attrs.get("scene", {}),
        complete=complete,
    )
