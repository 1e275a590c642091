"""The per-worker loop without Ray: micro-batched steps, metrics from the reader's counters,
checkpoints that continue a run exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.memory import TensorPyramidSource
from models.protocol import drive
from pipeline.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from pipeline.train.loop import StepRunner, cosine_schedule, evaluate, reader_counters, train_epoch
from tests.pipeline.toy_models import ToyAttention, toy_images


class CountingSource(TensorPyramidSource):
    """Counts one request per patch and its uint8 bytes, like a reader's counters."""

    def __init__(self, pyramids):
        super().__init__(pyramids)
        self.requests = self.bytes = 0

    def read(self, keys, request):
        out = super().read(keys, request)
        b, k, c, h, w = out.shape
        self.requests += b * k
        self.bytes += b * k * c * h * w
        return out

    def counters(self):
        return {"requests": self.requests, "bytes": self.bytes}


def _data(n=12, seed=0):
    images, labels = toy_images(n, seed=seed)
    source = CountingSource(TensorPyramidSource.from_images(images, coarsest=16).pyramids)
    keys = sorted(images)
    views = source.view(keys, ToyAttention.view_size).numpy()
    sizes = source.level0_sizes(keys).numpy()
    return source, keys, views, sizes, np.array(labels)


def _batches(keys, views, sizes, labels, batch_size=4):
    return [
        {"key": np.array(keys[i : i + batch_size]), "view": views[i : i + batch_size],
         "size": sizes[i : i + batch_size], "label": labels[i : i + batch_size]}
        for i in range(0, len(keys), batch_size)
    ]


def _runner(source, seed=0, micro_batches=2):
    torch.manual_seed(seed)
    model = ToyAttention()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return StepRunner(
        model=model, optimizer=optimizer, source=source, scheduler=cosine_schedule(optimizer, 20),
        micro_batches=micro_batches, clip_norm=1.0, generator=torch.Generator().manual_seed(5),
    )


def test_step_equals_manual_micro_batch_accumulation():
    source, keys, views, sizes, labels = _data(4)
    runner = _runner(source)
    torch.manual_seed(0)
    reference = ToyAttention()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    total = 0
    for part, seed in zip(([0, 1], [2, 3]), seeds, strict=True):
        ks = [keys[i] for i in part]
        out = drive(reference.steps(torch.from_numpy(views[part]), torch.from_numpy(sizes[part]),
                                    torch.Generator().manual_seed(seed)), source, ks)
        total = total + reference.loss(out, torch.from_numpy(labels[part])) * 0.5
    total.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_opt.step()

    stats = train_epoch(runner, _batches(keys, views, sizes, labels), epoch=0)
    assert stats.steps == 1 and stats.samples == 4
    for (name, a), b in zip(runner.model.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        if name != "baseline":
            torch.testing.assert_close(a, b, msg=name)
    assert runner.model.baseline.item() != 0.0  # end_step ran after the optimiser step


def test_metrics_come_from_the_reader_counters():
    source, keys, views, sizes, labels = _data(8)
    runner = _runner(source)
    before = reader_counters(source)
    stats = train_epoch(runner, _batches(keys, views, sizes, labels), epoch=0)
    after = reader_counters(source)
    assert stats.requests == after[0] - before[0] == 8 * 2  # 8 scenes x 2 patches
    assert stats.bytes == after[1] - before[1] == 8 * 2 * 3 * 8 * 8
    metrics = stats.metrics("train")
    assert metrics["train/bytes_per_sample"] == 2 * 3 * 8 * 8
    assert metrics["train/requests_per_sample"] == 2
    assert metrics["train/samples"] == 8
    assert 0.0 <= metrics["train/data_wait_fraction"] <= 1.0
    assert metrics["train/samples_per_s"] > 0


def test_evaluate_confusion_and_no_gradient():
    source, keys, views, sizes, labels = _data(8)
    runner = _runner(source)
    stats = evaluate(runner, _batches(keys, views, sizes, labels), seed=3, num_classes=2)
    assert stats.confusion.sum() == 8
    assert stats.correct == int(np.trace(stats.confusion))
    assert all(p.grad is None for p in runner.model.parameters())
    again = evaluate(runner, _batches(keys, views, sizes, labels), seed=3, num_classes=2)
    assert again.loss_sum == pytest.approx(stats.loss_sum)  # seeded: same samples


def test_checkpoint_resume_continues_exactly(tmp_path):
    source, keys, views, sizes, labels = _data(12)
    batches = _batches(keys, views, sizes, labels)

    straight = _runner(source)
    for epoch in range(2):
        train_epoch(straight, batches, epoch)

    first = _runner(source)
    train_epoch(first, batches, 0)
    torch.manual_seed(1234)  # the global RNG moves on; restore_rng must bring it back
    save_checkpoint(tmp_path, model=first.model, optimizer=first.optimizer, scheduler=first.scheduler,
                    epoch=1, step=3, rank_rng=[capture_rng(first.generator)], config={"a": 1})
    resumed = _runner(source, seed=99)  # different initialisation, overwritten by the load
    restored = load_checkpoint(tmp_path, model=resumed.model, optimizer=resumed.optimizer,
                               scheduler=resumed.scheduler)
    restore_rng(restored.rank_rng[0], resumed.generator)
    assert (restored.epoch, restored.step, restored.config) == (1, 3, {"a": 1})
    train_epoch(resumed, batches, 1)
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=0)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 6


