"""The reader's settings, defined once: the ``reader`` section of a training config, the source
factory's recipe and the defaults of ``ZarrPixelSource`` all come from here.

Two named sets:

- ``ReaderSettings()``: what a training worker uses (the defaults of the config's ``reader``
  section): many requests in flight, nearby byte ranges merged, shard indexes prefetched, the
  reader in a child process.
- ``EXACT_READS``: what a bare ``ZarrPixelSource()`` does: every request carries only the bytes
  of planned chunks (``max_gap`` 0), no index is asked for before it is needed, in this
  process. Tests and the read-amplification bench count requests and bytes against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.store.ranges import RetryPolicy


@dataclass(frozen=True, slots=True)
class ReaderSettings:
    """How the attended-chunk reader fetches.

    Attributes:
        concurrency: most store requests in flight at once, over all scenes of a call.
        cache_bytes: bound of the metadata and shard-index LRU cache, in bytes.
        max_gap: merge the byte ranges of two chunks of a shard into one request when at most
            this many bytes lie between them (fewer requests for a few more bytes: worth it
            when requests cost latency); 0 merges only chunks stored back to back. Object
            stores only: a local or memory store always reads exact chunk ranges (a ``pread``
            costs no round trip).
        process: run the reader in a child process (``pipeline.read.process``), so that its
            CPU does not share the training loop's GIL.
        prefetch_indexes: on the first read of a scene's level, fetch every shard index of
            that level at once (a few hundred bytes per shard), so that later reads cost one
            round trip instead of two when attention moves to a shard not read before.
        prefetch_max_shards: ... only for levels of at most this many shards (64: 64 KiB of
            indexes at 128 px shards, a level of up to 1,024 px a side, so the first read of a
            scene costs at most that much more). A 32,768 px scene's level 1 has 16,384 shards:
            prefetching them would cost 16 MiB and 16,384 requests on its first read and crowd
            ``cache_bytes``; such levels fetch each index when a read first needs it, so a
            sample's bytes stay flat in the scene's size (``bench/scale.py``).
        request_timeout_s: seconds an S3 range read may take before it is cancelled and sent
            again (a range of a few KB answers in milliseconds; a stalled connection would
            otherwise hold a training step for the HTTP client's 30 s or more).
        max_retries: times an S3 read that timed out or failed (5xx, reset) is sent again
            before the scene's read fails (and the training loop quarantines the scene).
        retry_initial_delay_s, retry_max_delay_s: backoff before retry k:
            ``min(retry_max_delay_s, retry_initial_delay_s * 2**k)``. A failed request is
            sent again only once its whole batch has answered, so the first backoff adds to
            every batch that meets a 5xx: 5 ms (not 50) kept 5 % of failing requests within
            the throughput target (``bench/faults.py --only s3_errors``); six retries still
            wait 0.3 s in all for a throttling store to recover.
        hedge_after_s: the most seconds a batch of S3 range reads may go without any answer
            before each read still unanswered is sent once more (a hedged request: the first
            of the two answers is used, the other left to finish), so a rare stalled
            connection costs at most about this instead of ``request_timeout_s``. A batch's
            stragglers (its last few requests) are hedged sooner, after a few of the store's
            round trips without an answer (``pipeline.store.ranges.tail_wait``: tens of ms on
            a nearby store). 0 disables hedging; must be below ``request_timeout_s``.
    """

    concurrency: int = 64
    cache_bytes: int = 64 * 2**20
    max_gap: int = 16384
    process: bool = True
    prefetch_indexes: bool = True
    prefetch_max_shards: int = 64
    request_timeout_s: float = 2.0
    max_retries: int = 6
    retry_initial_delay_s: float = 0.005
    retry_max_delay_s: float = 1.0
    hedge_after_s: float = 0.2

    def retry_policy(self) -> RetryPolicy:
        """The S3 range reads' ``pipeline.store.ranges.RetryPolicy`` of these settings."""
        return RetryPolicy(self.request_timeout_s, self.max_retries, self.retry_initial_delay_s,
                           self.retry_max_delay_s, self.hedge_after_s)


EXACT_READS = ReaderSettings(concurrency=32, max_gap=0, process=False, prefetch_indexes=False)
"""A bare ``ZarrPixelSource()``: only planned chunk bytes, no prefetch, in this process."""
