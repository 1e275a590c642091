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

Reading ahead. The first read of a step is the one no compute hides: every micro-batch's
locations depend on the weights after the previous step. With ``after_start`` the caller
draws the *next* step's first micro-batch now (``AttentionModel.propose``, with the current
weights) and submits its read; next step that micro-batch carries the ``Proposal`` and the
``prefetched`` future, and its coroutine (``steps(..., proposal=...)``) uses those draws with
importance weights from the proposal to the updated attention. The estimator is unbiased for
any proposal that covers the attention (``models.sampling``, tested by exact enumeration), so
the optimiser step still follows an unbiased gradient, and autograd never sees stale weights:
the proposal carries no graph.

Nothing here knows about Ray or stores: ``submit`` is any function returning a
``concurrent.futures.Future`` of the (B, K, C, h, w) patches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from models.protocol import ModelOutput, Proposal, ReadRequest, Steps

Submit = Callable[[Sequence[str], ReadRequest], "Future[Tensor]"]


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """A slice of a step's batch.

    Attributes:
        index: position in the step (0-based). keys: scene keys (pyramid URIs), length B.
        views: (B, C, h, w) float32 views. sizes: (B, 2) int64 level-0 sizes.
        labels: (B,) int64 class indices. generator: this micro-batch's sampling generator.
        proposal: its first read, drawn ahead (``AttentionModel.propose``), or None.
        prefetched: the future of that read's patches (submitted with the proposal).
    """

    index: int
    keys: tuple[str, ...]
    views: Tensor
    sizes: Tensor
    labels: Tensor
    generator: torch.Generator | None = None
    proposal: Proposal | None = None
    prefetched: Future | None = None


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
            before any compute on patches (the place to read the next step's first
            micro-batch ahead). A micro-batch with ``prefetched`` does not submit its first
            read: its coroutine must yield ``mb.proposal.request``, whose patches it gets.
    Returns the time spent blocked on storage and the number of reads submitted.
    """
    pending: dict[Future, tuple[MicroBatch, Steps]] = {}
    reads = 0
    wait_s = 0.0

    def advance(mb: MicroBatch, steps: Steps, patches: Tensor | None) -> None:
        nonlocal reads
        try:
            with context():
                request = next(steps) if patches is None else steps.send(prepare(patches))
        except StopIteration as stop:
            finish(mb, stop.value)
            return
        if patches is None and mb.prefetched is not None:
            if mb.proposal is None or request is not mb.proposal.request:
                steps.close()
                raise RuntimeError(
                    f"micro-batch {mb.index} was read ahead, but its model did not yield the "
                    "proposal's request: pass the proposal to the model's steps()"
                )
            pending[mb.prefetched] = (mb, steps)
            return
        pending[submit(mb.keys, request)] = (mb, steps)
        reads += 1

    for mb in micro:  # start all first: attention with the current weights, reads in flight
        advance(mb, start(mb), None)
    if after_start is not None:
        after_start()
    while pending:
        ready = [f for f in pending if f.done()]
        if not ready:
            t0 = time.perf_counter()
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            wait_s += time.perf_counter() - t0
            ready = list(done)
        ready.sort(key=lambda f: pending[f][0].index)
        for future in ready:
            mb, steps = pending.pop(future)
            try:
                patches = future.result()
            except Exception as err:
                steps.close()
                raise RuntimeError(
                    f"reading patches for micro-batch {mb.index} (scenes {list(mb.keys)}) failed: {err}"
                ) from err
            advance(mb, steps, patches)
    return ScheduleStats(wait_s=wait_s, reads=reads)


def submitter(source: object) -> Submit:
    """``source.submit`` when the source reads asynchronously, else a synchronous stand-in.

    The stand-in (for ``TensorPyramidSource`` and other in-memory sources) reads at once and
    returns an already-completed future, so the scheduler never waits on it.
    """
    submit = getattr(source, "submit", None)
    if callable(submit):
        return submit

    def read_now(keys: Sequence[str], request: ReadRequest) -> Future[Tensor]:
        future: Future[Tensor] = Future()
        try:
            future.set_result(source.read(keys, request))  # type: ignore[attr-defined]
        except Exception as err:  # surfaced by run_microbatches with the scenes named
            future.set_exception(err)
        return future

    return read_now
