"""Counted byte reads from one store root: whole objects, byte ranges and suffixes, no zarr.

``open_ranges(root_uri, log)`` gives a ``RangeStore`` for a local directory, ``s3://bucket``
(tensorstore's S3 key-value store, many reads per event-loop wake-up) or ``memory://name``.
Every read is recorded in a ``pipeline.store.counting.RequestLog`` with its kind (``metadata``
for ``zarr.json``, ``index`` for a suffix, ``chunk`` otherwise), its range and the bytes
returned, so the reader's requests and bytes can be asserted exactly.

A range is ``(start, end)`` (half-open), ``(-n, None)`` for the last ``n`` bytes, or None for
the whole object. A read returns ``bytes``; a missing object reads as None (and counts as a
request of 0 bytes).

Local and memory stores read synchronously (``immediate``): a page-cache ``pread`` of a few KB
takes microseconds, less than scheduling a task for it, so the reader calls ``read_now`` on its
event loop's thread. S3 reads are coroutines (``read``, ``read_batch``), many in flight at once.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.store import storage
from pipeline.store.counting import RequestLog, StoreRequest, kind_of

Range = tuple[int, int | None] | None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How S3 range reads are bounded (values: ``pipeline.read.settings.ReaderSettings``).

    Attributes:
        timeout_s: seconds a batch of requests may go without any answer; its requests still
            unanswered then are sent again (``_wait_progress``; the first copies are left
            to finish, see ``abandon``).
        max_retries: how many times a request that timed out or failed (HTTP 5xx, a reset
            connection) is sent again before the read fails with ``S3ReadError``.
        initial_delay_s, max_delay_s: the wait before retry k is
            ``min(max_delay_s, initial_delay_s * 2**k)``.
        hedge_after_s: the most seconds a batch may go without any answer before each of its
            requests still unanswered gets one duplicate (a hedge; the original is not
            cancelled, the first answer of the two is used, the other left to finish): a rare
            stall then costs at most about this, not ``timeout_s``. 0 (or ``>= timeout_s``):
            no hedges. A batch's stragglers are hedged sooner, after ``tail_wait`` (a few of
            the store's round trips, see ``HEDGE_FACTOR``).
    """

    timeout_s: float
    max_retries: int
    initial_delay_s: float
    max_delay_s: float
    hedge_after_s: float = 0.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry ``retry`` (0-based)."""
        return min(self.max_delay_s, self.initial_delay_s * 2**retry)


# Tail hedging (``S3Ranges._hedged``): when all that is left of a batch are its stragglers
# (at most ``stragglers(n, concurrency)`` of its n requests) and it has had no answer for
# ``tail_wait`` (HEDGE_FACTOR round trips of this store, within [HEDGE_FLOOR_S,
# ``hedge_after_s``]), they are sent once more: a stall costs a few round trips. The round trip
# is the median time to a batch's first answer over the store's last HEDGE_WINDOW batches, or,
# before HEDGE_SAMPLES are known, the first answer of the stragglers' own batch (their
# siblings'). More requests left unanswered are a slow or stalled store, or requests still
# queued for a connection, not stragglers: they are hedged only after ``hedge_after_s``
# without an answer, so a busy store is not sent a second copy of a whole batch after a few
# round trips. Measured: docs/results/faults_stalls_tail_hedge.md.
HEDGE_SAMPLES = 8
HEDGE_WINDOW = 64
HEDGE_FACTOR = 4.0
HEDGE_FLOOR_S = 0.02
HEDGE_POLL_S = HEDGE_FLOOR_S  # how often a batch looks while the store's round trip is unknown
HEDGE_STRAGGLERS = 2  # a batch's stragglers: at most max(this, n // HEDGE_TAIL) requests
HEDGE_TAIL = 8


def stragglers(n: int, concurrency: int) -> int:
    """How many of a batch's ``n`` requests may be left for them to count as stragglers
    (hedged after ``tail_wait``, not ``hedge_after_s``): a few, and no more than can be in
    flight at once (``concurrency``; more left means some are still queued, not late)."""
    return min(concurrency, max(HEDGE_STRAGGLERS, n // HEDGE_TAIL))


def tail_wait(first_answers: collections.abc.Sequence[float], batch_first: float | None,
              most: float) -> float:
    """Seconds a batch may go without an answer before its stragglers are hedged.

    Args:
        first_answers: seconds from start to first answer of this store's recent batches.
        batch_first: seconds to the first answer of the batch being waited for (its siblings'
            answer; None while none has answered).
        most: the policy's ``hedge_after_s`` (the wait before anything is known, and the cap).
    Returns:
        ``HEDGE_FACTOR`` x the typical round trip (the median of ``first_answers`` once there
        are ``HEDGE_SAMPLES``, else ``batch_first``), within [``HEDGE_FLOOR_S``, ``most``].
    """
    if len(first_answers) >= HEDGE_SAMPLES:
        typical = statistics.median(first_answers)
    elif batch_first is not None:
        typical = batch_first
    else:
        return most
    return min(most, max(HEDGE_FLOOR_S, HEDGE_FACTOR * typical))


class S3ReadError(OSError):
    """S3 range reads that still timed out or failed after ``RetryPolicy.max_retries``."""


class RangeStore:
    """Reads of one store root; subclasses implement ``_fetch`` or ``_fetch_now``."""

    immediate = False  # True: ``read_now`` may be called (synchronous, cheap)
    batched = False  # True: ``read_batch`` reads many at once (one wake-up of the caller)

    def __init__(self, root: str, log: RequestLog):
        self.root, self.log = root, log

    def _count_many(self, requests: list[tuple[str, Range]], data: list[bytes | None],
                    kind: str | None = None) -> list[bytes | None]:
        """Record each ``(key, range)`` request with the bytes it returned; return ``data``.
        ``kind``: what they fetch (``index``, ...) when the range alone does not say (a shard
        index at the start of its object is a prefix range); default ``kind_of``."""
        self.log.add_many([StoreRequest(kind or kind_of(key, r), key, *(r or (None, None)),
                                        0 if d is None else len(d))
                           for (key, r), d in zip(requests, data, strict=True)])
        return data

    def _count(self, key: str, byte_range: Range, data: bytes | None,
               kind: str | None = None) -> bytes | None:
        return self._count_many([(key, byte_range)], [data], kind)[0]

    def read_now(self, key: str, byte_range: Range = None, kind: str | None = None) -> bytes | None:
        """The bytes of ``key`` in ``byte_range`` (None if the object is missing), now, counted
        as ``kind`` (see ``_count_many``)."""
        return self._count(key, byte_range, self._fetch_now(key, byte_range), kind)

    def read_ranges_now(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes | None]:
        """``read_now`` of several ``(start, end)`` ranges of one object (one request each)."""
        return [self.read_now(key, r) for r in ranges]

    def read_many_now(self, requests: list[tuple[str, Range]],
                      kind: str | None = None) -> list[bytes | None]:
        """``read_now`` of every ``(key, range)`` (shard indexes, or runs of their entries):
        one request each, counted in one batch as ``kind`` (see ``_count_many``)."""
        return self._count_many(requests, [self._fetch_now(k, r) for k, r in requests], kind)

    async def read(self, key: str, byte_range: Range = None, kind: str | None = None) -> bytes | None:
        """``read_now`` as a coroutine (the only way for stores that are not ``immediate``)."""
        if self.immediate:
            return self.read_now(key, byte_range, kind)
        return self._count(key, byte_range, await self._fetch(key, byte_range), kind)

    def _fetch_now(self, key: str, byte_range: Range) -> bytes | None:
        raise NotImplementedError(f"{type(self).__name__} reads asynchronously only")

    async def _fetch(self, key: str, byte_range: Range) -> bytes | None:
        raise NotImplementedError


def _slice(data: bytes, byte_range: Range) -> bytes:
    if byte_range is None:
        return data
    start, end = byte_range
    if end is None:  # suffix
        return data[max(len(data) + start, 0):]
    return data[start:end]


class LocalRanges(RangeStore):
    """A local directory: ``pread`` on the caller's thread."""

    immediate = True

    def read_ranges_now(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes | None]:
        """One ``open`` for all the ranges of an object, one ``pread`` (and request) each."""
        requests: list[tuple[str, Range]] = [(key, r) for r in ranges]
        try:
            fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return self._count_many(requests, [None] * len(ranges))
        try:
            out: list[bytes | None] = [os.pread(fd, r1 - r0, r0) for r0, r1 in ranges]
        finally:
            os.close(fd)
        return self._count_many(requests, out)

    def _fetch_now(self, key: str, byte_range: Range) -> bytes | None:
        try:
            fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if byte_range is None:
                size, offset = os.fstat(fd).st_size, 0
            elif byte_range[1] is None:  # suffix of -start bytes
                total = os.fstat(fd).st_size
                offset = max(total + byte_range[0], 0)
                size = total - offset
            else:
                offset, size = byte_range[0], byte_range[1] - byte_range[0]
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


