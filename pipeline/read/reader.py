"""The attended-chunk reader: a ``PixelSource`` over pyramids written by ``pipeline.store.pyramid``.

A key is a scene group URI (``s3://bucket/pyr/scene``, ``/data/pyr/scene``, ``memory://...``).
For every request the reader

1. reads the scene's group metadata and the level's array metadata (cached),
2. plans (``pipeline.read.plan``, pure, no awaits) each box's region at that level and the
   de-duplicated inner chunks the regions touch and their shards (``plan_chunks`` ->
   ``ChunkPlan``),
3. reads the index of every shard those chunks live in (cached) and plans the byte ranges
   (``plan_byte_ranges`` -> ``RangePlan``, pure: chunks at most ``max_gap`` bytes apart share
   one request),
4. fetches the ranges with bounded concurrency (a local directory: ``pread`` on the loop
   thread, no thread hop per range) -> ``FetchedLevel``, then decodes the inner chunks with the
   array's own codecs into one (N, C, ch, cw) array (``Tiles``) and crops each box from a
   mosaic of its chunks: zero padding outside the level, then
   ``resize_patches(crop.float() / 255, size)``, exactly like ``TensorPyramidSource``.

Planning and execution are apart, as in zarr-python: the planner is pure functions of arrays,
the executor (this module) only awaits the I/O the plans name and decodes.

Concurrent reads all fetch at once, but decode in the order they were asked (``Turns``), so the
first micro-batch of a training step gets its patches first. Planning works on arrays, not
per-chunk objects (``plan_reads`` / ``plan_ranges`` show the same plans as objects, for tests
and tools): about 4.3 ms of CPU per sample of 16 boxes of 64 px read at level 1
(``bench/reader_cpu.py``). ``pipeline.read.process`` runs this source in a child process, so
that this CPU does not share the training loop's GIL.

Nothing else is fetched: the plan decides, and ``counters()`` shows it (with
``prefetch_indexes``, the first read of a scene's level also asks for every shard index of that
level). zarr-python is not used for pixel reads because it re-reads the shard index on every
read and spends ~0.45 ms of CPU per inner chunk (REFERENCE.md); the results are identical
(tested).

An absent shard object is read as fill value only when the level's empty-shard record
(``pipeline.store.pyramid.encode_empty_shards``, written by the ingest) says the shard is empty.
Any other absent shard, a deleted object or a 404 answered for a shard index, raises
``MissingShardError`` naming the scene, level, shard and its chunks; it is never cached, so the
next read asks the store again. Pyramids written before the record (format 1) have no way to
tell an all-zero shard from a lost one: their present shards read as always, every absent one
raises (the message says to re-ingest; the ingest rewrites older formats).

Metadata and shard indexes are cached per scene in one LRU bounded in bytes. All I/O runs on a
background event loop owned by the source and created on first use, so ``submit`` returns a
``concurrent.futures.Future`` that a training loop can wait on later; the object pickles as its
settings only (no loop, store or cache), so it can be sent to Ray workers. Its defaults are
``pipeline.read.settings.EXACT_READS``; ``from_settings`` builds it from any ``ReaderSettings``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.protocol import ReadRequest, level_shape, resize_patches
from pipeline.read.layout import (
    ChunkDecodeError,
    ChunkDecoder,
    EntryTable,
    LevelMeta,
    decode_entries,
    decode_index,
    entry_span,
    level_meta,
)
from pipeline.read.plan import (
    ChunkPlan,
    RangePlan,
    ShardKey,
    box_regions,
    entry_ids_by_shard,
    plan_byte_ranges,
    plan_chunks,
)
from pipeline.read.settings import EXACT_READS, ReaderSettings
from pipeline.store.counting import ReadCounters, RequestLog, StoreRequest
from pipeline.store.ranges import Range, RangeStore, RetryPolicy, open_ranges
from pipeline.store.storage import parse_uri


class ReadError(OSError):
    """A fetch or decode failed; the message names the scene, level, object key and range."""


class CorruptChunkError(ReadError):
    """An inner chunk did not decode (a flipped bit: zstd's content checksum or frame check
    failed; a wrong size). The message names the scene, level, object, the one chunk (its
    row and column of the level's chunk grid) and its byte range."""


class CorruptShardError(ReadError):
    """A shard object is shorter than its index says (truncated), or its index does not
    pass its crc32c. The message names the scene, level, shard and object."""


class MissingShardError(ReadError):
    """A shard object is absent although the pyramid does not record it as empty (or has no
    record): lost, or a 404 from the store. The message names the scene, level, shard, object
    key and the shard's inner chunks."""


@dataclass(frozen=True, slots=True)
class SceneMeta:
    """Group facts of one scene: its store location and its levels' array paths."""

    uri: str
    root: str
    prefix: str
    level_paths: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class FetchedLevel:
    """The I/O half of reading regions of one level of one scene: the plans and the bytes
    they named, ready to decode (``ZarrPixelSource._decode_level``).

    Attributes:
        meta: the level.
        chunks: the chunk plan: regions (K, 4) level pixels, chunks (N, 2), their shards.
        ranges: the byte-range plan of R requests; None when there is no region (nothing
            was fetched and nothing is decoded).
        keys: (R,) store key of the shard object each request read.
        data: (R,) uint8 arrays, request r's bytes ``[ranges.start[r], ranges.end[r])``.
    """

    meta: LevelMeta
    chunks: ChunkPlan
    ranges: RangePlan | None
    keys: tuple[str, ...]
    data: tuple[np.ndarray, ...]


class ByteLRU:
    """Least-recently-used cache bounded by the sum of the entries' declared sizes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def get(self, key: Any) -> Any:
        """The value of ``key`` (``KeyError`` if absent), now the most recently used."""
        value, _ = self._items[key]
        self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Insert ``value`` costing ``nbytes``; evict the least recently used over the bound."""
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: do not evict everything for it
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size


def locate(scene_uri: str) -> tuple[str, str]:
    """``(store root URI, key prefix)`` of a scene: one store per bucket / memory name, and
    the filesystem root for local scenes, so many scenes share one client."""
    parsed = parse_uri(scene_uri)
    if parsed.scheme == "file":
        return "/", parsed.root.strip("/")
    return parsed.root_uri(), parsed.path


def reads_by_scene(requests: Sequence[StoreRequest],
                   uris: Sequence[str]) -> dict[str, ReadCounters]:
    """Requests and bytes by kind of ``requests`` (a recording reader's ``requests()``), per
    scene of ``uris`` (``chunks`` and ``pixels`` are not split: 0).

    A request belongs to the scene whose key prefix (``locate``) its store key lies under;
    requests under none of them are left out. ``ValueError`` when two scenes share a prefix
    (the same path in two buckets), since their requests could not be told apart.
    """
    prefixes = {locate(uri)[1]: uri for uri in uris}
    if len(prefixes) != len(set(uris)):
        raise ValueError(f"scenes share a key prefix, their reads cannot be split: {sorted(uris)}")
    logs = {uri: RequestLog() for uri in uris}
    for request in requests:
        parts = request.key.split("/")
        for i in range(len(parts) - 1, 0, -1):  # the longest scene prefix first
            uri = prefixes.get("/".join(parts[:i]))
            if uri is not None:
                logs[uri].add(request)
                break
    return {uri: log.counters() for uri, log in logs.items()}


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


class ZarrPixelSource:
    """``models.protocol.PixelSource`` over sharded OME-Zarr pyramids; keys are scene URIs.

    The settings are those of ``pipeline.read.settings.ReaderSettings`` (see there), with the
    defaults of ``EXACT_READS`` (only planned chunk bytes, no index prefetch); the training
    defaults come through ``from_settings(ReaderSettings())``.

    Args:
        concurrency: most requests in flight at once (over all scenes of a call).
        cache_bytes: bound of the metadata + shard-index LRU cache, in bytes.
        max_gap: merge the byte ranges of two chunks of a shard when at most this many bytes
            lie between them (0: merge only chunks stored back to back).
        record_requests: keep every store request for ``requests()`` (tests, benchmarks).
        prefetch_indexes: on the first read of a level of a scene, ask for every shard index
            of that level at once (a few hundred bytes each): later reads need one round trip.
        prefetch_max_shards: prefetch only levels of at most this many shards.
        retry: S3 timeouts and retries (``ReaderSettings.retry_policy``); None: those of
            ``EXACT_READS``.
    """

    def __init__(
        self,
        *,
        concurrency: int = EXACT_READS.concurrency,
        cache_bytes: int = EXACT_READS.cache_bytes,
        max_gap: int = EXACT_READS.max_gap,
        record_requests: bool = False,
        prefetch_indexes: bool = EXACT_READS.prefetch_indexes,
        prefetch_max_shards: int = EXACT_READS.prefetch_max_shards,
        retry: RetryPolicy | None = None,
    ):
        if concurrency < 1 or cache_bytes < 0 or max_gap < 0:
            raise ValueError(
                f"need concurrency >= 1, cache_bytes >= 0, max_gap >= 0; got {concurrency}, "
                f"{cache_bytes}, {max_gap}"
            )
        self._init_args = {"concurrency": concurrency, "cache_bytes": cache_bytes,
                           "max_gap": max_gap, "record_requests": record_requests,
                           "prefetch_indexes": prefetch_indexes,
                           "prefetch_max_shards": prefetch_max_shards, "retry": retry}
        self.concurrency, self.cache_bytes, self.max_gap = concurrency, cache_bytes, max_gap
        self.prefetch_indexes, self.prefetch_max_shards = prefetch_indexes, prefetch_max_shards
        self.retry = retry or EXACT_READS.retry_policy()
        self._log = RequestLog(record_requests)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._reset_loop_state()

    @classmethod
    def from_settings(cls, settings: ReaderSettings, *, record_requests: bool = False) -> ZarrPixelSource:
        """The reader of ``settings``, reading in this process (``settings.process`` is for
        ``pipeline.read.source.ZarrSourceFactory``, which decides where the reader runs)."""
        return cls(concurrency=settings.concurrency, cache_bytes=settings.cache_bytes,
                   max_gap=settings.max_gap, prefetch_indexes=settings.prefetch_indexes,
                   prefetch_max_shards=settings.prefetch_max_shards,
                   record_requests=record_requests, retry=settings.retry_policy())

    def _reset_loop_state(self) -> None:
        self._stores: dict[str, RangeStore] = {}
        self._cache = ByteLRU(self.cache_bytes)
        self._inflight: dict[Any, asyncio.Future] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._decoder = ChunkDecoder()  # not thread-safe: used on the loop thread only
        self._turns = Turns()
        self._prefetched: set[tuple[str, int]] = set()  # (scene, level) whose indexes were asked

    # ------------------------------------------------------------------ pickling, loop

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._init_args)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # new, or inherited by fork
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, daemon=True,
                                          name="ZarrPixelSource-io")
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._reset_loop_state()
            return self._loop

    def _submit(self, coro: Awaitable[Any]) -> Future:
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ZarrPixelSource: a blocking call from its own I/O thread would "
                               "deadlock; await the *_async methods instead")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def close(self) -> None:
        """Stop the I/O thread (a later call starts a new one)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and self._pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()

    # ------------------------------------------------------------------ public API

    def submit(self, keys: Sequence[str], request: ReadRequest) -> Future:
        """Start ``read(keys, request)`` in the background; the future gives its tensor."""
        return self._submit(self.read_async(list(keys), request))

    def submit_view(self, keys: Sequence[str], size: tuple[int, int]) -> Future:
        """Start ``view(keys, size)`` in the background."""
        return self._submit(self.view_async(list(keys), tuple(size)))

    def read(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        """Patches of each scene: (B, K, C, h, w) float32 in [0, 1] (see ``ReadRequest``)."""
        return self.submit(keys, request).result()

    def view(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        """Each whole scene resized to ``size`` from the coarsest level with both sides
        ``>= size`` (level 0 if none): (B, C, h, w) float32 in [0, 1]."""
        return self.submit_view(keys, size).result()

    def level0_sizes(self, keys: Sequence[str]) -> Tensor:
        """(B, 2) int64 level-0 (height, width) of each scene."""
        return self._submit(self.level0_sizes_async(list(keys))).result()

    def counters(self) -> ReadCounters:
        """Requests and bytes by kind, and chunks / pixels decoded, since the last reset."""
        return self._log.counters()

    def reset_counters(self) -> None:
        """Zero the counters (the caches are kept)."""
        self._log.reset()

    def requests(self) -> list[StoreRequest]:
        """Every store request since the last reset (with ``record_requests=True``)."""
        return self._log.requests()

    def clear_cache(self) -> None:
        """Forget cached metadata and shard indexes (the next read fetches them again)."""
        loop = self._ensure_loop()
        asyncio.run_coroutine_threadsafe(self._clear_cache(), loop).result()

    async def _clear_cache(self) -> None:
        self._cache = ByteLRU(self.cache_bytes)
        self._prefetched = set()

    # ------------------------------------------------------------------ async API

    async def read_async(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        """``read`` as a coroutine on this source's loop."""
        if len(keys) != request.boxes.shape[0]:
            raise ValueError(f"{len(keys)} keys for {request.boxes.shape[0]} rows of boxes")
        boxes = request.boxes.tolist()
        ticket = self._turns.take()
        try:
            fetched = await asyncio.gather(*(
                self._fetch_scene(key, rows, level)
                for key, rows, level in zip(keys, boxes, request.levels, strict=True)
            ))
            await self._turns.wait_below(ticket)  # decode in arrival order (see ``Turns``)
            scenes = [await self._finish_scene(f, request.size) for f in fetched]
        finally:
            self._turns.mark(ticket)
        return stack_scenes(scenes)

    async def view_async(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        """``view`` as a coroutine on this source's loop."""
        return torch.stack(await asyncio.gather(*(self._view_scene(k, size) for k in keys)))

    async def level0_sizes_async(self, keys: Sequence[str]) -> Tensor:
        """``level0_sizes`` as a coroutine on this source's loop."""
        metas = await asyncio.gather(*(self._level(k, 0) for k in keys))
        return torch.tensor([list(m.shape[1:]) for m in metas], dtype=torch.int64)

    # ------------------------------------------------------------------ per scene

    async def _fetch_scene(self, uri: str, boxes: list, level: int) -> FetchedLevel:
        """The I/O half of reading ``boxes`` ((K, 4) level-0 pixels) of one scene at ``level``:
        plan the chunks (pure), then fetch them (nothing when there is no box)."""
        meta = await self._level(uri, level)
        chunks = plan_chunks(box_regions(boxes, level), level, meta.shape, meta.chunk_shape,
                             meta.shard_shape)
        if not len(chunks.regions):
            return FetchedLevel(meta, chunks, None, (), ())
        return await self._fetch_chunks(meta, chunks)

    async def _finish_scene(self, fetched: FetchedLevel, size: tuple[int, int]) -> Tensor:
        """The CPU half: decode, crop every region, resize: (K, C, *size) float32 in [0, 1]."""
        if fetched.ranges is None:
            return torch.zeros((0, fetched.meta.shape[0], *size))
        tiles = self._decode_level(fetched)
        return resize_crops([tiles.crop(r) for r in fetched.chunks.regions.tolist()], size)

    async def _view_scene(self, uri: str, size: tuple[int, int]) -> Tensor:
        """The whole scene at the coarsest level with both sides >= ``size`` (level 0 if
        none), resized to ``size``: (C, *size) float32 in [0, 1]."""
        shape0 = (await self._level(uri, 0)).shape  # with the group in one round trip
        scene = await self._scene(uri)
        shapes = [level_shape(shape0[1:], lv) for lv in range(len(scene.level_paths))]
        level = next((lv for lv in reversed(range(len(shapes)))
                      if shapes[lv][0] >= size[0] and shapes[lv][1] >= size[1]), 0)
        meta = await self._level(uri, level)
        region = np.array([[0, 0, *meta.shape[1:]]], dtype=np.int64)
        chunks = plan_chunks(region, level, meta.shape, meta.chunk_shape, meta.shard_shape)
        tiles = self._decode_level(await self._fetch_chunks(meta, chunks))
        pixels = tiles.crop(region[0].tolist())
        return resize_patches(torch.from_numpy(pixels)[None].float() / 255.0, size)[0]

    async def _fetch_chunks(self, meta: LevelMeta, chunks: ChunkPlan) -> FetchedLevel:
        """Execute a chunk plan: the shard indexes (cached), the byte-range plan (pure), then
        one request per range (none per shard)."""
        shards = [ShardKey(meta.level, sy, sx) for sy, sx in chunks.shards.tolist()]
        store = self._store(locate(meta.uri)[0])
        gap = 0 if store.immediate else self.max_gap  # a local pread costs no round trip
        ranges = plan_byte_ranges(chunks, await self._indexes(store, meta, shards, chunks), gap)
        objects = {s: meta.shard_object(shards[s]) for s in set(ranges.shard.tolist())}
        keys = tuple(objects[s] for s in ranges.shard.tolist())
        requests = list(zip(keys, ranges.start.tolist(), ranges.end.tolist(), strict=True))
        data = await self._get_ranges(store, meta, requests)
        return FetchedLevel(meta, chunks, ranges, keys, tuple(data))

    def _decode_level(self, fetched: FetchedLevel) -> Tiles:
        """Decode every fetched range into one ``Tiles`` (chunks without bytes: fill value),
        in one batch over all requests, and count the chunks."""
        meta, cyx, ranges = fetched.meta, fetched.chunks.cyx, fetched.ranges
        tiles = Tiles(meta, cyx)
        tiles.data[ranges.fill] = meta.fill_value
        if len(ranges.rows):
            sizes = np.array([len(d) for d in fetched.data], dtype=np.int64)
            joined_at = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # request r's offset
            per_chunk = np.diff(ranges.bounds)
            shift = np.repeat(joined_at - ranges.start, per_chunk)
            try:
                tiles.data[ranges.rows] = self._decoder.decode(
                    meta, b"".join(fetched.data), ranges.chunk_start + shift,
                    ranges.chunk_end + shift)
            except ChunkDecodeError as err:
                raise self._decode_error(fetched, err) from err
        self._log.add_chunks(len(cyx), len(cyx) * meta.chunk_nbytes)
        return tiles

    @staticmethod
    def _decode_error(fetched: FetchedLevel, err: ChunkDecodeError) -> ReadError:
        """A ``ChunkDecodeError`` naming the scene, level, shard object, the failing chunk and
        its own byte range in the object (and how many others of the batch failed too)."""
        meta, ranges = fetched.meta, fetched.ranges
        r = int(np.searchsorted(ranges.bounds, err.item, side="right")) - 1
        cy, cx = fetched.chunks.cyx[ranges.rows[err.item]].tolist()
        c0, c1 = int(ranges.chunk_start[err.item]), int(ranges.chunk_end[err.item])
        more = f" ({len(err.items) - 1} more chunks of this read failed too)" if len(err.items) > 1 else ""
        return CorruptChunkError(f"{_where(meta, fetched.keys[r], c0, c1)}: decoding chunk "
                                 f"({cy}, {cx}) failed: {err}{more}")

    async def _get_ranges(self, store: RangeStore, meta: LevelMeta,
                          ranges: list[tuple[str, int, int]]) -> list[np.ndarray]:
        """The bytes of every (key, start, end) as uint8 arrays, each checked for its length.

        A local directory is read with ``pread`` on this loop's thread: a page-cache read of a
        few KB takes microseconds, less than a task or a thread hop per range. Other stores get
        one request per range, at most ``concurrency`` in flight.
        """
        if store.immediate:
            out = []
            for key, group in itertools.groupby(ranges, key=lambda r: r[0]):
                spans = [(r0, r1) for _, r0, r1 in group]
                try:
                    out.extend(store.read_ranges_now(key, spans))
                except Exception as err:
                    where = _where(meta, key, spans[0][0], spans[-1][1])
                    raise ReadError(f"{where}: GET {key} failed: {err!r}") from err
        else:
            out = await self._get_batch(store, [(key, (r0, r1)) for key, r0, r1 in ranges],
                                        lambda i: _where(meta, *ranges[i]))
        arrays = []
        for (key, r0, r1), buf in zip(ranges, out, strict=True):
            if buf is None:
                raise MissingShardError(f"{_where(meta, key, r0, r1)}: expected {r1 - r0} bytes, "
                                        "got nothing (the object is gone) since its index was "
                                        "read; not read as zeros")
            if len(buf) != r1 - r0:
                raise CorruptShardError(f"{_where(meta, key, r0, r1)}: expected {r1 - r0} bytes, "
                                        f"got {len(buf)}: the shard object is shorter than its "
                                        "index says (truncated)")
            arrays.append(np.frombuffer(buf, np.uint8))
        return arrays

    # ------------------------------------------------------------------ cached metadata

    async def _cached(self, key: Any, load: Callable[[], Awaitable[tuple[Any, int]]]) -> Any:
        """The cached value for ``key``, loading it once even when asked concurrently."""
        if key in self._cache:
            return self._cache.get(key)
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(load())
            self._inflight[key] = pending
            try:
                value, nbytes = await pending
            finally:
                self._inflight.pop(key, None)
            self._cache.put(key, value, nbytes)
            return value
        value, _ = await asyncio.shield(pending)
        return value

    async def _scene(self, uri: str) -> SceneMeta:
        async def load() -> tuple[SceneMeta, int]:
            root, prefix = locate(uri)
            key = _key(prefix, "zarr.json")
            raw = await self._get(self._store(root), key, None, f"scene {uri} group metadata")
            if raw is None:
                raise FileNotFoundError(f"no pyramid group at {uri} (no {key} in {root})")
            attrs = json.loads(raw).get("attributes", {})
            if attrs.get("pipeline", {}).get("complete") is not True:
                raise ValueError(f"scene {uri} is incomplete (its pyramid write did not finish)")
            try:
                datasets = attrs["ome"]["multiscales"][0]["datasets"]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"scene {uri} has no OME-Zarr multiscales metadata") from None
            paths = tuple(str(d["path"]) for d in datasets)
            return SceneMeta(uri, root, prefix, paths), len(raw)

        return await self._cached(("scene", uri), load)

    async def _level(self, uri: str, level: int) -> LevelMeta:
        """A level's metadata (cached). On a scene's first read the group's and the level's
        ``zarr.json`` are asked for at once, the level's path guessed as the writer names it
        (``str(level)``): one round trip instead of two; a wrong guess (another writer's
        paths) costs one more request, then the group's path is read."""
        if ("level", uri, level) in self._cache:
            return self._cache.get(("level", uri, level))

        async def load() -> tuple[LevelMeta, int]:
            root, prefix = locate(uri)
            guessed = _key(prefix, str(level))
            where = f"scene {uri} level {level} metadata"
            if ("scene", uri) in self._cache:
                scene, raw = self._cache.get(("scene", uri)), None
            else:
                scene, raw = await asyncio.gather(self._scene(uri), self._get(
                    self._store(root), _key(guessed, "zarr.json"), None, where))
            if not 0 <= level < len(scene.level_paths):
                raise ValueError(f"scene {uri!r} has {len(scene.level_paths)} levels, asked for {level}")
            key_prefix = _key(scene.prefix, scene.level_paths[level])
            if raw is None or key_prefix != guessed:
                raw = await self._get(self._store(root), _key(key_prefix, "zarr.json"), None, where)
            if raw is None:
                raise FileNotFoundError(f"{where} {_key(key_prefix, 'zarr.json')}: missing")
            return level_meta(uri, level, key_prefix, json.loads(raw)), len(raw)

        return await self._cached(("level", uri, level), load)

    def _shard_index(self, meta: LevelMeta, shard: ShardKey, key: str, data: bytes | None,
                     span: tuple[int, int] | None = None) -> tuple[np.ndarray | None, int]:
        """A shard's index table (and its cache cost in bytes) from the bytes read for it (the
        whole index, or the run of entries ``span``: ``decode_entries``); None for a shard
        recorded empty; ``MissingShardError`` for any other absent shard."""
        if data is None:
            if meta.empty_shards is not None and (shard.sy, shard.sx) in meta.empty_shards:
                return None, 64  # recorded empty: the whole shard is fill value
            raise MissingShardError(_missing_shard(meta, shard, key))
        try:
            table = decode_index(meta, data) if span is None else decode_entries(meta, data, span)
        except ValueError as err:
            raise CorruptShardError(
                f"scene {meta.uri} level {meta.level} shard ({shard.sy}, {shard.sx}): shard index "
                f"of {key}: {err}") from err
        return table, table.nbytes

    async def _index(self, meta: LevelMeta, shard: ShardKey) -> np.ndarray | None:
        """The index of one shard (cached); read once even when asked concurrently."""
        async def load() -> tuple[np.ndarray | None, int]:
            key = meta.shard_object(shard)
            where = f"scene {meta.uri} level {meta.level} shard index of {key}"
            data = await self._get(self._store(locate(meta.uri)[0]), key, meta.index_range, where,
                                   "index")
            return self._shard_index(meta, shard, key, data)

        return await self._cached(_index_key(meta, shard), load)

    def _whole_indexes(self, meta: LevelMeta) -> bool:
        """Whether shard indexes of this level are read whole (and all of them at once, on the
        level's first read: ``prefetch_indexes``, at most ``prefetch_max_shards`` shards), or,
        for an index at the start of its objects, entry runs only (``_entry_tables``)."""
        return self._prefetching(meta) or not meta.index_at_start

    def _prefetching(self, meta: LevelMeta) -> bool:
        """Whether the first read of this level asks for every shard index at once."""
        gy, gx = meta.shard_grid
        return self.prefetch_indexes and gy * gx <= self.prefetch_max_shards

    async def _indexes(self, store: RangeStore, meta: LevelMeta, shards: list[ShardKey],
                       chunks: ChunkPlan) -> list:
        """The index table of every shard of ``chunks`` (``shards``: its ``ShardKey``s; ``store``:
        the scene's store): cached ones directly, the others in one batch (read now from a
        local or memory store, all in flight at once on S3), whole or as entry runs
        (``_whole_indexes``).

        With ``prefetch_indexes``, the first read of a level of a scene (of at most
        ``prefetch_max_shards`` shards) asks for the index of every shard of that level at
        once, so later reads of the scene need one round trip (chunks) instead of two (index,
        then chunks) whenever attention moves to a new shard.
        """
        if not self._whole_indexes(meta):
            return await self._entry_tables(store, meta, shards, chunks)
        if self._prefetching(meta) and (meta.uri, meta.level) not in self._prefetched:
            self._prefetched.add((meta.uri, meta.level))
            gy, gx = meta.shard_grid
            every = [ShardKey(meta.level, sy, sx) for sy in range(gy) for sx in range(gx)]
            # a shard that fails here fails only the read that needs it (asked again below)
            await asyncio.gather(*(self._index(meta, sh) for sh in every), return_exceptions=True)
        keys = [_index_key(meta, sh) for sh in shards]
        out = [self._cache.get(k) if k in self._cache else None for k in keys]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if not missing:
            return out
        todo = [shards[i] for i in missing]
        data = await self._read_indexes(store, meta, todo, [meta.index_range] * len(todo))
        for i, raw in zip(missing, data, strict=True):
            table, nbytes = self._shard_index(meta, shards[i], meta.shard_object(shards[i]), raw)
            self._cache.put(keys[i], table, nbytes)
            out[i] = table
        return out

    async def _entry_tables(self, store: RangeStore, meta: LevelMeta, shards: list[ShardKey],
                            chunks: ChunkPlan) -> list:
        """Index tables holding at least the entries of ``chunks`` in each shard, for an index
        at the start of its objects: per shard, one request for the run of entries from the
        first to the last needed entry not read before (``entry_span``; about 75 bytes a shard
        for the demo model's patches at 32k, against 1,028 for the whole index). Entries read
        are cached (``EntryTable``, merged with what a concurrent read cached meanwhile)."""
        needed = entry_ids_by_shard(chunks)
        keys = [_index_key(meta, sh) for sh in shards]
        have = [self._cache.get(k) if k in self._cache else None for k in keys]
        todo, spans = [], []
        for i, key in enumerate(keys):
            known = have[i]
            if key in self._cache and not isinstance(known, EntryTable):
                continue  # a whole table, or None: a shard recorded empty
            unread = needed[i] if known is None else needed[i][~known.known[needed[i]]]
            if len(unread):
                todo.append(i)
                spans.append(entry_span(meta, unread))
        data = await self._read_indexes(store, meta, [shards[i] for i in todo], spans)
        for i, span, raw in zip(todo, spans, data, strict=True):
            table, _ = self._shard_index(meta, shards[i], meta.shard_object(shards[i]), raw, span)
            now = self._cache.get(keys[i]) if keys[i] in self._cache else None
            have[i] = table if table is None else EntryTable.merge(
                now if isinstance(now, EntryTable) else None, table, span)
            self._cache.put(keys[i], have[i], 64 if table is None else have[i].nbytes)
        return [known.table if isinstance(known, EntryTable) else known for known in have]

    async def _read_indexes(self, store: RangeStore, meta: LevelMeta, shards: list[ShardKey],
                            spans: list[tuple[int, int | None]]) -> list[bytes | None]:
        """The bytes of ``spans[i]`` (a whole index, or a run of its entries) of the object of
        each ``shards[i]``, in one batch, counted as index requests."""
        objects = [meta.shard_object(sh) for sh in shards]
        if not objects:
            return []
        if store.immediate:
            try:
                return store.read_many_now(list(zip(objects, spans, strict=True)), "index")
            except Exception as err:
                raise ReadError(f"scene {meta.uri} level {meta.level} shard indexes of "
                                f"{objects[0]}...: GET failed: {err!r}") from err
        return await self._get_batch(
            store, list(zip(objects, spans, strict=True)),
            lambda i: f"scene {meta.uri} level {meta.level} shard index of {objects[i]}", "index")

    # ------------------------------------------------------------------ stores

    def _store(self, root: str) -> RangeStore:
        store = self._stores.get(root)
        if store is None:
            store = open_ranges(root, self._log, concurrency=self.concurrency, policy=self.retry)
            self._stores[root] = store
        return store

    def _get_now(self, store: RangeStore, key: str, byte_range: Range, where: str,
                 kind: str | None = None) -> bytes | None:
        """``_get`` from an ``immediate`` store, on this thread."""
        try:
            return store.read_now(key, byte_range, kind)
        except Exception as err:
            raise ReadError(f"{where}: GET {key} failed: {err!r}") from err

    async def _get_batch(self, store: RangeStore, requests: list[tuple[str, Range]],
                         where: Callable[[int], str], kind: str | None = None) -> list[bytes | None]:
        """``_get`` of every ``(key, range)``: in one batch where the store has one
        (``read_batch``: one wake-up of this loop for all), else one task each."""
        if not store.batched:
            return await asyncio.gather(*(self._get(store, key, r, where(i), kind)
                                          for i, (key, r) in enumerate(requests)))
        try:
            return await store.read_batch(requests, kind)
        except Exception as err:
            raise ReadError(f"{where(0)} (one of a batch of {len(requests)} requests): "
                            f"GET failed: {err!r}") from err

    async def _get(self, store: RangeStore, key: str, byte_range: Range, where: str,
                   kind: str | None = None) -> bytes | None:
        """The bytes of ``byte_range`` of ``key`` (None if missing), at most ``concurrency``
        requests in flight, counted as ``kind`` (default: by the range); any failure is a
        ``ReadError`` naming ``where``."""
        if store.immediate:
            return self._get_now(store, key, byte_range, where, kind)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        async with self._semaphore:
            try:
                return await store.read(key, byte_range, kind)
            except Exception as err:
                raise ReadError(f"{where}: GET {key} failed: {err!r}") from err


