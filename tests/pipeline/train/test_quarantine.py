"""Quarantine in the step loop (no Ray): a scene whose reads fail is dropped from its batch and
recorded once; the steps go on; a rank whose whole batch is quarantined still takes its step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.memory import TensorPyramidSource
from pipeline.read.reader import CorruptChunkError, MissingShardError
from pipeline.train.loop import StepRunner, cosine_schedule, evaluate, train_epoch
from pipeline.train.quarantine import (
    Quarantine,
    merge_records,
    model_read_level,
    too_few_levels,
    with_level_check,
)
from tests.pipeline.toy_models import ToyAttention, toy_images


class FailingSource(TensorPyramidSource):
    """Reads like the in-memory source, except that every read touching a ``bad`` scene fails
    as the reader would (``transient``: fails only the first ``transient`` reads)."""

    def __init__(self, pyramids, bad=(), transient=0):
        super().__init__(pyramids)
        self.bad, self.transient, self.reads = set(bad), transient, 0

    def read(self, keys, request):
        self.reads += 1
        if self.transient > 0:
            self.transient -= 1
            raise CorruptChunkError("a transient fault")
        hit = [k for k in keys if k in self.bad]
        if hit:
            raise MissingShardError(f"scene {hit[0]} level {request.level} shard (0, 0) is missing")
        return super().read(keys, request)


def _setup(bad_index=(), n=8, transient=0):
    images, labels = toy_images(n, seed=0)
    keys = sorted(images)
    pyramids = TensorPyramidSource.from_images(images, coarsest=16).pyramids
    source = FailingSource(pyramids, {keys[i] for i in bad_index}, transient)
    views = TensorPyramidSource(pyramids).view(keys, ToyAttention.view_size).numpy()
    sizes = TensorPyramidSource(pyramids).level0_sizes(keys).numpy()
    batches = [{"key": np.array(keys[i : i + 4]), "view": views[i : i + 4],
                "size": sizes[i : i + 4], "label": np.array(labels[i : i + 4])}
               for i in range(0, n, 4)]
    torch.manual_seed(0)
    model = ToyAttention()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    runner = StepRunner(model=model, optimizer=optimizer, source=source,
                        scheduler=cosine_schedule(optimizer, 20), micro_batches=2,
                        generator=torch.Generator().manual_seed(5), quarantine=Quarantine())
    return runner, batches, keys


def test_a_failing_scene_is_quarantined_once_and_the_epochs_go_on():
    runner, batches, keys = _setup(bad_index=[1])
    for epoch in range(2):
        stats = train_epoch(runner, batches, epoch)
        assert stats.steps == 2 and stats.samples == 7  # the step kept, without the bad scene
    records = runner.quarantine.as_list()
    assert [(r["scene"], r["error"], r["epoch"], r["step"]) for r in records] == [
        (keys[1], "MissingShardError", 0, 0)]
    assert f"scene {keys[1]}" in records[0]["message"]
    val = evaluate(runner, batches, seed=1, num_classes=2)
    assert val.samples == 7


def test_without_a_quarantine_the_error_ends_the_step():
    runner, batches, _ = _setup(bad_index=[1])
    runner.quarantine = None
    with pytest.raises(RuntimeError, match="failed"):
        train_epoch(runner, batches, 0)


def test_a_batch_of_only_bad_scenes_still_takes_its_step():
    runner, batches, _ = _setup(bad_index=[0, 1, 2, 3])
    before = [p.detach().clone() for p in runner.model.parameters()]
    stats = train_epoch(runner, batches[:1], 0)
    assert stats.steps == 1 and stats.samples == 0
    assert len(runner.quarantine.as_list()) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, runner.model.parameters(), strict=True))


def test_a_fault_that_no_single_scene_repeats_is_retried_not_quarantined():
    runner, batches, _ = _setup(transient=1)
    stats = train_epoch(runner, batches, 0)
    assert stats.samples == 8 and runner.quarantine.as_list() == []


def test_rows_with_an_error_are_quarantined_at_first_sight_and_records_merge_over_ranks():
    runner, batches, keys = _setup()
    batches[0]["error"] = np.array(["", "scene x has 1 pyramid levels; the model reads level 1",
                                    "", ""], dtype=object)
    batches[1]["error"] = np.array([""] * 4, dtype=object)
    stats = train_epoch(runner, batches, 0)
    assert stats.samples == 7
    (record,) = runner.quarantine.as_list()
    assert record["error"] == "UnreadableScene" and "pyramid levels" in record["message"]
    other = [{"scene": "s3://b/z", "error": "E", "message": "m", "epoch": 1, "step": 0},
             dict(record)]
    assert [r["scene"] for r in merge_records([runner.quarantine.as_list(), other])] == [
        keys[1], "s3://b/z"]


def test_the_level_check_reads_the_manifest():
    class Model:
        patch_level, tile_level = 1, None

    assert model_read_level(Model()) == 1 and model_read_level(object()) == 0
    assert too_few_levels(["a", "b"], [1, 3], 1) == [
        "scene a has 1 pyramid levels; the model reads level 1", ""]
    import pandas as pd

    manifest = pd.DataFrame({"uri": ["a", "b"], "num_levels": [1, 2]})
    rows = with_level_check({"key": np.array(["a", "b"])}, manifest, 1)
    assert [bool(e) for e in rows["error"]] == [True, False]
