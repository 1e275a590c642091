"""Drive many model coroutines at once so that reads overlap with compute.

One optimiser step = one batch split into micro-batches. ``run_microbatches`` first *starts*
every micro-batch's coroutine (attention and sampling with the current weights) and submits its
reads; then, whenever some micro-batch's patches have arrived, it resumes that coroutine. A
resumption either yields the next ``ReadRequest`` (multi-round models such as Zoom-In: the next
round is submitted at once) or returns the ``ModelOutput``, which goes to ``finish`` (loss and
backward in training). The optimiser step happens after this function returns, so every location
was drawn and used with the same weights: the estimator stays unbiased, and autograd never sees
a graph whose weights changed in place.

Sampling randomness comes from one generator per micro-batch (made by the caller, in order),
so results do not depend on the order in which storage answers.

Reading ahead. With ``after_start`` the caller can draw the next step's micro-batches while
this step's reads are in flight; they then arrive here each with a ``Proposal`` and the
``prefetched`` future of its read, which stands in for its first submission. The
handshake is in ``pipeline.train.read_ahead``; why it stays unbiased, in
``models.sampling.importance_ratio``.

Nothing here knows about Ray or stores: ``submit`` is any function returning a
``concurrent.futures.Future`` of the (B, K, C, h, w) patches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.protocol import ModelOutput, Proposal, ReadRequest, Steps, SubmittingSource
from pipeline.train.read_ahead import prefetched_read

Submit = Callable[[Sequence[str], ReadRequest], "Future[Tensor]"]


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """A slice of a step's batch.

    Attributes:
        index: position in the step (0-based). keys: scene keys (pyramid URIs), length B.
        views: (B, C, h, w) float32 views. sizes: (B, 2) int64 level-0 sizes.
        labels: (B,) int64 class indices. generator: this micro-batch's sampling generator.
        proposal: its first read, drawn ahead (``AttentionModel.propose``), or None.
        prefetched: the future of that read's (B, K, C, h, w) patches, submitted with the
            proposal (``pipeline.train.read_ahead``), or None.
    """

    index: int
    keys: tuple[str, ...]
    views: Tensor
    sizes: Tensor
    labels: Tensor
    generator: torch.Generator | None = None
    proposal: Proposal | None = None
    prefetched: Future | None = None


class MicroBatchReadError(RuntimeError):
    """A micro-batch's read failed: ``keys`` its scenes, ``request`` the read (row i of its
    boxes is scene i's), ``cause`` the reader's error (also ``__cause__``)."""

    def __init__(self, message: str, keys: tuple[str, ...], request: ReadRequest | None,
                 cause: BaseException):
        super().__init__(message)
        self.keys, self.request, self.cause = keys, request, cause


@dataclass(frozen=True, slots=True)
class ScheduleStats:
    """``wait_s``: seconds blocked on storage with no coroutine ready; ``reads``: requests submitted."""

    wait_s: float
    reads: int


def split_batch(
    keys: Sequence[str],
    views: Tensor,
    sizes: Tensor,
    labels: Tensor,
    parts: int,
    generators: Sequence[torch.Generator | None] | None = None,
    ramp: bool = False,
) -> list[MicroBatch]:
    """Split a batch of B scenes into ``min(parts, B)`` contiguous micro-batches.

    Sizes are near-equal, or with ``ramp`` near-proportional to 1, 2, ..., parts (6 scenes in
    3 parts: 1, 2, 3): the first read, which nothing can hide, is the smallest and comes back
    first, and each later, larger read has the compute of the earlier micro-batches to hide
    behind. A ramp that would leave a micro-batch empty falls back to the even split.
    """
    n = len(keys)
    parts = max(1, min(parts, n))
    weights = [i + 1 for i in range(parts)] if ramp else [1] * parts
    cum = [sum(weights[:i]) for i in range(parts + 1)]
    bounds = [round(c * n / cum[-1]) for c in cum]
    if len(set(bounds)) <= parts:  # a ramp rounded an early micro-batch to nothing: split evenly
        bounds = [round(i * n / parts) for i in range(parts + 1)]
    out = []
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        gen = generators[i] if generators is not None else None
        out.append(
            MicroBatch(i, tuple(keys[lo:hi]), views[lo:hi], sizes[lo:hi], labels[lo:hi], gen)
        )
    return out


def run_microbatches(
    micro: Sequence[MicroBatch],
    start: Callable[[MicroBatch], Steps],
    submit: Submit,
    finish: Callable[[MicroBatch, ModelOutput], None],
    prepare: Callable[[Tensor], Tensor] = lambda patches: patches,
    context: Callable[[], AbstractContextManager] = nullcontext,
    after_start: Callable[[], None] | None = None,
) -> ScheduleStats:
    """Run every micro-batch's coroutine to its end, resuming whichever has its patches first.

    Args:
        micro: the step's micro-batches.
        start: builds a micro-batch's coroutine (``model.steps(views, sizes, generator)``).
        submit: ``submit(keys, request) -> Future`` of (B, K, C, h, w) patches.
        finish: called once per micro-batch with its ``ModelOutput`` (e.g. loss + backward),
            in the order the micro-batches complete.
        prepare: applied to arrived patches before they go into the model (device transfer).
        context: entered around every coroutine resumption (e.g. autocast).
        after_start: called once every micro-batch has started and submitted its first read,
            before any compute on patches (the place to read the next step's micro-batches
            ahead). A micro-batch with ``prefetched`` does not submit its first
            read: its coroutine must yield ``mb.proposal.request``, whose patches it gets
            (``pipeline.train.read_ahead.prefetched_read``).
    Returns the time spent blocked on storage and the number of reads submitted.
    """
    schedule = _Schedule(submit, finish, prepare, context)
    for mb in micro:  # start all first: attention with the current weights, reads in flight
        schedule.advance(mb, start(mb), None)
    if after_start is not None:
        after_start()
    while schedule.pending:
        for future in schedule.ready():
            schedule.resume(future)
    return ScheduleStats(wait_s=schedule.wait_s, reads=schedule.reads)


@dataclass
class _Schedule:
    """The reads in flight of one ``run_microbatches`` call and what they cost.

    ``pending`` maps each read's future to the micro-batch and coroutine waiting for it;
    ``reads`` counts the reads submitted (not those read ahead), ``wait_s`` the seconds blocked
    with no patches ready.
    """

    submit: Submit
    finish: Callable[[MicroBatch, ModelOutput], None]
    prepare: Callable[[Tensor], Tensor]
    context: Callable[[], AbstractContextManager]
    pending: dict[Future, tuple[MicroBatch, Steps]] = field(default_factory=dict)
    requests: dict[Future, ReadRequest] = field(default_factory=dict)
    reads: int = 0
    wait_s: float = 0.0

    def advance(self, mb: MicroBatch, steps: Steps, patches: Tensor | None) -> None:
        """Resume ``steps`` (start it when ``patches`` is None) up to its next read or its end.

        A next read is submitted, or for the first read of a micro-batch read ahead, taken
        from ``mb.prefetched``; the end goes to ``finish``."""
        try:
            with self.context():
                request = next(steps) if patches is None else steps.send(self.prepare(patches))
        except StopIteration as stop:
            self.finish(mb, stop.value)
            return
        future = self._first_read_ahead(mb, steps, request) if patches is None else None
        if future is None:
            future = self.submit(mb.keys, request)
            self.reads += 1
        self.pending[future] = (mb, steps)
        self.requests[future] = request

    @staticmethod
    def _first_read_ahead(mb: MicroBatch, steps: Steps, request: ReadRequest) -> Future | None:
        try:
            return prefetched_read(mb, request)
        except RuntimeError:
            steps.close()
            raise

    def ready(self) -> list[Future]:
        """The futures whose patches have arrived (waiting for one if none has), in
        micro-batch order, so that the order of storage's answers does not reorder compute."""
        ready = [f for f in self.pending if f.done()]
        if not ready:
            t0 = time.perf_counter()
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            self.wait_s += time.perf_counter() - t0
            ready = list(done)
        ready.sort(key=lambda f: self.pending[f][0].index)
        return ready

    def resume(self, future: Future) -> None:
        """Feed ``future``'s patches to the coroutine waiting for them; a failed read is
        raised as ``MicroBatchReadError`` with the micro-batch, its scenes and the read."""
        mb, steps = self.pending.pop(future)
        request = self.requests.pop(future, None)
        try:
            patches = future.result()
        except Exception as err:
            steps.close()
            raise MicroBatchReadError(
                f"reading patches for micro-batch {mb.index} (scenes {list(mb.keys)}) failed: {err}",
                mb.keys, request, err) from err
        self.advance(mb, steps, patches)


def submitter(source: object) -> Submit:
    """``source.submit`` when the source reads asynchronously, else a synchronous stand-in.

    The stand-in (for ``TensorPyramidSource`` and other in-memory sources) reads at once and
    returns an already-completed future, so the scheduler never waits on it.
    """
    if isinstance(source, SubmittingSource):
        return source.submit

    def read_now(keys: Sequence[str], request: ReadRequest) -> Future[Tensor]:
        future: Future[Tensor] = Future()
        try:
            future.set_result(source.read(keys, request))  # type: ignore[attr-defined]
        except Exception as err:  # surfaced by run_microbatches with the scenes named
            future.set_exception(err)
        return future

    return read_now