def test_checkpoint_loads_weights_only(tmp_path):
    model = ToyAttention()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=None, epoch=0, step=0,
                    rank_rng=[capture_rng()], config={})
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # raises on pickled objects
    assert set(state) == {"model", "optimizer", "scheduler", "rank_rng"}


# ------------------------------------------------------------------ reading ahead (ATS)


class EventSource(CountingSource):
    """Records each read's keys and boxes, in the order they are asked for."""

    def __init__(self, pyramids, events):
        super().__init__(pyramids)
        self.events = events

    def read(self, keys, request):
        self.events.append(("read", tuple(keys), request.boxes.clone()))
        return super().read(keys, request)


def _ats_runner(read_ahead, lr, events):
    from models.registry import create_model

    g = torch.Generator().manual_seed(2)
    images = {f"s{i:02d}": (torch.rand(1, 96 + 16 * (i % 3), 128, generator=g) * 255).to(torch.uint8)
              for i in range(12)}
    source = EventSource(TensorPyramidSource.from_images(images, coarsest=32).pyramids, events)
    keys = sorted(images)
    torch.manual_seed(0)
    model = create_model("ats", in_channels=1, num_classes=3, view_size=(24, 24),
                         patch_size=(8, 8), n_patches=3, baseline=True,
                         attention_backbone_kwargs={"widths": (4,)},
                         feature_backbone="small_cnn", feature_backbone_kwargs={"widths": (4,), "norm": "batch"})
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.register_step_post_hook(lambda *_: events.append(("optimizer step",)))
    runner = StepRunner(model=model, optimizer=optimizer, source=source, micro_batches=2,
                        generator=torch.Generator().manual_seed(5), read_ahead=read_ahead)
    views = source.view(keys, (24, 24)).numpy()
    sizes = source.level0_sizes(keys).numpy()
    labels = np.arange(12) % 3
    return runner, _batches(np.array(keys), views, sizes, labels, batch_size=4)


