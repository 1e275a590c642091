"""Fakes of tensorstore's futures and an ``S3Ranges`` that answers from them, for the tests of
``pipeline.store.ranges``' hedging, timeouts and ``abandon`` (no server, no tensorstore)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from pipeline.store import ranges
from pipeline.store.counting import RequestLog

NEVER = None  # a delay: never answered


class TimedFuture:
    """A tensorstore-like future answered with ``value`` after ``delay_s`` seconds on a timer
    thread (0: answered already; ``NEVER``: never, unless ``finish()`` is called); cancelling
    it fails the test."""

    def __init__(self, value: bytes, delay_s: float | None):
        self.value, self._done, self._callbacks = value, delay_s == 0, []
        self._lock = threading.Lock()
        if delay_s:
            timer = threading.Timer(delay_s, self.finish)
            timer.daemon = True
            timer.start()

    def finish(self) -> None:
        """Answer now."""
        with self._lock:
            self._done, callbacks = True, list(self._callbacks)
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self):
        return None

    def result(self):
        return SimpleNamespace(state="value", value=self.value)

    def cancel(self) -> bool:
        raise AssertionError("a tensorstore future was cancelled")


def fake_store(start: Callable[[int], TimedFuture], policy: ranges.RetryPolicy,
               history: Sequence[float] = ()) -> ranges.S3Ranges:
    """An ``S3Ranges`` whose k-th request gets the future ``start(k)``, with ``history`` as the
    first-answer times of its earlier batches."""
    store = object.__new__(ranges.S3Ranges)
    store.log, store.policy, store.concurrency = RequestLog(), policy, 8
    store._first_answers = collections.deque(history, maxlen=ranges.HEDGE_WINDOW)
    sent = iter(range(10**9))
    store._start = lambda key, byte_range: start(next(sent))
    return store
