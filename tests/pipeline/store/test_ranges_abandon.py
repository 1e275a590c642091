"""S3 range reads never cancel a tensorstore future (``pipeline.store.ranges.abandon``).

tensorstore's ``Future.cancel()`` waits, holding the GIL, for a ready callback that waits for
the GIL: a hedge's loser answering as it was cancelled deadlocked the reader. Fake futures
here fail the test if cancelled; the loser of a hedge and a request that timed out are kept
referenced until done instead.
"""

from __future__ import annotations

import asyncio
import collections
from types import SimpleNamespace

import pytest

from pipeline.store import ranges
from pipeline.store.counting import RequestLog


class FakeFuture:
    """A tensorstore-like future: answered at once (``value``) or never (None)."""

    def __init__(self, value: bytes | None):
        self.value = value

    def done(self) -> bool:
        return self.value is not None

    def cancelled(self) -> bool:
        return False

    def exception(self):
        return None

    def result(self):
        return SimpleNamespace(state="value", value=self.value)

    def add_done_callback(self, callback) -> None:
        if self.done():
            callback(self)

    def cancel(self) -> bool:
        raise AssertionError("a tensorstore future was cancelled")


def fake_store(answers: list[bytes | None], policy: ranges.RetryPolicy) -> ranges.S3Ranges:
    """An ``S3Ranges`` whose k-th request gets ``answers[k]`` (None: never answered)."""
    store = object.__new__(ranges.S3Ranges)
    store.log, store.policy, store.concurrency = RequestLog(), policy, 8
    store._first_answers = collections.deque(maxlen=64)
    sent = iter(answers)
    store._start = lambda key, byte_range: FakeFuture(next(sent))
    return store


@pytest.fixture(autouse=True)
def no_abandoned():
    ranges._ABANDONED.clear()
    yield
    ranges._ABANDONED.clear()


def test_the_loser_of_a_hedge_is_kept_not_cancelled():
    store = fake_store([None, b"hedge"], ranges.RetryPolicy(5.0, 0, 0.0, 0.0, hedge_after_s=0.05))
    assert asyncio.run(store.read_batch([("a/0/c/0/0", (0, 5))])) == [b"hedge"]
    assert len(ranges._ABANDONED) == 1 and not ranges._ABANDONED[0].done()
    assert store.log.counters().hedges == 1


def test_a_timed_out_request_is_kept_and_sent_again():
    store = fake_store([None, b"again"], ranges.RetryPolicy(0.05, 1, 0.0, 0.0))
    assert asyncio.run(store.read_batch([("a/0/c/0/0", (0, 5))])) == [b"again"]
    assert len(ranges._ABANDONED) == 1
    assert store.log.counters().timeouts == 1 and store.log.counters().retries == 1


def test_abandoned_futures_are_dropped_once_done():
    pending, finished = FakeFuture(None), FakeFuture(None)
    ranges.abandon(pending)
    ranges.abandon(finished)
    finished.value = b"late"
    ranges.abandon(FakeFuture(b"done"))  # done already: not kept
    assert ranges._ABANDONED == [pending]


def test_an_answer_after_the_loop_closed_is_dropped_quietly():
    import asyncio as aio

    loop = aio.new_event_loop()
    loop.close()
    ranges._notify(loop, lambda: None)  # raised "Event loop is closed" from a tensorstore thread
