"""Reading ahead: the next step's first reads, drawn during this step and read while it computes.

A step's first reads are the ones its own compute cannot hide: every micro-batch's locations
depend on the weights after the previous optimiser step. Reading ahead draws the next step's
micro-batches *before* that update and reads them during the current step. All of them, not
only the first: over S3 a micro-batch's read (one round trip of ~20 ms plus the store's time)
outlasts the compute of the micro-batch before it, so later micro-batches waited too
(``bench/train_throughput.py``: S3's data wait 6-9 % with the first only, 3-4 % with all).
The whole handshake lives in this module; ``loop.StepRunner`` and
``microbatch.run_microbatches`` only call in:

1. Step t, once all of its micro-batches have submitted their first reads (``after_start`` of
   ``run_microbatches``): ``draw_ahead`` draws each of step t+1's micro-batches with step t's
   weights (``AttentionModel.propose``) and submits its read. ``StepRunner`` keeps the result
   as a ``ReadAhead``: the batch it was drawn for and that batch's micro-batches, each
   carrying its ``Proposal`` and the submitted future (``MicroBatch.proposal``,
   ``MicroBatch.prefetched``).
2. Step t+1 takes them with ``ReadAhead.micro_batches_for(batch)`` (None: not this batch, split
   it again).
3. ``start_steps`` passes the proposal to the model (``steps(..., proposal=p)``); the model's
   first read must be ``p.request``. ``prefetched_read`` checks exactly that and hands the
   scheduler the future of step 1 instead of submitting a new read.

The model weights the proposal's draws from the attention they were drawn from to the one they
are used for, so the estimator, and hence the gradient, stays unbiased: the argument is written
once, in ``models.sampling.importance_ratio``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from models.protocol import AttentionModel, ReadRequest, Steps

if TYPE_CHECKING:  # microbatch imports this module: no cycle at run time
    from pipeline.train.microbatch import MicroBatch, Submit


@dataclass(frozen=True, slots=True)
class ReadAhead:
    """The next step's micro-batches, split and read ahead during this step.

    Attributes:
        batch: the batch they were split from: the very object the loop hands to the next
            step (``loop.with_next`` yields it as this step's ``next_batch`` and then as the
            next step's ``batch``).
        micro: its micro-batches; each carries ``proposal`` and ``prefetched`` when the
            model could propose, otherwise none does (the split and its generators are reused
            all the same, so the sampling stream is the one without reading ahead).
    """

    batch: Mapping[str, Any]
    micro: list[MicroBatch]

    def micro_batches_for(self, batch: Mapping[str, Any]) -> list[MicroBatch] | None:
        """``micro`` if it was drawn for ``batch``, else None (the read ahead is dropped).

        Matched by the batch object, not its contents: the loop passes the same object both
        times, and comparing (B, C, h, w) views would cost a pass over them and could accept an
        equal batch that the caller did not announce."""
        return self.micro if batch is self.batch else None


def draw_ahead(
    model: AttentionModel,
    micro: list[MicroBatch],
    submit: Submit,
    autocast: Callable[[], AbstractContextManager],
) -> list[MicroBatch]:
    """``micro`` with every micro-batch's first locations drawn now and their reads submitted.

    The draws use the current weights and consume each micro-batch's generator as ``steps``
    would have. A model whose ``propose`` returns None gets ``micro`` unchanged (it reads the
    usual way next step)."""
    ahead = []
    for mb in micro:
        with autocast():
            proposal = model.propose(mb.views, mb.sizes, mb.generator)
        if proposal is None:
            return micro
        ahead.append(replace(mb, proposal=proposal, prefetched=submit(mb.keys, proposal.request)))
    return ahead


def start_steps(model: AttentionModel, mb: MicroBatch) -> Steps:
    """``mb``'s model coroutine, given the proposal drawn ahead for it if there is one."""
    if mb.proposal is None:
        return model.steps(mb.views, mb.sizes, mb.generator)
    return model.steps(mb.views, mb.sizes, mb.generator, proposal=mb.proposal)


def prefetched_read(mb: MicroBatch, request: ReadRequest) -> Future | None:
    """The future read ahead for ``mb``'s first read ``request``; None if ``mb`` was not read ahead.

    Raises:
        RuntimeError: ``mb`` was read ahead but its model's first read is not the proposal's
            own ``ReadRequest`` (it was not given the proposal): the prefetched patches belong
            to other boxes and would be silently wrong.
    """
    if mb.prefetched is None:
        return None
    if mb.proposal is None or request is not mb.proposal.request:
        raise RuntimeError(
            f"micro-batch {mb.index} was read ahead, but its model did not yield the "
            "proposal's request: pass the proposal to the model's steps()"
        )
    return mb.prefetched