class MemoryRanges(RangeStore):
    """A ``memory://`` store (tests): slices of the stored objects."""

    immediate = True

    def _fetch_now(self, key: str, byte_range: Range) -> bytes | None:
        try:
            data = storage.read_bytes(storage.join_uri(self.root, key))
        except FileNotFoundError:
            return None
        return _slice(data, byte_range)


class S3Ranges(RangeStore):
    """An ``s3://bucket[/prefix]`` root through tensorstore's S3 key-value store (C++: its own
    HTTP connection pool and request signing, none of it holding the GIL).

    ``read_batch`` issues many reads at once and wakes the caller's event loop once, when the
    last one is done: about 0.2 ms of CPU per request, against ~0.4 ms for one awaited obstore
    request each (the wake-up per request costs as much as the request). Each read is one GET
    with a ``Range`` header: tensorstore merges nothing at this level, so the counts stay exact.
    Endpoint, region and credentials come from the standard ``AWS_*`` variables.

    Faults are bounded here, not in tensorstore (its own retries are off, and it has no
    per-request timeout): when no request of a batch has been answered for a few of this
    store's round trips (``tail_wait``, at most the policy's ``hedge_after_s``), each
    unanswered one is sent a second time (a hedge, counted with
    ``RequestLog.add_faults``), the first of the two answers is used and the other left to
    finish (``abandon``: a tensorstore future is never cancelled); when no request (or copy)
    has been answered for the policy's timeout in all, the unanswered requests are given up
    (a stall costs about one timeout, however large the batch), and those and the failed
    ones (5xx, resets) are sent again
    after a backoff, up to ``max_retries`` times; each is counted (``RequestLog.add_faults``).
    A 404 is no fault: the object is missing (None), which the reader reports.
    """

    batched = True

    def __init__(self, root: str, log: RequestLog, *, concurrency: int = 64,
                 policy: RetryPolicy | None = None):
        import tensorstore as ts

        super().__init__(root, log)
        self.concurrency = concurrency
        self._first_answers: collections.deque[float] = collections.deque(maxlen=HEDGE_WINDOW)
        # without a policy (the reader always passes ReaderSettings'): no timeout, no retry
        self.policy = policy or RetryPolicy(math.inf, 0, 0.0, 0.0)
        self._kv = ts.KvStore.open(s3_kvstore_spec(root), context=ts.Context({
            "s3_request_concurrency": {"limit": concurrency},
            "s3_request_retries": {"max_retries": 0, "initial_delay": "0.01s", "max_delay": "0.01s"},
        })).result()

    def _start(self, key: str, byte_range: Range) -> Any:
        if byte_range is None:
            return self._kv.read(key)
        start, end = byte_range
        return self._kv.read(key, byte_range=slice(start, end))

    async def _fetch(self, key: str, byte_range: Range) -> bytes | None:
        return (await self._fetch_batch([(key, byte_range)]))[0]

    async def _fetch_batch(self, requests: list[tuple[str, Range]]) -> list[bytes | None]:
        """Every request's bytes (None: missing), retrying timeouts and failures."""
        out: list[bytes | None] = [None] * len(requests)
        todo, why = list(range(len(requests))), ""
        for attempt in range(self.policy.max_retries + 1):
            if attempt:
                self.log.add_faults(retries=len(todo))
                await asyncio.sleep(self.policy.delay(attempt - 1))
            todo, why = await self._attempt(requests, todo, out)
            if not todo:
                return out
        key, byte_range = requests[todo[0]]
        raise S3ReadError(f"{len(todo)} of {len(requests)} S3 reads failed after "
                          f"{self.policy.max_retries} retries (first: {key} {byte_range}): {why}")

    async def _attempt(self, requests: list[tuple[str, Range]], todo: list[int],
                       out: list[bytes | None]) -> tuple[list[int], str]:
        """Send ``requests[i]`` for every i in ``todo`` (hedged, see ``_wait_hedged``) and wait
        at most the policy's timeout; fill ``out`` from the first answer of each; return the
        indexes to send again and why the last of them failed."""
        copies = await self._wait_hedged(requests, {i: self._start(*requests[i]) for i in todo})
        again, why, timeouts = [], "", 0
        for i, sent in copies.items():
            future = _first_answer(sent)
            for other in sent:
                if other is not future:
                    abandon(other)  # the loser of a hedge, or an unanswered request
            if future is None:
                timeouts += 1
                again.append(i)
                why = f"no answer within {self.policy.timeout_s:g} s"
                continue
            try:
                result = future.result()
            except Exception as err:  # 5xx, reset: tensorstore's own retries are off
                again.append(i)
                why = why or repr(err)
                continue
            out[i] = None if result.state == "missing" else result.value
        self.log.add_faults(timeouts=timeouts, errors=len(again) - timeouts)
        return again, why

    async def _wait_hedged(self, requests: list[tuple[str, Range]],
                           futures: dict[int, Any]) -> dict[int, list[Any]]:
        """Wait for ``futures`` (request index: tensorstore future); when none has been answered
        for ``hedge_after_s``, send each unanswered request once more and wait for the first
        answer of each pair, until the policy's timeout (in all) passes without any. Returns
        each index's copies (one, or the original and its hedge), none cancelled."""
        copies = {i: [f] for i, f in futures.items()}
        try:
            await self._hedged(requests, copies)
        except asyncio.CancelledError:
            for future in (f for sent in copies.values() for f in sent):
                abandon(future)
            raise
        return copies

    async def _hedged(self, requests: list[tuple[str, Range]],
                      copies: dict[int, list[Any]]) -> None:
        """``_wait_hedged``'s waits; appends each hedge to its request's ``copies``."""
        timeout, most = self.policy.timeout_s, self.policy.hedge_after_s
        futures = {i: sent[0] for i, sent in copies.items()}
        if not 0 < most < timeout:
            if math.isinf(timeout):
                await _all_done(list(futures.values()))
            else:
                await _wait_progress(list(futures.values()), timeout)
            return
        history = list(self._first_answers)
        answers = _Answers(list(futures.values()))
        await _wait_tail(answers, history, most, stragglers(len(futures), self.concurrency))
        late = [i for i, f in futures.items() if not f.done()]
        if late:
            self.log.add_faults(hedges=len(late))
            for i in late:
                copies[i].append(answers.watch(self._start(*requests[i])))
            # the timeout counts from the last answer; the wait so far was at most ``most``
            await _wait_first([copies[i] for i in late], timeout - min(answers.state()[0], most))
        first = answers.state()[1]
        if first is not None:  # a hedge's answer too: a slow store is not taken for a fast one
            self._first_answers.append(first)

    async def read_batch(self, requests: list[tuple[str, Range]],
                         kind: str | None = None) -> list[bytes | None]:
        """``read`` of every ``(key, range)``, all in flight at once (tensorstore bounds how
        many go out together), each counted once (as ``kind``, see ``_count_many``); timeouts
        and failures retried."""
        return self._count_many(requests, await self._fetch_batch(requests), kind)


