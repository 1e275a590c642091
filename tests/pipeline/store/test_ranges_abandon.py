"""S3 range reads never cancel a tensorstore future (``pipeline.store.ranges.abandon``).

tensorstore's ``Future.cancel()`` waits, holding the GIL, for a ready callback that waits for
the GIL: a hedge's loser answering as it was cancelled deadlocked the reader. Fake futures
here fail the test if cancelled; the loser of a hedge and a request that timed out are kept
referenced until done instead.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.store import ranges
from tests.pipeline.store.fake_s3 import NEVER, TimedFuture, fake_store


def answers_store(answers: list[bytes | None], policy: ranges.RetryPolicy) -> ranges.S3Ranges:
    """An ``S3Ranges`` whose k-th request gets ``answers[k]`` at once (None: never answered)."""
    return fake_store(lambda k: TimedFuture(answers[k], NEVER if answers[k] is None else 0),
                      policy)


@pytest.fixture(autouse=True)
def no_abandoned():
    ranges._ABANDONED.clear()
    yield
    ranges._ABANDONED.clear()


def test_the_loser_of_a_hedge_is_kept_not_cancelled():
    store = answers_store([None, b"hedge"], ranges.RetryPolicy(5.0, 0, 0.0, 0.0, hedge_after_s=0.05))
    assert asyncio.run(store.read_batch([("a/0/c/0/0", (0, 5))])) == [b"hedge"]
    assert len(ranges._ABANDONED) == 1 and not ranges._ABANDONED[0].done()
    assert store.log.counters().hedges == 1


def test_a_timed_out_request_is_kept_and_sent_again():
    store = answers_store([None, b"again"], ranges.RetryPolicy(0.05, 1, 0.0, 0.0))
    assert asyncio.run(store.read_batch([("a/0/c/0/0", (0, 5))])) == [b"again"]
    assert len(ranges._ABANDONED) == 1
    assert store.log.counters().timeouts == 1 and store.log.counters().retries == 1


def test_abandoned_futures_are_dropped_once_done():
    pending, finished = TimedFuture(b"", NEVER), TimedFuture(b"late", NEVER)
    ranges.abandon(pending)
    ranges.abandon(finished)
    finished.finish()
    ranges.abandon(TimedFuture(b"done", 0))  # done already: not kept
    assert ranges._ABANDONED == [pending]


def test_an_answer_after_the_loop_closed_is_dropped_quietly():
    import asyncio as aio

    loop = aio.new_event_loop()
    loop.close()
    ranges._notify(loop, lambda: None)  # raised "Event loop is closed" from a tensorstore thread
