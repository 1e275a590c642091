"""The per-worker training loop: micro-batched steps over a ``PixelSource``, epochs, metrics.

``StepRunner`` owns what lives for the whole run inside one worker: the model, optimiser,
scheduler, the pixel source (the reader with its caches) and the sampling generator.
``train_epoch`` and ``evaluate`` take any iterable of batches, so they run the same under Ray
Train (``pipeline.train.worker``), in the throughput benchmark, and in unit tests without Ray.
Nothing here imports Ray.

A batch is a dict: ``key`` (B,) scene keys, ``view`` (B, C, h, w) float32, ``size`` (B, 2)
int64 level-0 (height, width), ``label`` (B,) int64 (numpy arrays or tensors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.protocol import AttentionModel, CountingSource, ModelOutput, PixelSource
from pipeline.train.grad_sync import GradSync
from pipeline.train.microbatch import (
    MicroBatch,
    MicroBatchReadError,
    ScheduleStats,
    run_microbatches,
    split_batch,
    submitter,
)
from pipeline.train.quarantine import Quarantine, find_bad
from pipeline.train.read_ahead import ReadAhead, draw_ahead, start_steps

Batch = Mapping[str, Any]
# the reader's counters that EpochStats sums (same names in both)
COUNTED = ("requests", "bytes", "retries", "timeouts", "errors", "hedges")


def reader_counters(source: object) -> tuple[int, ...]:
    """(requests, bytes, retries, timeouts, errors, hedges) of ``source`` so far; zeros for sources
    that do not count (see ``pipeline.store.counting.ReadCounters``).

    Accepts ``counters()`` returning a mapping or an object with those names (missing: 0).
    """
    if not isinstance(source, CountingSource):
        return 0, 0, 0, 0, 0, 0
    c = source.counters()
    get = c.get if isinstance(c, Mapping) else lambda k, d=0: getattr(c, k, d)
    return tuple(int(get(name, 0)) for name in COUNTED)


@dataclass
class EpochStats:
    """Sums over one epoch of one worker (``as_vector`` lets workers add theirs in one
    all-reduce).

    ``loss_sum``: per-sample loss summed over samples; ``correct``, ``samples``: counts.
    ``seconds`` is wall time of the steps, ``wait_s`` the part blocked on storage.
    ``requests``, ``bytes``: what the reader fetched (``reader_counters``); ``steps``: batches.
    ``retries``, ``timeouts``, ``errors``, ``hedges``: S3 requests the reader sent again, that
    timed out, that failed, that it hedged (``pipeline.store.counting.ReadCounters``).
    ``log_ratio_sum`` / ``ratio_draws``: sum of |log(a/q)| over the draws read ahead (a: the
    attention they were used for, q: the one they were drawn from) and their number.
    ``batch_wait_s``: wall time blocked on the batch iterator (under Ray Train, Ray Data's
    ``iter_batches``: fetching blocks, the local shuffle, formatting), outside the steps;
    ``pass_s``: wall time of the whole pass over the batches (steps, iterator and the loop's
    own bookkeeping). So ``pass_s - seconds - batch_wait_s`` is the loop's own time, and
    ``seconds - wait_s`` the model's compute (with gradient averaging).
    ``confusion`` is (num_classes, num_classes) counts, row = true label.
    """

    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0
    requests: int = 0
    bytes: int = 0
    steps: int = 0
    log_ratio_sum: float = 0.0
    ratio_draws: int = 0
    retries: int = 0
    timeouts: int = 0
    errors: int = 0
    hedges: int = 0
    batch_wait_s: float = 0.0
    pass_s: float = 0.0
    confusion: np.ndarray | None = None

    def as_vector(self) -> Tensor:
        """(16,) float64 of every sum but ``confusion``, in field order (for all-reduce)."""
        return torch.tensor([float(getattr(self, name)) for name in _summed()], dtype=torch.float64)

    def add(self, other: EpochStats) -> None:
        """Add ``other``'s sums (and confusion counts) into this one."""
        total = EpochStats.from_vector(self.as_vector() + other.as_vector(), self.confusion)
        for item in fields(self):
            setattr(self, item.name, getattr(total, item.name))
        if self.confusion is not None and other.confusion is not None:
            self.confusion += other.confusion

    @classmethod
    def from_vector(cls, v: Tensor, confusion: np.ndarray | None = None) -> EpochStats:
        """Inverse of ``as_vector`` (counts back to int), with ``confusion`` attached."""
        counts = {f.name for f in fields(cls) if f.type in (int, "int")}
        values = {name: int(x) if name in counts else x
                  for name, x in zip(_summed(), v.tolist(), strict=True)}
        return cls(**values, confusion=confusion)

    def metrics(self, prefix: str, world_size: int = 1) -> dict[str, float]:
        """Per-epoch metrics: loss and accuracy per sample, bytes and requests per sample, the
        S3 requests retried, timed out, failed and hedged (totals),
        data-wait fraction of step time, samples per second (all workers together); the
        steps and seconds of one worker's pass (means over the ``world_size`` workers):
        ``pass_s`` in all, ``batch_wait_s`` waiting for the batch iterator, ``step_s`` in
        steps, of which ``storage_wait_s`` waiting for the reader; with draws read ahead, their mean
        |log(a/q)| (0: the weights did not move the attention)."""
        n = max(self.samples, 1)
        per_worker_seconds = self.seconds / max(world_size, 1)
        ahead = {}
        if self.ratio_draws:
            ahead[f"{prefix}/read_ahead_abs_log_ratio"] = self.log_ratio_sum / self.ratio_draws
        return {
            **ahead,
            f"{prefix}/loss": self.loss_sum / n,
            f"{prefix}/accuracy": self.correct / n,
            f"{prefix}/samples": float(self.samples),
            f"{prefix}/bytes_per_sample": self.bytes / n,
            f"{prefix}/requests_per_sample": self.requests / n,
            f"{prefix}/data_wait_fraction": self.wait_s / self.seconds if self.seconds else 0.0,
            f"{prefix}/samples_per_s": self.samples / per_worker_seconds if per_worker_seconds else 0.0,
            f"{prefix}/read_retries": float(self.retries),
            f"{prefix}/read_timeouts": float(self.timeouts),
            f"{prefix}/read_errors": float(self.errors),
            f"{prefix}/read_hedges": float(self.hedges),
            f"{prefix}/steps": self.steps / max(world_size, 1),
            f"{prefix}/pass_s": self.pass_s / max(world_size, 1),
            f"{prefix}/batch_wait_s": self.batch_wait_s / max(world_size, 1),
            f"{prefix}/step_s": per_worker_seconds,
            f"{prefix}/storage_wait_s": self.wait_s / max(world_size, 1),
        }


