"""RA-CNN's APN pre-training runs through the model's epoch hooks (so the training job runs it):
in pre-training epochs the loss is ``apn_pretrain_loss``, only the APNs learn, each APN only from
its own target; then the alternating schedule (or joint training) follows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.racnn import strongest_response_targets
from models.registry import create_model
from pipeline.train.loop import StepRunner, train_epoch
from tests.models.tiny_nets import random_scenes, scene_batches

SMALL = {"backbone_kwargs": {"widths": [8, 16], "norm": "group"}, "scales": 3}
SHAPES = [(160, 200), (220, 180), (300, 260), (180, 180)]


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("racnn", num_classes=3, view_size=[32, 32], **SMALL, **kwargs)


def _forward(model, source, keys):
    return model(source.view(keys, model.view_size), source.level0_sizes(keys), source, keys)


def test_schedule_pretrains_first_then_alternates_or_trains_jointly():
    model = _model(apn_pretrain_epochs=2, alternate_epochs=1)
    assert [model.phase_for_epoch(e) for e in range(6)] == [
        "pretrain", "pretrain", "cls", "apn", "cls", "apn"]
    model = _model(apn_pretrain_epochs=1)
    assert [model.phase_for_epoch(e) for e in range(3)] == ["pretrain", "joint", "joint"]
    model.begin_epoch(0)
    assert model.phase == "pretrain"
    model.begin_epoch(1)  # a resume at epoch 1 lands in the right phase, everything trainable
    assert model.phase == "joint" and all(p.requires_grad for p in model.parameters())
    assert _model().phase_for_epoch(0) is None  # default: no pre-training, phase left alone
    assert model.spec["kwargs"]["apn_pretrain_epochs"] == 1  # recorded: checkpoints rebuild it
    with pytest.raises(ValueError, match="apn_pretrain_epochs"):
        create_model("racnn", num_classes=3, view_size=[32, 32], scales=1, apn_pretrain_epochs=1)


def test_pretrain_loss_is_the_apn_regression_and_only_apns_get_gradients():
    model = _model(apn_pretrain_epochs=1)
    source, keys = random_scenes(SHAPES, seed=1, coarsest=64)
    labels = torch.tensor([0, 1, 2, 0])
    model.begin_epoch(0)
    out = _forward(model, source, keys)
    loss = model.loss(out, labels, epoch=0)
    assert torch.equal(loss, model.apn_pretrain_loss(out))
    # the targets are the strongest response of each scale's last conv layer (scale 1: the view)
    fmap = model.backbones[0](source.view(keys, model.view_size))
    assert torch.equal(out.extras["apn_targets"][0], strongest_response_targets(fmap, model.min_side))
    manual = sum(F.mse_loss(r, t) for r, t in zip(out.extras["apn_raw"], out.extras["apn_targets"],
                                                   strict=True)) / 2
    assert torch.allclose(loss, manual)
    loss.backward()
    apn = {n for n, _ in model.named_parameters() if n.startswith("apns.")}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == apn  # every APN learns, nothing else does
    assert set(model.no_grad_params()) == {n for n, _ in model.named_parameters()} - apn


def test_each_apn_learns_only_from_its_own_target():
    """APN 2's error must not reach APN 1 through the zoom that APN 1 chose."""
    model = _model(apn_pretrain_epochs=1)
    source, keys = random_scenes(SHAPES, seed=1, coarsest=64)
    model.begin_epoch(0)
    model.loss(_forward(model, source, keys), torch.zeros(4, dtype=torch.int64)).backward()
    full = [p.grad.clone() for p in model.apns[0].parameters()]
    model.zero_grad(set_to_none=True)
    out = _forward(model, source, keys)
    (F.mse_loss(out.extras["apn_raw"][0], out.extras["apn_targets"][0]) / 2).backward()
    for got, own in zip(full, (p.grad for p in model.apns[0].parameters()), strict=True):
        assert torch.allclose(got, own, atol=1e-7)


def test_job_loop_pretrains_then_runs_the_alternating_schedule():
    """Through the per-worker loop (what jobs/train_fmow.py runs): apn_pretrain_epochs=2,
    alternate_epochs=1 -> epochs 0-1 move only the APNs and lower the pre-training loss,
    epoch 2 only the classifiers, epoch 3 only the APNs again (ranking loss)."""
    model = _model(apn_pretrain_epochs=2, alternate_epochs=1)
    source, keys = random_scenes(SHAPES, seed=1, coarsest=64)
    batches = scene_batches(source, keys, model.view_size, np.array([0, 1, 2, 0]), batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    runner = StepRunner(model=model, optimizer=optimizer, source=source, micro_batches=2,
                        generator=torch.Generator().manual_seed(0))
    groups = {k: {id(p) for p in v} for k, v in model.parameter_groups().items()}

    def epoch(e: int) -> tuple[set[str], float]:
        before = {id(p): p.detach().clone() for p in model.parameters()}
        stats = train_epoch(runner, batches, epoch=e)
        moved = {id(p) for p in model.parameters() if not torch.equal(p, before[id(p)])}
        return {name for name, ids in groups.items() if moved & ids}, stats.loss_sum / stats.samples

    def pretrain_loss() -> float:
        with torch.no_grad():
            return float(model.apn_pretrain_loss(_forward(model, source, keys)))

    start = pretrain_loss()
    moved0, loss0 = epoch(0)
    assert moved0 == {"apn"} and model.phase == "pretrain"
    # the epoch's loss is the APN regression (an MSE of outputs in (0, 1), at most 1), not the
    # four cross-entropies of the other phases (about 4 ln 3 = 4.4 at the start)
    assert 0 < loss0 <= start * 1.2 < 1.0
    moved1, _ = epoch(1)
    assert moved1 == {"apn"} and model.phase == "pretrain"
    assert pretrain_loss() < start
    moved2, _ = epoch(2)
    assert moved2 == {"cls"} and model.phase == "cls"
    moved3, _ = epoch(3)
    assert moved3 <= {"apn"} and model.phase == "apn"


def test_shipped_racnn_config_follows_the_paper_schedule():
    from pathlib import Path

    from pipeline.train.config import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "jobs" / "configs" / "fmow_racnn.yaml")
    model = create_model(config.model.name, num_classes=4, **config.model.overrides)
    assert model.apn_pretrain_epochs >= 1 and model.alternate_epochs >= 1
    assert model.phase_for_epoch(0) == "pretrain"
    assert model.phase_for_epoch(model.apn_pretrain_epochs) == "cls"
