"""The Ray Train worker: ``worker_main`` around the Ray-free ``StepRunner`` of ``loop``.

One call of ``worker_main`` is one worker's whole run:

1. ``start_worker``: build the model, optimiser and schedule, restore the latest checkpoint
   (weights, optimiser, schedule, step count and this rank's random states), make every rank
   hold rank 0's weights, open the reader; ``WorkerRun`` holds the result.
2. per epoch, ``run_epoch``: train on this rank's shuffled shard, evaluate on its val shard,
   sum the statistics over all ranks; ``report_epoch``: rank 0 prints a line and logs metrics,
   the confusion matrix and attention pictures; ``report_to_ray``: every rank reports to Ray
   Train, rank 0 with a checkpoint on checkpoint epochs.
3. ``close_source``: release the reader's thread or child process.

Every random stream derives from the config's seeds through ``sampling_seed``,
``shuffle_seed`` and ``eval_seed`` (below), so that a resumed run draws what the
uninterrupted one would have.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from models.protocol import AttentionModel, ClosableSource, ModelOutput
from models.registry import create_model
from pipeline.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from pipeline.train.config import TrainConfig, from_dict
from pipeline.train.data import rank_dataset_name
from pipeline.train.driver import apply_ray_output
from pipeline.train.grad_sync import GradSync
from pipeline.train.loop import (
    EpochStats,
    StepRunner,
    cosine_schedule,
    evaluate,
    reader_counters,
    train_epoch,
)
from pipeline.train.microbatch import MicroBatch
from pipeline.train.quarantine import Quarantine, merge_records

# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------
#
# Each stream's seed is a config seed mixed with the epoch and the rank as ``seed * A + x``:
# with ``x`` in [0, A), different (seed, x) give different seeds, so no two workers or epochs
# share a stream and none depends on the world size. The multipliers are primes chosen larger
# than the ranges of what they separate. They are part of what a run reproduces: changing one
# changes every later draw of every run (and what a resumed run restores into).

SAMPLING_SEED_STRIDE = 1_000_003
"""Prime over any world size: separates ranks in ``sampling_seed``."""

SHUFFLE_SEED_STRIDE = 100_003
"""Prime over any epoch count and rank offset: separates (epoch, rank) in ``shuffle_seed``."""

SHUFFLE_RANK_STRIDE = 7919
"""The 1000th prime, over any epoch count: separates ranks from epochs in ``shuffle_seed``."""

EVAL_SEED_STRIDE = 7919
"""Prime over the epoch and rank offsets: separates (epoch, rank) in ``eval_seed``."""

EVAL_EPOCH_STRIDE = 31
"""Prime over the number of ranks: separates epochs from ranks in ``eval_seed``."""


def sampling_seed(run_seed: int, rank: int) -> int:
    """Seed of ``rank``'s sampling generator (patch locations), once per run.

    ``run_seed * 1_000_003 + rank``: distinct for every (run_seed, rank) with fewer than
    1,000,003 workers. The generator then runs on across epochs; checkpoints save its state.
    """
    return run_seed * SAMPLING_SEED_STRIDE + rank


def shuffle_seed(data_seed: int, epoch: int, rank: int) -> int:
    """Ray Data's local-shuffle seed of ``rank`` in ``epoch``: a new order every epoch, another
    on every rank, the same after a restart.

    ``data_seed * 100_003 + epoch + 7919 * rank``: distinct for every (data_seed, epoch, rank)
    while ``epoch < 7919`` and ``epoch + 7919 * rank < 100_003`` (e.g. 13 workers and up to
    4,975 epochs); beyond that two shuffles may coincide, which costs only their independence.
    """
    return data_seed * SHUFFLE_SEED_STRIDE + epoch + SHUFFLE_RANK_STRIDE * rank


def eval_seed(run_seed: int, epoch: int, rank: int) -> int:
    """Seed of ``rank``'s validation sampling in ``epoch``: fresh each evaluation, so it never
    advances the training generator that checkpoints restore.

    ``run_seed * 7919 + epoch * 31 + rank``: distinct for every (run_seed, epoch, rank) while
    ``rank < 31`` and ``epoch * 31 + rank < 7919`` (e.g. 31 workers and 255 epochs).
    """
    return run_seed * EVAL_SEED_STRIDE + epoch * EVAL_EPOCH_STRIDE + rank


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerRun:
    """One worker's state for the whole run.

    Attributes:
        config: the resolved ``TrainConfig``. loop_config: what the driver sent (``worker_main``).
        classes: class names in label order. rank, world: this worker and how many there are.
        runner: model, optimiser, schedule, reader and sampling generator.
        tracker: the driver's tracker on rank 0, a null one elsewhere.
        marker: the crash hook's marker file (``crash_for_test``).
        step: optimiser steps so far over all epochs (restored from the checkpoint).
        started: ``time.monotonic()`` when this worker started (the epoch lines' elapsed time).
    """

    config: TrainConfig
    loop_config: Mapping[str, Any]
    classes: list[str]
    rank: int
    world: int
    runner: StepRunner
    tracker: Any
    marker: Path
    step: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class EpochResult:
    """One epoch summed over all ranks: ``metrics`` (name -> value, as reported), ``val``
    (its ``confusion`` is (num_classes, num_classes)), the scenes ``shown`` in pictures and
    every rank's ``quarantined`` scenes so far (``pipeline.train.quarantine`` records)."""

    metrics: dict[str, float]
    val: EpochStats
    shown: _Shown
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``.

    ``loop_config``: ``config`` (``to_dict`` of the ``TrainConfig``), ``steps_per_epoch``,
    ``classes`` (names in label order), ``source_factory`` (picklable zero-argument callable
    returning the ``PixelSource``), ``tracker`` (the driver's ``MlflowTracker`` holding the run
    id; pickles as URI + ids; None: no tracking), ``env``
    (environment variables for the reader, e.g. ``AWS_*``), ``crash_marker`` (path).
    """
    os.environ.update(loop_config.get("env") or {})
    if loop_config.get("ray_output") is not None:
        apply_ray_output(loop_config["ray_output"])
    run, start_epoch = start_worker(loop_config)
    train_shard = ray.train.get_dataset_shard(rank_dataset_name("train", run.rank))
    val_shard = ray.train.get_dataset_shard(rank_dataset_name("val", run.rank))
    epochs = run.config.optim.epochs
    for epoch in range(start_epoch, epochs):
        # the first epoch of a run is the long wait before the first line: show its steps
        progress = StepProgress(epoch, epochs, int(loop_config["steps_per_epoch"]))
        result = run_epoch(run, epoch, train_shard, val_shard,
                           progress if run.rank == 0 and epoch == start_epoch else None)
        save = is_checkpoint_epoch(run.config, epoch)
        # every rank's sampling state, so that a restart resumes every rank's draws
        rank_rng = _all_gather(capture_rng(run.runner.generator)) if save else []
        if run.rank == 0:
            report_epoch(run, epoch, result)
        report_to_ray(run, epoch, result.metrics, rank_rng if save else None)
    close_source(run.runner)


def start_worker(loop_config: Mapping[str, Any]) -> tuple[WorkerRun, int]:
    """This worker's ``WorkerRun``, restored from the latest checkpoint, and the first epoch
    to run (0 without a checkpoint)."""
    config = from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    runner, start_epoch, step = build_runner(config, loop_config, rank, world)
    run = WorkerRun(
        config=config,
        loop_config=loop_config,
        classes=list(loop_config["classes"]),
        rank=rank,
        world=world,
        runner=runner,
        tracker=_worker_tracker(loop_config, rank),
        marker=Path(loop_config.get("crash_marker") or "crash.marker"),
        step=step,
    )
    return run, start_epoch


def build_runner(
    config: TrainConfig, loop_config: Mapping[str, Any], rank: int, world: int
) -> tuple[StepRunner, int, int]:
    """The ``StepRunner`` of this rank, with the next epoch and the global step to continue
    from: the model is built from ``config.run.seed``, restored from the latest checkpoint if
    there is one, then replaced by rank 0's weights on every rank."""
    torch.manual_seed(config.run.seed)
    model = create_model(config.model.name, **config.model.overrides)
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)  # device only; see GradSync
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    total_steps = int(loop_config["steps_per_epoch"]) * config.optim.epochs
    scheduler = cosine_schedule(optimizer, total_steps) if config.optim.scheduler == "cosine" else None
    sampling = torch.Generator().manual_seed(sampling_seed(config.run.seed, rank))
    start_epoch, step = restore(model, optimizer, scheduler, sampling, rank, world)
    sync = GradSync(model)
    sync.broadcast_state()
    use_amp = config.scaling.use_gpu and config.scaling.mixed_precision and device.type == "cuda"
    runner = StepRunner(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        source=started_source(loop_config["source_factory"]),
        micro_batches=config.data.micro_batches,
        ramp=config.data.ramp_micro_batches,
        read_ahead=config.data.read_ahead,
        clip_norm=config.optim.clip_norm,
        generator=sampling,
        device=device,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext,
        sync=sync,
        quarantine=Quarantine(),
    )
    return runner, start_epoch, step