def _summed() -> tuple[str, ...]:
    """The names of ``EpochStats``' sums, in field order (everything but ``confusion``)."""
    return tuple(f.name for f in fields(EpochStats) if f.name != "confusion")


def to_tensors(batch: Batch) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """(keys, views (B, C, h, w) float32, sizes (B, 2) int64, labels (B,) int64) of a batch."""
    keys = [str(k) for k in batch["key"]]
    views = torch.tensor(np.asarray(batch["view"]), dtype=torch.float32)
    sizes = torch.tensor(np.asarray(batch["size"]), dtype=torch.int64).reshape(-1, 2)
    labels = torch.tensor(np.asarray(batch["label"]), dtype=torch.int64).reshape(-1)
    return keys, views, sizes, labels


@dataclass
class StepRunner:
    """One worker's model, optimiser and reader, and how a step runs.

    Attributes:
        model: the bare ``AttentionModel`` (not DDP-wrapped; ``sync`` averages gradients).
        optimizer, scheduler: stepped once per batch (scheduler may be None).
        source: the ``PixelSource``; a ``SubmittingSource`` reads asynchronously, a
            ``CountingSource`` fills the requests and bytes of ``EpochStats``.
        micro_batches: micro-batches per step; ramp: their sizes grow 1 : 2 : 3 ...
            (``split_batch``). clip_norm: gradient-norm clip (0: off).
        generator: sampling generator; each micro-batch gets a child seeded from it, in order.
        read_ahead: during each step, draw the next step's micro-batches with the current
            weights and submit their reads (``pipeline.train.read_ahead``); needs the next batch
            (``train_step(..., next_batch=...)``, as ``train_epoch`` and ``evaluate`` pass it).
        device: where the model lives. autocast: context for model compute (bf16 on GPU).
        sync: gradient/buffer averaging across workers (a no-op in one process).
        quarantine: where scenes whose reads fail are recorded and then skipped
            (``pipeline.train.quarantine``); None: a failed read ends the step with its error.
    """

    model: AttentionModel
    optimizer: torch.optim.Optimizer
    source: PixelSource
    scheduler: Any = None
    micro_batches: int = 2
    ramp: bool = False
    clip_norm: float = 0.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], AbstractContextManager] = nullcontext
    sync: GradSync | None = None
    read_ahead: bool = False
    quarantine: Quarantine | None = None

    def __post_init__(self) -> None:
        self.submit = submitter(self.source)
        if self.sync is None:
            self.sync = GradSync(self.model)
        self._ahead: ReadAhead | None = None  # the next step's, between two steps
        self._epoch = 0  # of the last training step (what evaluation records quarantine under)

    def _micro(self, batch: Batch, generator: torch.Generator) -> list[MicroBatch]:
        """The batch's micro-batches: the ones read ahead for it, else split now."""
        ahead, self._ahead = self._ahead, None  # used or dropped: never kept for a later step
        drawn = None if ahead is None else ahead.micro_batches_for(batch)
        return drawn if drawn is not None else self._split(batch, generator)

    def _split(self, batch: Batch, generator: torch.Generator) -> list[MicroBatch]:
        """The batch as ``micro_batches`` micro-batches on ``device``, each with a sampling
        generator seeded from ``generator`` (one 62-bit seed per micro-batch, in order)."""
        keys, views, sizes, labels = to_tensors(batch)
        if not keys:  # every scene of the batch is quarantined: a step with no samples
            return []
        parts = max(1, min(self.micro_batches, len(keys)))
        seeds = torch.randint(0, 2**62, (parts,), generator=generator).tolist()
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        return split_batch(keys, views.to(self.device), sizes.to(self.device),
                           labels.to(self.device), parts, gens, ramp=self.ramp)

    def _read_ahead(self, batch: Batch | None, generator: torch.Generator) -> Callable[[], None]:
        """What ``run_microbatches`` calls once this step's reads are submitted: split
        ``batch`` (the next step's) now and submit its micro-batches' reads, drawn by
        ``model.propose`` with the current weights (``read_ahead.draw_ahead``). A no-op
        without ``read_ahead`` or a next batch; a model that cannot propose keeps only the
        split (the same generator draws as splitting next step)."""

        def launch() -> None:
            if not self.read_ahead or batch is None:
                return
            micro = self._split(batch, generator)
            self._ahead = ReadAhead(batch, draw_ahead(self.model, micro, self.submit, self.autocast))

        return launch

    def _run(
        self,
        micro: list[MicroBatch],
        finish: Callable[[MicroBatch, ModelOutput], None],
        after_start: Callable[[], None] | None = None,
    ) -> ScheduleStats:
        """Run ``micro`` through ``run_microbatches``: patches moved to ``device`` as they
        arrive, model compute under ``autocast``."""
        return run_microbatches(
            micro,
            lambda mb: start_steps(self.model, mb),
            self.submit,
            finish,
            prepare=lambda patches: patches.to(self.device, non_blocking=True),
            context=self.autocast,
            after_start=after_start,
        )

    def train_step(
        self, batch: Batch, epoch: int, stats: EpochStats, next_batch: Batch | None = None
    ) -> None:
        """Forward/backward every micro-batch as its patches arrive; then one optimiser step.

        With ``read_ahead`` and ``next_batch``, the next step's first reads are drawn (with the
        weights before this step's update) and submitted once this step's reads are. With a
        ``quarantine``, a scene whose read fails is quarantined and the step runs again
        without it (``_guarded``)."""
        self._epoch = epoch
        self._guarded(lambda b, part: self._train_once(b, epoch, part, next_batch),
                      batch, epoch, stats)

    def _guarded(self, run_once: Callable[[Batch, EpochStats], None], batch: Batch, epoch: int,
                 stats: EpochStats) -> None:
        """``run_once(batch, part)``, its sums added to ``stats`` once it succeeds. Without a
        quarantine, as is. With one: quarantined rows are dropped first; when a read fails,
        its scenes are read one by one (``find_bad``), the failing ones quarantined, the
        gradients cleared and the step run again without them; a failure that no single
        scene repeats is retried once, then raised."""
        if self.quarantine is None:
            run_once(batch, stats)
            return
        transient = 0
        while True:
            batch = self.quarantine.admit(batch, epoch, stats.steps)
            part = EpochStats(confusion=None if stats.confusion is None
                              else np.zeros_like(stats.confusion))
            try:
                run_once(batch, part)
            except MicroBatchReadError as err:
                self.optimizer.zero_grad(set_to_none=True)
                self._ahead = None
                bad = {} if err.request is None else find_bad(self.source, err.keys, err.request)
                for key, cause in bad.items():
                    self.quarantine.add_error(key, cause, epoch, stats.steps)
                transient += not bad
                if transient > 1:
                    raise
                continue
            stats.add(part)
            return

    def _train_once(self, batch: Batch, epoch: int, stats: EpochStats,
                    next_batch: Batch | None) -> None:
        """One try of ``train_step`` (see there)."""
        t0 = time.perf_counter()
        counted = reader_counters(self.source)
        self.model.train()
        micro = self._micro(batch, self.generator)
        total = sum(len(mb.keys) for mb in micro)
        finished: list[tuple[MicroBatch, ModelOutput]] = []

        def finish(mb: MicroBatch, out: ModelOutput) -> None:
            loss = self.model.loss(out, mb.labels, epoch)
            (loss * (len(mb.keys) / total)).backward()
            stats.loss_sum += float(loss.detach()) * len(mb.keys)
            stats.correct += int((out.logits.detach().argmax(-1) == mb.labels).sum())
            ratio = out.extras.get("importance_ratio")
            if ratio is not None:
                stats.log_ratio_sum += float(ratio.double().clamp_min(1e-300).log().abs().sum())
                stats.ratio_draws += ratio.numel()
            finished.append((mb, out))

        schedule = self._run(micro, finish, self._read_ahead(next_batch, self.generator))
        self._update(finished)
        self._account(stats, total, schedule, counted, t0)

    def _update(self, finished: list[tuple[MicroBatch, ModelOutput]]) -> None:
        """The optimiser step after every micro-batch's backward: averaged (and clipped)
        gradients, lr schedule, then the models' ``end_step`` hooks and buffer averaging."""
        self.sync.average_gradients()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            for mb, out in finished:
                self.model.end_step(out, mb.labels)
        self.sync.average_buffers()

    def _account(
        self,
        stats: EpochStats,
        samples: int,
        schedule: ScheduleStats,
        counted: tuple[int, ...],
        t0: float,
    ) -> None:
        """Add one step to ``stats``: ``samples`` scenes, the storage wait, the requests,
        bytes and faults read since ``counted`` (``reader_counters`` at the start), seconds
        since ``t0``."""
        now = reader_counters(self.source)
        stats.samples += samples
        stats.steps += 1
        stats.wait_s += schedule.wait_s
        for name, after, before in zip(COUNTED, now, counted, strict=True):
            setattr(stats, name, getattr(stats, name) + after - before)
        stats.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def eval_step(
        self,
        batch: Batch,
        generator: torch.Generator,
        stats: EpochStats,
        keep: Callable[[MicroBatch, ModelOutput], None] | None = None,
        next_batch: Batch | None = None,
    ) -> None:
        """Predict a batch (model in eval mode); ``keep`` sees each micro-batch's output.
        ``next_batch``: as in ``train_step`` (the weights do not change between them here);
        quarantine as in ``train_step``."""
        self._guarded(lambda b, part: self._eval_once(b, generator, part, keep, next_batch),
                      batch, self._epoch, stats)

    def _eval_once(self, batch: Batch, generator: torch.Generator, stats: EpochStats,
                   keep: Callable[[MicroBatch, ModelOutput], None] | None,
                   next_batch: Batch | None) -> None:
        """One try of ``eval_step`` (see there)."""
        t0 = time.perf_counter()
        counted = reader_counters(self.source)
        self.model.eval()
        micro = self._micro(batch, generator)

        def finish(mb: MicroBatch, out: ModelOutput) -> None:
            loss = self.model.loss(out, mb.labels, 0)
            pred = out.logits.float().argmax(-1)
            stats.loss_sum += float(loss) * len(mb.keys)
            stats.correct += int((pred == mb.labels).sum())
            if stats.confusion is not None:
                np.add.at(stats.confusion, (mb.labels.cpu().numpy(), pred.cpu().numpy()), 1)
            if keep is not None:
                keep(mb, out)

        schedule = self._run(micro, finish, self._read_ahead(next_batch, generator))
        self._account(stats, sum(len(mb.keys) for mb in micro), schedule, counted, t0)


