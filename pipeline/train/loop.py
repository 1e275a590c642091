"""The per-worker training loop: micro-batched steps over a ``PixelSource``, epochs, metrics.

``StepRunner`` owns what lives for the whole run inside one worker: the model, optimiser,
scheduler, the pixel source (the reader with its caches) and the sampling generator.
``train_epoch`` and ``evaluate`` take any iterable of batches, so they run the same under Ray
Train (``worker_main``), in the throughput benchmark, and in unit tests without Ray.

A batch is a dict: ``key`` (B,) scene keys, ``view`` (B, C, h, w) float32, ``size`` (B, 2)
int64 level-0 (height, width), ``label`` (B,) int64 (numpy arrays or tensors).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.protocol import AttentionModel, ModelOutput, PixelSource
from pipeline.train.grad_sync import GradSync
from pipeline.train.microbatch import MicroBatch, run_microbatches, split_batch, submitter

Batch = Mapping[str, Any]


def reader_counters(source: object) -> tuple[int, int]:
    """(requests, bytes) read so far by ``source``; (0, 0) for sources that do not count.

    Accepts ``counters()`` returning a mapping or an object with ``requests`` and ``bytes``.
    """
    counters = getattr(source, "counters", None)
    if not callable(counters):
        return 0, 0
    c = counters()
    get = c.get if isinstance(c, Mapping) else lambda k, d=0: getattr(c, k, d)
    return int(get("requests", 0)), int(get("bytes", 0))


@dataclass
class EpochStats:
    """Sums over one epoch of one worker (``merge`` adds other workers' sums).

    ``seconds`` is wall time of the steps, ``wait_s`` the part blocked on storage.
    ``log_ratio_sum`` / ``ratio_draws``: sum of |log(a/q)| over the draws read ahead (a: the
    attention they were used for, q: the one they were drawn from) and their number.
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
    confusion: np.ndarray | None = None

    def as_vector(self) -> Tensor:
        return torch.tensor(
            [self.loss_sum, self.correct, self.samples, self.seconds, self.wait_s,
             self.requests, self.bytes, self.steps, self.log_ratio_sum, self.ratio_draws],
            dtype=torch.float64,
        )

    @classmethod
    def from_vector(cls, v: Tensor, confusion: np.ndarray | None = None) -> EpochStats:
        x = v.tolist()
        return cls(x[0], int(x[1]), int(x[2]), x[3], x[4], int(x[5]), int(x[6]), int(x[7]),
                   x[8], int(x[9]), confusion)

    def metrics(self, prefix: str, world_size: int = 1) -> dict[str, float]:
        """Per-epoch metrics: loss and accuracy per sample, bytes and requests per sample,
        data-wait fraction of step time, samples per second (all workers together); with
        draws read ahead, their mean |log(a/q)| (0: the weights did not move the attention)."""
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
        }


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
        source: the ``PixelSource``; its ``submit`` (if any) makes reads asynchronous.
        micro_batches: micro-batches per step; ramp: their sizes grow 1 : 2 : 3 ...
            (``split_batch``). clip_norm: gradient-norm clip (0: off).
        generator: sampling generator; each micro-batch gets a child seeded from it, in order.
        read_ahead: during each step, draw the next step's first micro-batch with the current
            weights and submit its read (``pipeline.train.microbatch``); needs the next batch
            (``train_step(..., next_batch=...)``, as ``train_epoch`` and ``evaluate`` pass it).
        device: where the model lives. autocast: context for model compute (bf16 on GPU).
        sync: gradient/buffer averaging across workers (a no-op in one process).
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

    def __post_init__(self) -> None:
        self.submit = submitter(self.source)
        if self.sync is None:
            self.sync = GradSync(self.model)
        self._ahead: tuple[Batch, list[MicroBatch]] | None = None

    def _micro(self, batch: Batch, generator: torch.Generator) -> list[MicroBatch]:
        """The batch's micro-batches: the ones read ahead for it, else split now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is batch:
            return ahead[1]
        keys, views, sizes, labels = to_tensors(batch)
        parts = max(1, min(self.micro_batches, len(keys)))
        seeds = torch.randint(0, 2**62, (parts,), generator=generator).tolist()
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        return split_batch(keys, views.to(self.device), sizes.to(self.device),
                           labels.to(self.device), parts, gens, ramp=self.ramp)

    def _read_ahead(self, batch: Batch | None, generator: torch.Generator) -> Callable[[], None]:
        """Split ``batch`` (the next step's) now and submit its first micro-batch's read,
        drawn by ``model.propose`` with the current weights (a no-op without ``read_ahead``,
        without a next batch, or for a model that cannot propose)."""

        def launch() -> None:
            if not self.read_ahead or batch is None:
                return
            micro = self._micro(batch, generator)
            first = micro[0]
            with self.autocast():
                proposal = self.model.propose(first.views, first.sizes, first.generator)
            if proposal is not None:
                future = self.submit(first.keys, proposal.request)
                micro[0] = replace(first, proposal=proposal, prefetched=future)
            self._ahead = (batch, micro)

        return launch

    def _steps(self, mb: MicroBatch):
        if mb.proposal is None:
            return self.model.steps(mb.views, mb.sizes, mb.generator)
        return self.model.steps(mb.views, mb.sizes, mb.generator, proposal=mb.proposal)

    def _run(
        self,
        micro: list[MicroBatch],
        finish: Callable[[MicroBatch, ModelOutput], None],
        after_start: Callable[[], None] | None = None,
    ):
        return run_microbatches(
            micro,
            self._steps,
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

        With ``read_ahead`` and ``next_batch``, the next step's first read is drawn (with the
        weights before this step's update) and submitted once this step's reads are."""
        t0 = time.perf_counter()
        r0, b0 = reader_counters(self.source)
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
        r1, b1 = reader_counters(self.source)
        stats.samples += total
        stats.steps += 1
        stats.wait_s += schedule.wait_s
        stats.requests += r1 - r0
        stats.bytes += b1 - b0
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
        ``next_batch``: as in ``train_step`` (the weights do not change between them here)."""
        t0 = time.perf_counter()
        r0, b0 = reader_counters(self.source)
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
        r1, b1 = reader_counters(self.source)
        stats.samples += sum(len(mb.keys) for mb in micro)
        stats.steps += 1
        stats.wait_s += schedule.wait_s
        stats.requests += r1 - r0
        stats.bytes += b1 - b0
        stats.seconds += time.perf_counter() - t0


def train_epoch(
    runner: StepRunner,
    batches: Iterable[Batch],
    epoch: int,
    after_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``; ``after_step(step_in_epoch)`` runs after every step.

    ``model.begin_epoch(epoch)`` runs first (alternating schedules such as RA-CNN's)."""
    runner.model.begin_epoch(epoch)
    stats = EpochStats()
    for i, (batch, next_batch) in enumerate(with_next(batches)):
        runner.train_step(batch, epoch, stats, next_batch)
        if after_step is not None:
            after_step(i)
    return stats


def evaluate(
    runner: StepRunner,
    batches: Iterable[Batch],
    seed: int,
    num_classes: int,
    keep: Callable[[MicroBatch, ModelOutput], None] | None = None,
) -> EpochStats:
    """Loss, accuracy and confusion matrix over ``batches``; sampling seeded by ``seed``."""
    stats = EpochStats(confusion=np.zeros((num_classes, num_classes), dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    for batch, next_batch in with_next(batches):
        runner.eval_step(batch, generator, stats, keep, next_batch)
    return stats


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


# --------------------------------------------------------------------------------------------
# Ray Train worker
# --------------------------------------------------------------------------------------------


@dataclass
class _Shown:
    """A few validation scenes kept by rank 0 for the attention pictures."""

    limit: int
    items: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, mb: MicroBatch, out: ModelOutput) -> None:
        for i in range(len(mb.keys)):
            if len(self.items) >= self.limit:
                return
            self.items.append(
                {
                    "key": mb.keys[i],
                    "view": mb.views[i].float().cpu(),
                    "size": mb.sizes[i].tolist(),
                    "label": int(mb.labels[i]),
                    "probs": out.logits[i].float().softmax(-1).cpu(),
                    "attention": None if out.attention is None else out.attention[i].float().cpu(),
                    "boxes": None if out.boxes is None else out.boxes[i].cpu(),
                    "weights": None if out.weights is None else out.weights[i].float().cpu(),
                }
            )


def _all_reduce_stats(stats: EpochStats) -> EpochStats:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    vector = stats.as_vector()
    dist.all_reduce(vector)
    confusion = None
    if stats.confusion is not None:
        c = torch.from_numpy(stats.confusion)
        dist.all_reduce(c)
        confusion = c.numpy()
    return EpochStats.from_vector(vector, confusion)


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _maybe_crash(crash_at_step: int, step: int, rank: int, marker: Path) -> None:
    """Test hook: rank 1 kills its own process once at global step ``crash_at_step``."""
    if crash_at_step < 0 or step != crash_at_step or rank != 1 or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at step {step}\n")
    os._exit(17)


def _log_pictures(tracker: Any, shown: _Shown, classes: list[str], epoch: int) -> None:
    from pipeline.track import pictures as visualize

    for item in shown.items:
        pred = int(item["probs"].argmax())
        title = (
            f"true: {classes[item['label']]}  pred: {classes[pred]} ({float(item['probs'][pred]):.2f})"
        )
        png = visualize.attention_overlay_png(
            item["view"], item["attention"], item["boxes"], item["size"], item["weights"], title
        )
        name = item["key"].rstrip("/").rsplit("/", 1)[-1] or "scene"
        tracker.log_image(png, f"val_scenes/epoch_{epoch:03d}/{name}.png")


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``.

    ``loop_config``: ``config`` (``to_dict`` of the ``TrainConfig``), ``steps_per_epoch``,
    ``classes`` (names in label order), ``source_factory`` (picklable zero-argument callable
    returning the ``PixelSource``), ``tracker`` (the driver's ``MlflowTracker`` holding the run
    id; pickles as URI + ids; None: no tracking), ``env``
    (environment variables for the reader, e.g. ``AWS_*``), ``crash_marker`` (path).
    """
    import ray.train
    import ray.train.torch

    from models.registry import create_model
    from pipeline.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
    from pipeline.train.config import from_dict

    os.environ.update(loop_config.get("env") or {})
    config = from_dict(loop_config["config"])
    classes = list(loop_config["classes"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    torch.manual_seed(config.run.seed)
    model = create_model(config.model.name, **config.model.overrides)
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)  # device only; see GradSync
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    steps_per_epoch = int(loop_config["steps_per_epoch"])
    scheduler = (
        cosine_schedule(optimizer, steps_per_epoch * config.optim.epochs)
        if config.optim.scheduler == "cosine"
        else None
    )
    sampling = torch.Generator().manual_seed(config.run.seed * 1_000_003 + rank)
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler)
        start_epoch, step = restored.epoch, restored.step
        if len(restored.rank_rng) == world:
            restore_rng(restored.rank_rng[rank], sampling)
    sync = GradSync(model)
    sync.broadcast_state()

    use_amp = config.scaling.use_gpu and config.scaling.mixed_precision and device.type == "cuda"
    runner = StepRunner(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        source=loop_config["source_factory"](),
        micro_batches=config.data.micro_batches,
        ramp=config.data.ramp_micro_batches,
        read_ahead=config.data.read_ahead,
        clip_norm=config.optim.clip_norm,
        generator=sampling,
        device=device,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext,
        sync=sync,
    )
    tracker = _worker_tracker(loop_config, rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    marker = Path(loop_config.get("crash_marker") or "crash.marker")

    for epoch in range(start_epoch, config.optim.epochs):
        shuffle_seed = config.data.shuffle_seed * 100_003 + epoch
        batches = train_shard.iter_batches(
            batch_size=config.data.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=max(config.data.batch_size * 64, 256),
            local_shuffle_seed=shuffle_seed + 7919 * rank,
        )

        def after_step(_: int) -> None:
            nonlocal step
            step += 1
            _maybe_crash(config.run.crash_at_step, step, rank, marker)

        train = _all_reduce_stats(train_epoch(runner, batches, epoch, after_step))
        shown = _Shown(limit=4 if rank == 0 else 0)
        val = _all_reduce_stats(
            evaluate(
                runner,
                val_shard.iter_batches(batch_size=config.data.batch_size, batch_format="numpy"),
                seed=config.run.seed * 7919 + epoch * 31 + rank,
                num_classes=len(classes),
                keep=shown,
            )
        )
        metrics = {
            **train.metrics("train", world),
            **val.metrics("val", world),
            "epoch": float(epoch),
            "step": float(step),
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        last = epoch + 1 == config.optim.epochs
        save = last or (epoch + 1) % config.run.checkpoint_every == 0
        rank_rng = _all_gather(capture_rng(sampling)) if save else []
        if rank == 0:
            print(
                f"[train] epoch {epoch + 1}/{config.optim.epochs}: train loss "
                f"{metrics['train/loss']:.3f} acc {metrics['train/accuracy']:.3f} | val acc "
                f"{metrics['val/accuracy']:.3f} | {metrics['train/bytes_per_sample']:,.0f} B and "
                f"{metrics['train/requests_per_sample']:.1f} requests per sample | data wait "
                f"{100 * metrics['train/data_wait_fraction']:.0f}% | "
                f"{metrics['train/samples_per_s']:.1f} samples/s",
                flush=True,
            )
            tracker.log_metrics(metrics, step=epoch)
            tracker.log_confusion(val.confusion, classes, step=epoch)
            _log_pictures(tracker, shown, classes, epoch)
        if rank == 0 and save:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(
                    tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                    step=step, rank_rng=rank_rng, config=loop_config["config"], metrics=metrics,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if save:
            # A report is registered by the controller asynchronously; a worker that dies right
            # after reporting could lose it. Wait until it is committed, so that a failure costs
            # at most the work since this checkpoint.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
            )
    if hasattr(runner.source, "close"):
        runner.source.close()  # the reader's I/O thread or child process


def _worker_tracker(loop_config: Mapping[str, Any], rank: int) -> Any:
    """The driver's tracker (attached to its MLflow run) on rank 0, a null one elsewhere."""
    from pipeline.track.tracking import Tracker

    tracker = loop_config.get("tracker")
    return tracker if rank == 0 and tracker is not None else Tracker()
