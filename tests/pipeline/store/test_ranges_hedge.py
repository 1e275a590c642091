"""Tail hedging of S3 range reads (``pipeline.store.ranges.tail_wait``, ``S3Ranges._hedged``).

A request still unanswered when its batch has gone a few of the store's round trips without an
answer is sent once more. The round trip comes from the store's recent batches, or, before
there are enough, from the request's own siblings in its batch: a stall then costs a few round
trips from the first batch on, not ``hedge_after_s``. Fake futures answer from timer threads
(as tensorstore's do from its own) after a set delay, or never.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.store import ranges
from tests.pipeline.store.fake_s3 import NEVER, TimedFuture, fake_store


def timed_store(delays: list[float | None], policy: ranges.RetryPolicy,
                history: list[float] = ()) -> ranges.S3Ranges:
    """An ``S3Ranges`` whose k-th request answers ``b"<k>"`` after ``delays[k]`` seconds, with
    ``history`` as the first-answer times of its earlier batches."""
    return fake_store(lambda k: TimedFuture(str(k).encode(), delays[k]), policy, history)


@pytest.fixture(autouse=True)
def no_abandoned():
    ranges._ABANDONED.clear()
    yield
    ranges._ABANDONED.clear()


# timeout 10 s, no retries, hedge_after_s 5 s: a wait of seconds would be the cap, not the tail
POLICY = ranges.RetryPolicy(10.0, 0, 0.0, 0.0, hedge_after_s=5.0)
REQUESTS = [(f"a/0/c/0/{i}", (0, 5)) for i in range(4)]


def test_a_stall_is_hedged_after_its_siblings_round_trips_on_a_new_store():
    """No history yet: three requests answer after 20 ms, the fourth never; it is hedged
    about ``HEDGE_FACTOR`` x 20 ms after its siblings answered (its hedge answers in 20 ms),
    not after ``hedge_after_s`` (5 s)."""
    store = timed_store([0.02, 0.02, 0.02, NEVER, 0.02], POLICY)
    start = time.monotonic()
    got = asyncio.run(store.read_batch(REQUESTS))
    elapsed = time.monotonic() - start
    assert got == [b"0", b"1", b"2", b"4"]  # the stalled request's answer is its hedge's
    assert elapsed < 1.0, elapsed  # the batch-level cap would have been 5 s
    counters = store.log.counters()
    assert (counters.requests, counters.hedges, counters.timeouts) == (4, 1, 0)
    assert counters.bytes == 4  # the answers used, once each
    assert len(ranges._ABANDONED) == 1  # the stalled original: kept, not cancelled


def test_with_history_a_lone_stalled_request_costs_a_few_round_trips():
    """A one-request batch has no siblings: the store's median first answer (10 ms) sets the
    wait, ``HEDGE_FACTOR`` x 10 ms (40 ms)."""
    history = [0.01] * ranges.HEDGE_SAMPLES
    store = timed_store([NEVER, 0.01], POLICY, history)
    start = time.monotonic()
    assert asyncio.run(store.read_batch(REQUESTS[:1])) == [b"1"]
    elapsed = time.monotonic() - start
    assert ranges.HEDGE_FACTOR * 0.01 * 0.9 < elapsed < 1.0, elapsed
    assert store.log.counters().hedges == 1


def test_a_batch_answered_only_by_its_hedge_still_counts_as_a_round_trip():
    """Its time to the first answer (the hedge's, after the wait) joins the history, so that
    a store slower than its history is not kept being hedged as if fast (and a one-request
    batch with no history hedges after ``hedge_after_s``, here lowered to 50 ms)."""
    policy = ranges.RetryPolicy(10.0, 0, 0.0, 0.0, hedge_after_s=0.05)
    store = timed_store([NEVER, 0.01], policy)
    assert asyncio.run(store.read_batch(REQUESTS[:1])) == [b"1"]
    assert len(store._first_answers) == 1
    assert store._first_answers[0] >= 0.05


def test_many_unanswered_requests_are_not_stragglers_and_wait_hedge_after_s():
    """Half a batch unanswered is a slow or stalled store (or a queue), not stragglers: its
    requests are hedged only after ``hedge_after_s`` (0.3 s) without an answer, not after a
    few round trips (40 ms), so that a busy store is not sent the whole batch again."""
    policy = ranges.RetryPolicy(10.0, 0, 0.0, 0.0, hedge_after_s=0.3)
    delays = [0.01] * 4 + [NEVER] * 4 + [0.01] * 4
    store = timed_store(delays, policy, [0.01] * ranges.HEDGE_SAMPLES)
    requests = [(f"a/0/c/0/{i}", (0, 5)) for i in range(8)]
    start = time.monotonic()
    got = asyncio.run(store.read_batch(requests))
    elapsed = time.monotonic() - start
    assert got == [b"0", b"1", b"2", b"3", b"8", b"9", b"10", b"11"]
    assert elapsed >= 0.3 and store.log.counters().hedges == 4


def test_no_hedge_when_every_request_answers():
    store = timed_store([0.01, 0.01, 0.01, 0.01], POLICY, [0.2] * ranges.HEDGE_SAMPLES)
    assert asyncio.run(store.read_batch(REQUESTS)) == [b"0", b"1", b"2", b"3"]
    assert store.log.counters().hedges == 0 and not ranges._ABANDONED


@pytest.mark.parametrize(("history", "batch_first", "most", "wait"), [
    ([], None, 0.2, 0.2),  # nothing known: the policy's hedge_after_s
    ([], 0.01, 0.2, 0.04),  # the siblings' round trip, x HEDGE_FACTOR
    ([0.001] * 7, 0.02, 0.2, 0.08),  # too little history: still the siblings'
    ([0.01] * 8, None, 0.2, 0.04),  # enough history: its median
    ([0.01] * 4 + [0.5] * 3 + [0.02], 0.001, 0.2, 0.06),  # median of history, not siblings
    ([0.001] * 8, None, 0.2, ranges.HEDGE_FLOOR_S),  # never below the floor
    ([0.5] * 8, None, 0.2, 0.2),  # never above hedge_after_s
])
def test_tail_wait(history, batch_first, most, wait):
    assert ranges.HEDGE_FACTOR == 4.0 and ranges.HEDGE_SAMPLES == 8  # the table's premises
    assert ranges.tail_wait(history, batch_first, most) == pytest.approx(wait)


@pytest.mark.parametrize(("n", "concurrency", "few"), [
    (1, 64, 2), (16, 64, 2), (64, 64, 8), (200, 64, 25), (64, 3, 3),  # never more than in flight
])
def test_stragglers(n, concurrency, few):
    assert ranges.stragglers(n, concurrency) == few