def _index_key(meta: LevelMeta, shard: ShardKey) -> tuple:
    return ("index", meta.uri, meta.level, shard.sy, shard.sx)


def _where(meta: LevelMeta, key: str, r0: int, r1: int) -> str:
    return f"scene {meta.uri} level {meta.level} object {key} bytes [{r0}, {r1})"


def _missing_shard(meta: LevelMeta, shard: ShardKey, key: str) -> str:
    """The message of ``MissingShardError``: where, which chunks (inclusive ranges of inner
    chunk rows and columns of the level), and why it is not read as fill value."""
    (ny, nx), (_, ch, cw) = meta.chunks_per_shard, meta.chunk_shape
    last_y = min((shard.sy + 1) * ny, -(-meta.shape[1] // ch)) - 1
    last_x = min((shard.sx + 1) * nx, -(-meta.shape[2] // cw)) - 1
    where = (f"scene {meta.uri} level {meta.level} shard ({shard.sy}, {shard.sx}) (object {key}, "
             f"chunks ({shard.sy * ny}..{last_y}, {shard.sx * nx}..{last_x}))")
    if meta.empty_shards is None:
        return (f"{where} is missing, and the pyramid has no empty-shard record (written before "
                "pipeline format 2), so it cannot be told from an all-zero shard: re-ingest the "
                "scene (the ingest rewrites older formats); not read as zeros")
    return (f"{where} is missing from the store although the pyramid records it as written "
            "(deleted, or the store answered 404); not read as zeros")


class Turns:
    """The order in which concurrent ``read_async`` calls decode (used on the loop thread only).

    Requests are numbered as they arrive (``take``); all fetch at once, but request t decodes,
    crops and resizes only once every request before it has finished (``wait_below(t)``) or
    failed (``mark`` runs in a ``finally``; marking twice is harmless). So the first request's
    patches come back first, instead of every request's interleaved CPU work finishing together
    at the end: the training loop starts computing on micro-batch 0 sooner.
    """

    def __init__(self) -> None:
        self.issued = 0
        self.below = 0  # every ticket < below is marked
        self.marked: set[int] = set()
        self.changed: asyncio.Condition | None = None

    def take(self) -> int:
        self.issued += 1
        return self.issued - 1

    async def wait_below(self, n: int) -> None:
        if self.below >= n:
            return
        if self.changed is None:
            self.changed = asyncio.Condition()
        async with self.changed:
            await self.changed.wait_for(lambda: self.below >= n)

    def mark(self, ticket: int) -> None:
        if ticket < self.below or ticket in self.marked:
            return
        self.marked.add(ticket)
        while self.below in self.marked:
            self.marked.remove(self.below)
            self.below += 1
        if self.changed is not None:
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


def resize_crops(crops: list[np.ndarray], size: tuple[int, int]) -> Tensor:
    """(N, C, *size) float32 in [0, 1] from N uint8 (C, h, w) crops: one ``resize_patches``
    call per distinct crop shape (a box maps to one of at most four shapes at a level), with
    the same result as resizing each crop alone.

    The uint8 -> float32 / 255 step is done by numpy, bit for bit what torch computes (exact
    conversion, then one correctly rounded division) but on this thread only: torch would split
    it over its OpenMP team, and under load (a busy core: the training loop, an object store)
    waiting for that team costs 10-20 ms per read.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, crop in enumerate(crops):
        by_shape.setdefault(crop.shape, []).append(i)
    out = np.empty((len(crops), crops[0].shape[0], *size), dtype=np.float32)
    for shape, idx in by_shape.items():
        group = np.divide(np.stack([crops[i] for i in idx]), np.float32(255.0), dtype=np.float32)
        if tuple(shape[-2:]) != tuple(size):
            group = resize_patches(torch.from_numpy(group), size).numpy()
        out[idx] = group
    return torch.from_numpy(out)


def stack_scenes(scenes: list[Tensor]) -> Tensor:
    """``torch.stack`` of the scenes' (K, C, h, w) results, copied by numpy on this thread
    (see ``resize_crops``)."""
    return torch.from_numpy(np.stack([s.numpy() for s in scenes]))


class Tiles:
    """Decoded chunks of one level: ``data[i]`` is chunk ``cyx[i]``, (C, ch, cw) uint8."""

    def __init__(self, meta: LevelMeta, cyx: np.ndarray):
        self.meta, self.cyx = meta, cyx
        self.data = np.empty((len(cyx), *meta.chunk_shape), dtype=np.uint8)
        # chunks by their row-major id in the level's chunk grid, sorted (memory: the chunks
        # fetched; a dense grid over their bounding box cost 4 MB on a 32k scene's level 1)
        self.width = -(-meta.shape[2] // meta.chunk_shape[2])
        ids = cyx[:, 0].astype(np.int64) * self.width + cyx[:, 1] if len(cyx) else np.zeros(0, np.int64)
        self.rows = np.argsort(ids, kind="stable").astype(np.int32)
        self.ids = ids[self.rows]

    def crop(self, region: Sequence[int]) -> np.ndarray:
        """(C, y1-y0, x1-x0) uint8 pixels of ``region`` (level pixels, half-open); 0 outside
        the level. The chunks under its part inside the level are tiled into one mosaic (one
        gather, a transpose and a reshape), then cropped."""
        y0, x0, y1, x1 = region
        c, h, w = self.meta.shape
        _, ch, cw = self.meta.chunk_shape
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if sy1 <= sy0 or sx1 <= sx0:
            return np.zeros((c, y1 - y0, x1 - x0), dtype=np.uint8)
        cy0, cx0, cy1, cx1 = sy0 // ch, sx0 // cw, (sy1 - 1) // ch + 1, (sx1 - 1) // cw + 1
        want = np.arange(cy0, cy1)[:, None] * self.width + np.arange(cx0, cx1)[None, :]
        pos = np.searchsorted(self.ids, want).clip(max=max(len(self.ids) - 1, 0))
        if not len(self.ids) or not (self.ids[pos] == want).all():
            raise KeyError(f"region {tuple(region)} needs chunks that were not fetched")
        idx = self.rows[pos]
        ny, nx = idx.shape
        mosaic = self.data[idx].transpose(2, 0, 3, 1, 4).reshape(c, ny * ch, nx * cw)
        inside = mosaic[:, sy0 - cy0 * ch : sy1 - cy0 * ch, sx0 - cx0 * cw : sx1 - cx0 * cw]
        if (sy0, sx0, sy1, sx1) == (y0, x0, y1, x1):
            return inside  # wholly inside the level: the mosaic's view, no padding copy
        out = np.zeros((c, y1 - y0, x1 - x0), dtype=np.uint8)
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = inside
        return out
