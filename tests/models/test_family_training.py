"""Every other family trains through the per-worker loop of the pipeline (no Ray):
micro-batched steps, ``loss``, one optimiser step, ``end_step``; weights move, losses stay finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.registry import create_model
from pipeline.train.loop import StepRunner, evaluate, train_epoch
from tests.models.tiny_nets import (
    random_scenes,
    scene_batches,
)

SMALL = {"backbone_kwargs": {"widths": [8, 16], "norm": "group"}}
CASES = {
    "tnet": {**SMALL, "levels": 3, "locations": 2},
    "racnn": {**SMALL, "scales": 3},
    "stn": {**SMALL, "glimpse_size": [16, 16]},
    "dasnet": {**SMALL, "passes": 2},
    "two_level": {**SMALL, "patch_size": [16, 16], "filter_size": [16, 16], "keep": 2},
    "residual_attention_small": {},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_through_the_step_runner(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, view_size=[32, 32], **CASES[name])
    shapes = [(160, 200), (220, 180), (300, 260), (180, 180)]
    source, keys = random_scenes(shapes, seed=1, coarsest=64)
    labels = np.array([0, 1, 2, 0])
    batches = scene_batches(source, keys, model.view_size, labels, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    runner = StepRunner(model=model, optimizer=optimizer, source=source, micro_batches=2,
                        clip_norm=1.0, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train_epoch(runner, batches, epoch=0)
    assert stats.samples == 4 and stats.steps == 2 and np.isfinite(stats.loss_sum)
    exempt = set(getattr(model, "no_grad_params", list)())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(moved) | exempt == set(before), sorted(set(before) - set(moved) - exempt)[:5]
    val = evaluate(runner, batches, seed=0, num_classes=3)
    assert val.samples == 4 and val.confusion.sum() == 4


def test_racnn_alternating_schedule_runs_through_the_epoch_loop():
    """alternate_epochs=1: epoch 0 trains only the classifiers, epoch 1 only the APNs."""
    torch.manual_seed(0)
    model = create_model("racnn", num_classes=3, view_size=[32, 32], alternate_epochs=1,
                         **CASES["racnn"])
    source, keys = random_scenes([(160, 200), (220, 180), (300, 260), (180, 180)], seed=1,
                                 coarsest=64)
    batches = scene_batches(source, keys, model.view_size, np.array([0, 1, 2, 0]), batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    runner = StepRunner(model=model, optimizer=optimizer, source=source, micro_batches=2,
                        generator=torch.Generator().manual_seed(0))
    groups = {k: [id(p) for p in v] for k, v in model.parameter_groups().items()}

    def moved_groups(epoch: int) -> set[str]:
        before = {id(p): p.detach().clone() for p in model.parameters()}
        train_epoch(runner, batches, epoch=epoch)
        moved = {id(p) for p in model.parameters() if not torch.equal(p, before[id(p)])}
        return {name for name, ids in groups.items() if moved & set(ids)}

    assert moved_groups(0) == {"cls"} and model.phase == "cls"
    assert moved_groups(1) <= {"apn"} and model.phase == "apn"