def test_read_ahead_with_unchanged_weights_changes_nothing_but_when_reads_happen():
    """lr = 0: the same reads, losses and accuracy with and without reading ahead; with it,
    each step's reads of the next step's micro-batches come before the optimiser step."""
    runs = {}
    for read_ahead in (False, True):
        events = []
        runner, batches = _ats_runner(read_ahead, lr=0.0, events=events)
        train = train_epoch(runner, batches, epoch=0)
        val = evaluate(runner, batches, seed=1, num_classes=3)
        runs[read_ahead] = (events, train, val)
    (plain, t0, v0), (ahead, t1, v1) = runs[False], runs[True]
    reads = lambda ev: sorted((e[1], e[2].tolist()) for e in ev if e[0] == "read")  # noqa: E731
    assert reads(ahead) == reads(plain) and len(reads(plain)) == 2 * 3 * 2
    assert (t1.requests, t1.bytes, t1.correct, v1.correct) == (t0.requests, t0.bytes, t0.correct, v0.correct)
    assert t1.ratio_draws == 2 * 4 * 3 and t1.log_ratio_sum == 0.0  # 2 steps x 4 scenes x 3 draws
    assert "train/read_ahead_abs_log_ratio" not in t0.metrics("train")
    assert t1.loss_sum == pytest.approx(t0.loss_sum, rel=1e-5)
    assert v1.loss_sum == pytest.approx(v0.loss_sum, rel=1e-5)
    assert (v1.confusion == v0.confusion).all()
    kinds = [e[0] if e[0] != "read" else e[1][0] for e in ahead]
    # step 1 reads both of its micro-batches, then both of step 2's, then steps the optimiser
    assert kinds[:5] == ["s00", "s02", "s04", "s06", "optimizer step"]
    assert kinds[5:8] == ["s08", "s10", "optimizer step"]  # step 2 reads only step 3's
    assert kinds[8] == "optimizer step"  # the last step reads nothing, ahead or not


def test_read_ahead_keeps_training_with_moving_weights():
    events = []
    runner, batches = _ats_runner(True, lr=0.05, events=events)
    for epoch in range(2):
        stats = train_epoch(runner, batches, epoch=epoch)
        assert stats.samples == 12 and np.isfinite(stats.loss_sum)
        # the weights moved between drawing and using: a != q, reported per epoch
        assert stats.ratio_draws == 2 * 4 * 3 and stats.metrics("train")["train/read_ahead_abs_log_ratio"] > 0
        assert runner._ahead is None  # nothing read ahead across epochs
    # every read ahead was used by its step: as many reads as without reading ahead
    assert sum(1 for e in events if e[0] == "read") == 2 * 3 * 2


def test_read_faults_and_hedges_add_up_and_become_metrics():
    from pipeline.train.loop import EpochStats

    a = EpochStats(samples=2, retries=3, timeouts=1, errors=2, hedges=4)
    b = EpochStats(samples=1, retries=1, errors=1, hedges=1)
    a.add(EpochStats.from_vector(b.as_vector()))
    assert (a.retries, a.timeouts, a.errors, a.hedges) == (4, 1, 3, 5)
    metrics = a.metrics("train")
    assert metrics["train/read_hedges"] == 5.0 and metrics["train/read_retries"] == 4.0


def test_epoch_times_the_wait_for_batches_apart_from_the_steps():
    """``batch_wait_s``: time blocked on the batch iterator (Ray Data's, in training), outside
    the steps; ``pass_s``: the whole pass; both survive the all-reduce vector."""
    import time

    from pipeline.train.loop import EpochStats

    source, keys, views, sizes, labels = _data()
    batches = _batches(keys, views, sizes, labels)

    def slow(delay=0.05):
        for batch in batches:
            time.sleep(delay)
            yield batch

    stats = train_epoch(_runner(source), slow(), epoch=0)
    assert stats.steps == len(batches) == 3
    assert 3 * 0.05 <= stats.batch_wait_s < stats.pass_s
    assert stats.seconds + stats.batch_wait_s <= stats.pass_s
    back = EpochStats.from_vector(stats.as_vector())
    assert (back.batch_wait_s, back.pass_s, back.steps) == (stats.batch_wait_s, stats.pass_s, 3)
    metrics = stats.metrics("train", world_size=2)
    assert metrics["train/batch_wait_s"] == stats.batch_wait_s / 2
    assert metrics["train/pass_s"] == stats.pass_s / 2 and metrics["train/steps"] == 1.5
    assert metrics["train/step_s"] == stats.seconds / 2
    assert metrics["train/storage_wait_s"] == stats.wait_s / 2
    quick = evaluate(_runner(source), slow(0.0), seed=0, num_classes=2)
    assert 0 < quick.batch_wait_s < quick.pass_s
