"""Request counting: the log of every read (``RequestLog``), and a zarr store wrapper that
counts requests and bytes (``CountingStore``, for zarr-python's own reads in benches and
tests; the reader counts through ``pipeline.store.ranges``), so reads can be asserted exactly.

Every ``get`` is classified by what it fetches:
- ``metadata``: a ``zarr.json`` key;
- ``index``: a suffix range (``SuffixByteRequest``), which is how a shard index at the end of
  a shard object is read (by zarr and by ``pipeline.read.reader``); or any range the reader
  names as one (an index at the start of its object, or a run of its entries, is a prefix
  range: ``RangeStore`` reads take a ``kind``);
- ``chunk``: anything else (byte ranges of inner chunks, or whole objects).
Bytes are those returned (0 for a missing key).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any

from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

KINDS = ("metadata", "index", "chunk")


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One ``get``: ``kind``, store-relative ``key``, the range asked (``start``/``end``; None
    for a whole object, ``start = -n`` for a suffix of ``n`` bytes), bytes returned."""

    kind: str
    key: str
    start: int | None
    end: int | None
    nbytes: int


@dataclass(frozen=True, slots=True)
class ReadCounters:
    """Totals since the last reset. ``chunks`` / ``pixels``: inner chunks the reader decoded
    (or filled, when absent) and their element count, i.e. the pixels fetched. ``retries``:
    requests sent again after a timeout or an error; ``timeouts``: requests that took longer
    than the reader's ``request_timeout_s`` (given up on, then retried); ``errors``: requests
    that failed (an HTTP 5xx, a reset connection; retried); ``hedges``: requests sent a second
    time, without cancelling the first, because their batch had no answer for a few of the
    store's round trips with only them left, or for the reader's ``hedge_after_s``
    (``pipeline.store.ranges.tail_wait``; the first answer of the two is used). Requests and
    bytes count the answers used, once each (not the hedges' other copy, left unused)."""

    requests: int = 0
    bytes: int = 0
    metadata_requests: int = 0
    metadata_bytes: int = 0
    index_requests: int = 0
    index_bytes: int = 0
    chunk_requests: int = 0
    chunk_bytes: int = 0
    chunks: int = 0
    pixels: int = 0
    retries: int = 0
    timeouts: int = 0
    errors: int = 0
    hedges: int = 0

    def __add__(self, other: ReadCounters) -> ReadCounters:
        return ReadCounters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def kind_of(key: str, byte_range: tuple[int, int | None] | None) -> str:
    """The kind of a request for ``byte_range`` of ``key``: ``(start, end)``, ``(-n, None)``
    for a suffix of ``n`` bytes, or None for the whole object (see the module docstring)."""
    if key == "zarr.json" or key.endswith("/zarr.json"):
        return "metadata"
    if byte_range is not None and byte_range[1] is None and (byte_range[0] or 0) < 0:
        return "index"
    return "chunk"


def classify(key: str, byte_range: ByteRequest | None) -> str:
    """The kind of a zarr store request (see the module docstring)."""
    return kind_of(key, _range_of(byte_range))


class RequestLog:
    """Thread-safe totals (and optionally every request) shared by several counting stores."""

    def __init__(self, record: bool = False):
        self.record = record
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._totals = {f.name: 0 for f in fields(ReadCounters)}
            self._requests: list[StoreRequest] = []

    def add(self, request: StoreRequest) -> None:
        self.add_many([request])

    def add_many(self, requests: list[StoreRequest]) -> None:
        """``add`` of several requests under one lock."""
        with self._lock:
            t = self._totals
            for request in requests:
                t["requests"] += 1
                t["bytes"] += request.nbytes
                t[f"{request.kind}_requests"] += 1
                t[f"{request.kind}_bytes"] += request.nbytes
            if self.record:
                self._requests.extend(requests)

    def add_chunks(self, chunks: int, pixels: int) -> None:
        with self._lock:
            self._totals["chunks"] += chunks
            self._totals["pixels"] += pixels

    def add_faults(self, retries: int = 0, timeouts: int = 0, errors: int = 0,
                   hedges: int = 0) -> None:
        """Count requests retried, timed out, failed and hedged (see ``ReadCounters``)."""
        with self._lock:
            self._totals["hedges"] += hedges
            self._totals["retries"] += retries
            self._totals["timeouts"] += timeouts
            self._totals["errors"] += errors

    def counters(self) -> ReadCounters:
        with self._lock:
            return ReadCounters(**self._totals)

    def requests(self) -> list[StoreRequest]:
        """Every request since the last reset (only when ``record`` is on)."""
        with self._lock:
            return list(self._requests)


def _range_of(byte_range: ByteRequest | None) -> tuple[int | None, int | None]:
    if byte_range is None:
        return None, None
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, SuffixByteRequest):
        return -byte_range.suffix, None
    return byte_range.offset, None


class CountingStore(WrapperStore):
    """Wraps a zarr ``Store``; every ``get`` (and ``get_partial_values``) goes to ``log``,
    with the key as the wrapped store sees it."""

    def __init__(self, store: Any, log: RequestLog | None = None):
        super().__init__(store)
        self.log = log if log is not None else RequestLog()

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.log)

    async def get(self, key: str, prototype: Any, byte_range: ByteRequest | None = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        start, end = _range_of(byte_range)
        nbytes = 0 if buf is None else len(buf)
        self.log.add(StoreRequest(classify(key, byte_range), key, start, end, nbytes))
        return buf

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), buf in zip(key_ranges, bufs, strict=True):
            start, end = _range_of(byte_range)
            nbytes = 0 if buf is None else len(buf)
            self.log.add(StoreRequest(classify(key, byte_range), key, start, end, nbytes))
        return bufs