def started_source(factory: Callable[[], Any]) -> Any:
    """``factory()``'s reader, started now: a ``ProcessPixelSource`` starts its child process
    (imports, store clients; seconds, tens of seconds on a loaded machine) on its first call,
    which otherwise fell inside the first training step and counted as model compute. Its
    start is now part of the worker's start, as the model's build is."""
    source = factory()
    reader_counters(source)  # the first call: starts the child of a ProcessPixelSource
    return source


def restore(
    model: AttentionModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampling: torch.Generator,
    rank: int,
    world: int,
) -> tuple[int, int]:
    """Load Ray Train's latest checkpoint into the arguments; (next epoch, global step).

    (0, 0) and nothing loaded without a checkpoint. The random states (global ones and
    ``sampling``) are restored only when the checkpoint has one per rank of this world size:
    with another number of workers the streams cannot continue, and stay freshly seeded."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as directory:
        restored = load_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler)
    if len(restored.rank_rng) == world:
        restore_rng(restored.rank_rng[rank], sampling)
    if rank == 0:  # a restart or a resubmitted job: where it goes on from (bench/stack_faults.py)
        print(f"[train] resumed from the checkpoint before epoch {restored.epoch + 1} "
              f"(step {restored.step})", flush=True)
    return restored.epoch, restored.step


def run_epoch(run: WorkerRun, epoch: int, train_shard: Any, val_shard: Any,
              progress: StepProgress | None = None) -> EpochResult:
    """Train one epoch on this rank's shard (``progress``: show its steps), then evaluate;
    statistics summed over all ranks."""
    config = run.config
    train = train_epoch(run.runner, train_batches(run, epoch, train_shard), epoch,
                        count_step(run, progress))
    train = _all_reduce_stats(train)
    shown = _Shown(limit=4 if run.rank == 0 else 0)  # only rank 0 draws pictures
    val = evaluate(
        run.runner,
        val_shard.iter_batches(batch_size=config.data.batch_size, batch_format="numpy"),
        seed=eval_seed(config.run.seed, epoch, run.rank),
        num_classes=len(run.classes),
        keep=shown,
    )
    val = _all_reduce_stats(val)
    # every rank takes part (a collective), whether or not it quarantined anything
    quarantined = merge_records(_all_gather(run.runner.quarantine.as_list()))
    metrics = {**epoch_metrics(run, epoch, train, val), "quarantined_scenes": float(len(quarantined))}
    return EpochResult(metrics, val, shown, quarantined)


def train_batches(run: WorkerRun, epoch: int, train_shard: Any) -> Iterator[dict[str, Any]]:
    """This rank's training batches of ``epoch`` (numpy dicts), locally shuffled with a seed
    of (the data seed, epoch, rank) in a buffer of 64 batches (at least 256 scenes)."""
    batch_size = run.config.data.batch_size
    return train_shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=max(batch_size * 64, 256),
        local_shuffle_seed=shuffle_seed(run.config.data.data_seed(run.config.run.seed), epoch,
                                        run.rank),
    )


def count_step(run: WorkerRun, progress: StepProgress | None = None) -> Callable[[int], None]:
    """``train_epoch``'s ``after_step``: count the global step, show ``progress``, then the
    crash hook."""

    def after_step(step_in_epoch: int) -> None:
        run.step += 1
        if progress is not None:
            progress.show(step_in_epoch + 1)
        crash_for_test(run.config.run.crash_at_step, run.step, run.rank, run.marker)

    return after_step


@dataclass
class StepProgress:
    """Steps done of one epoch, with rate and ETA, as a line on stderr every ``every_s``
    seconds: ``[train] epoch 1/20: step 5/17 | 0.41 steps/s | eta 29 s`` (none for an epoch
    shorter than that; its epoch line follows). Worker output is not a terminal: lines, not a
    redrawn bar."""

    epoch: int
    epochs: int
    total: int
    every_s: float = 10.0
    start: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def show(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(f"[train] epoch {self.epoch + 1}/{self.epochs}: step {done}/{self.total} | "
              f"{rate:.2f} steps/s | eta {max(self.total - done, 0) / rate:.0f} s",
              file=sys.stderr, flush=True)


def epoch_metrics(run: WorkerRun, epoch: int, train: EpochStats, val: EpochStats) -> dict[str, float]:
    """Reported metrics: ``train/*`` and ``val/*`` (``EpochStats.metrics``), the epoch, the
    global step and the learning rate after the epoch."""
    return {
        **train.metrics("train", run.world),
        **val.metrics("val", run.world),
        "epoch": float(epoch),
        "step": float(run.step),
        "lr": float(run.runner.optimizer.param_groups[0]["lr"]),
    }


def is_checkpoint_epoch(config: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) ends with a checkpoint: every ``run.checkpoint_every``
    epochs, and always the last."""
    last = epoch + 1 == config.optim.epochs
    return last or (epoch + 1) % config.run.checkpoint_every == 0


def report_epoch(run: WorkerRun, epoch: int, result: EpochResult) -> None:
    """Rank 0: one progress line, then metrics, confusion matrix and pictures to the tracker."""
    metrics = result.metrics
    print(
        f"[train] epoch {epoch + 1}/{run.config.optim.epochs}: train loss "
        f"{metrics['train/loss']:.3f} acc {metrics['train/accuracy']:.3f} | val acc "
        f"{metrics['val/accuracy']:.3f} | {metrics['train/bytes_per_sample']:,.0f} B and "
        f"{metrics['train/requests_per_sample']:.1f} requests per sample | data wait "
        f"{100 * metrics['train/data_wait_fraction']:.0f}% | "
        f"{metrics['train/samples_per_s']:.1f} samples/s | elapsed "
        f"{time.monotonic() - run.started:.0f} s",
        flush=True,
    )
    if result.quarantined:
        print(f"[train] {len(result.quarantined)} scene(s) quarantined (skipped for the rest of "
              "the run): " + "; ".join(f"{r['scene']}: {r['error']}" for r in result.quarantined),
              flush=True)
        run.tracker.log_json(result.quarantined, "quarantine.json")
    run.tracker.log_metrics(metrics, step=epoch)
    run.tracker.log_confusion(result.val.confusion, run.classes, step=epoch)
    _log_pictures(run.tracker, result.shown, run.classes, epoch)


def report_to_ray(
    run: WorkerRun, epoch: int, metrics: dict[str, float], rank_rng: list[Any] | None
) -> None:
    """``ray.train.report`` of every rank; ``rank_rng`` (every rank's random states) given
    means a checkpoint epoch: rank 0 attaches the checkpoint, and every rank waits until
    Ray has committed it."""
    if run.rank == 0 and rank_rng is not None:
        save_and_report(run, epoch, metrics, rank_rng)
    else:
        ray.train.report(metrics)
    if rank_rng is not None:
        # A report is registered by the controller asynchronously; a worker that dies right
        # after reporting could lose it. Wait until it is committed, so that a failure costs
        # at most the work since this checkpoint.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )


def save_and_report(run: WorkerRun, epoch: int, metrics: dict[str, float], rank_rng: list[Any]) -> None:
    """Rank 0: write the checkpoint after ``epoch`` (next epoch ``epoch + 1``, global step,
    every rank's random states, the config, the metrics) and report it with ``metrics``."""
    runner = run.runner
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            tmp, model=runner.model, optimizer=runner.optimizer, scheduler=runner.scheduler,
            epoch=epoch + 1, step=run.step, rank_rng=rank_rng, config=run.loop_config["config"],
            metrics=metrics,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def close_source(runner: StepRunner) -> None:
    """Release what the reader holds (its I/O thread or child process), if anything."""
    if isinstance(runner.source, ClosableSource):
        runner.source.close()


def crash_for_test(crash_at_step: int, step: int, rank: int, marker: Path) -> None:
    """Test hook: rank 1 kills its own process once, at global step ``crash_at_step``.

    ``marker`` records that it happened, so the restarted worker group runs on (a fault
    tolerance test: the run must resume from the last checkpoint). Negative: never."""
    if crash_at_step < 0 or step != crash_at_step or rank != 1 or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at step {step}\n")
    os._exit(17)


# --------------------------------------------------------------------------------------------
# Helpers: statistics across ranks, pictures, tracker
# --------------------------------------------------------------------------------------------


@dataclass
class _Shown:
    """A few validation scenes kept by rank 0 for the attention pictures.

    Each item: ``key``, ``view`` (C, h, w) float32, ``size`` [H, W] level-0 pixels, ``label``,
    ``probs`` (num_classes,), ``attention`` (h', w') or None, ``boxes`` (K, 4) level-0 or None,
    ``weights`` (K,) or None; all on the CPU.
    """

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
    """``stats`` summed over all ranks (itself without a process group)."""
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
    """Every rank's ``obj``, index = rank (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _log_pictures(tracker: Any, shown: _Shown, classes: list[str], epoch: int) -> None:
    """One attention overlay PNG per shown scene, under ``val_scenes/epoch_<epoch>/``."""
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


def _worker_tracker(loop_config: Mapping[str, Any], rank: int) -> Any:
    """The driver's tracker (attached to its MLflow run) on rank 0, a null one elsewhere."""
    from pipeline.track.tracking import Tracker

    tracker = loop_config.get("tracker")
    return tracker if rank == 0 and tracker is not None else Tracker()