def _answered(future: Any) -> bool:
    """True when a tensorstore future is done with a result (not failed, not cancelled)."""
    return future.done() and not future.cancelled() and future.exception() is None


_ABANDONED: list[Any] = []  # tensorstore futures given up on and not yet done
_ABANDONED_LOCK = threading.Lock()


def abandon(future: Any) -> None:
    """Give up on a tensorstore future without cancelling it: it is kept referenced until
    it is done (pruned at the next call), its answer unused.

    ``Future.cancel()`` (tensorstore 0.1.86) unregisters the future's ready callback holding
    the GIL and waits for that callback if it is running, while the callback waits for the
    GIL to run the Python done-callbacks: a hedge's loser answering just as it was cancelled
    deadlocked the reader's I/O thread (seen in ``make stack-demo``: training stopped in
    epoch 13 with both threads waiting). A stalled request given up on thus holds one of
    ``concurrency`` connections until the server ends it."""
    with _ABANDONED_LOCK:
        _ABANDONED[:] = [f for f in _ABANDONED if not f.done()]
        if not future.done():
            _ABANDONED.append(future)


def _notify(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    """``loop.call_soon_threadsafe(callback)`` from a tensorstore thread; nothing when the loop
    is closed (an abandoned request answering after its reader shut down)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # "Event loop is closed": nobody waits for this answer any more
        pass


def _first_answer(copies: list[Any]) -> Any | None:
    """The copy of a request whose answer to use: one with a result, else a failed one (its
    error is retried), else None (no copy answered: a timeout)."""
    done = [f for f in copies if f.done() and not f.cancelled()]
    answered = [f for f in done if f.exception() is None]
    return (answered or done or [None])[0]


async def _all_done(futures: list[Any]) -> None:
    """Wait, on the running event loop, until every tensorstore future is done: one wake-up
    for the batch (its callbacks run on tensorstore's threads). Cancelling the wait leaves
    the futures alone (the caller abandons them)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [len(futures)]
    lock = threading.Lock()

    def finished(_: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            _notify(loop, lambda: done.done() or done.set_result(None))

    if not futures:
        return
    for future in futures:
        future.add_done_callback(finished)
    await done


class _Answers:
    """When the tensorstore futures of a batch answered (their done callbacks, on tensorstore's
    threads): how many, seconds to the first answer and since the last."""

    def __init__(self, futures: list[Any]):
        self.start = self.last = time.monotonic()
        self.first: float | None = None
        self.count = 0
        self.futures: list[Any] = []
        self._lock = threading.Lock()
        for future in futures:
            self.watch(future)

    def watch(self, future: Any) -> Any:
        """Count ``future``'s answer too (a hedge); returns it."""
        self.futures.append(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Any) -> None:
        with self._lock:
            self.last = time.monotonic()
            self.count += 1
            if self.first is None:
                self.first = self.last - self.start

    def state(self) -> tuple[float, float | None, int]:
        """(seconds since the last answer, or since the start; seconds to the first answer,
        None before it; answers so far)."""
        with self._lock:
            return time.monotonic() - self.last, self.first, self.count


async def _wait_tail(answers: _Answers, history: list[float], most: float, few: int) -> None:
    """Wait until every request of a batch (``answers``' futures) answered, or until the
    batch has gone without an answer for ``tail_wait`` with at most ``few`` of them left
    (``stragglers``), or for ``most`` with more left (a stalled pool, not stragglers). Wakes
    the loop once when the batch is done, plus once per tail wait while it lasts (to see the
    moment the stragglers are alone; every ``HEDGE_POLL_S`` while the round trip is not known
    yet). Nothing is cancelled but the wait itself."""
    n = len(answers.futures)
    everything = asyncio.ensure_future(_all_done(list(answers.futures)))
    try:
        while not everything.done():
            idle, first, count = answers.state()
            tail = tail_wait(history, first, most)
            limit = tail if n - count <= few else most
            if idle >= limit:
                break
            known = first is not None or len(history) >= HEDGE_SAMPLES
            await asyncio.wait([everything], timeout=min(limit - idle,
                                                         tail if known else HEDGE_POLL_S))
    finally:
        if not everything.done():
            everything.cancel()  # the wait, not the futures
            await asyncio.gather(everything, return_exceptions=True)


async def _wait_progress(futures: list[Any], timeout: float) -> float | None:
    """Wait until every tensorstore future is done, or until none has finished for
    ``timeout`` seconds (the caller retries those left): a stalled request costs about
    ``timeout`` after the last answer of its batch. One wake-up of the loop for the batch,
    plus one per ``timeout`` while it lasts. Returns the seconds to the first future's finish
    (None: none finished)."""
    answers = _Answers(futures)
    everything = asyncio.ensure_future(_all_done(futures))
    while not everything.done():
        idle = answers.state()[0]
        if idle >= timeout:
            break
        await asyncio.wait([everything], timeout=timeout - idle)
    if not everything.done():
        everything.cancel()  # the wait, not the futures
        await asyncio.gather(everything, return_exceptions=True)
    return answers.state()[1]


async def _wait_first(groups: list[list[Any]], timeout: float) -> None:
    """Wait until each group of tensorstore futures (copies of one request) has one answered
    or all done, or until no group has been settled for ``timeout`` seconds (inf: no limit).
    Nothing is cancelled here. One wake-up of the loop per group (hedged requests are few)."""
    loop = asyncio.get_running_loop()
    settled = [loop.create_future() for _ in groups]

    def watch(group: list[Any], flag: asyncio.Future) -> None:
        def finished(_: Any) -> None:
            if any(_answered(f) for f in group) or all(f.done() for f in group):
                _notify(loop, lambda: flag.done() or flag.set_result(None))

        for future in group:
            future.add_done_callback(finished)

    for group, flag in zip(groups, settled, strict=True):
        watch(group, flag)
    pending, limit = set(settled), None if math.isinf(timeout) else timeout
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=limit,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
    finally:
        for flag in pending:
            flag.cancel()


def s3_kvstore_spec(root: str) -> dict[str, Any]:
    """tensorstore's kvstore spec of ``s3://bucket[/prefix]`` from the ``AWS_*`` variables
    (endpoint, region; credentials from the environment when set there, else tensorstore's
    default chain: profile files, instance metadata)."""
    parsed = storage.parse_uri(root)
    spec: dict[str, Any] = {
        "driver": "s3", "bucket": parsed.root,
        "path": f"{parsed.path.strip('/')}/" if parsed.path.strip("/") else "",
        "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def open_ranges(root_uri: str, log: RequestLog, *, concurrency: int = 64,
                policy: RetryPolicy | None = None) -> RangeStore:
    """The ``RangeStore`` of ``root_uri`` (a local directory, ``s3://bucket[/prefix]`` or
    ``memory://name``); keys are relative to it. ``concurrency``: most S3 requests in flight;
    ``policy``: S3 timeouts and retries (``S3Ranges``)."""
    parsed = storage.parse_uri(root_uri)
    if parsed.scheme == "file":
        return LocalRanges(parsed.root, log)
    if parsed.scheme == "memory":
        return MemoryRanges(root_uri, log)
    return S3Ranges(root_uri, log, concurrency=concurrency, policy=policy)