def train_epoch(
    runner: StepRunner,
    batches: Iterable[Batch],
    epoch: int,
    after_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``; ``after_step(step_in_epoch)`` runs after every step.

    ``model.begin_epoch(epoch)`` runs first (alternating schedules such as RA-CNN's)."""
    start = time.perf_counter()
    runner.model.begin_epoch(epoch)
    stats = EpochStats()
    for i, (batch, next_batch) in enumerate(with_next(timed(batches, stats))):
        runner.train_step(batch, epoch, stats, next_batch)
        if after_step is not None:
            after_step(i)
    stats.pass_s = time.perf_counter() - start
    return stats


def evaluate(
    runner: StepRunner,
    batches: Iterable[Batch],
    seed: int,
    num_classes: int,
    keep: Callable[[MicroBatch, ModelOutput], None] | None = None,
) -> EpochStats:
    """Loss, accuracy and confusion matrix over ``batches``; sampling seeded by ``seed``."""
    start = time.perf_counter()
    stats = EpochStats(confusion=np.zeros((num_classes, num_classes), dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    for batch, next_batch in with_next(timed(batches, stats)):
        runner.eval_step(batch, generator, stats, keep, next_batch)
    stats.pass_s = time.perf_counter() - start
    return stats


def timed(items: Iterable[Batch], stats: EpochStats) -> Iterator[Batch]:
    """``items`` as they come, the time spent waiting for each (and for the iterator's end:
    Ray Data finishes its streaming there) added to ``stats.batch_wait_s``."""
    start = time.perf_counter()
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            stats.batch_wait_s += time.perf_counter() - start
            return
        stats.batch_wait_s += time.perf_counter() - start
        yield item
        start = time.perf_counter()


def with_next(items: Iterable[Batch]) -> Iterator[tuple[Batch, Batch | None]]:
    """``(item, the item after it)`` pairs; None after the last (no read ahead across epochs)."""
    it = iter(items)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following
        current = following


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from the optimiser's lr to 0 over ``total_steps``."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
