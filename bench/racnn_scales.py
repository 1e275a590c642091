"""RA-CNN on Megapixel MNIST, scale by scale: what each scale's classifier and the fused one
reach, and where the zooms land.

Trains ``racnn_mnist`` exactly as ``bench/learning.py`` does (its ``build_split``, ``train``
and ``evaluate``: same data, seed, CPU-second budget, Adam with cosine decay), then on the test
canvases reports, per scale, the accuracy of that scale's own classifier, the fused prediction's,
and per zoom the square's side (level-0 px), how many of the canvas's 5 digits it covers (at
least half of a digit, as the bench's hit rate) and how many of the 3 that carry the label, and
the fraction of canvases where a zoom covers 4 or more digits (what counting the label needs:
with 3 digits of the label among 5, one seen digit is right at most 60 % of the time).

    python bench/racnn_scales.py --json
    python bench/racnn_scales.py --model-kwargs '{"zoom_sizes": [128, 72]}' --json

The last line with ``--json`` is one JSON object: ``init`` and ``trained`` (the scale table
before and after training), ``acc``, ``bytes_per_sample``, ``train_s_per_sample``, ``epochs``,
``history`` and ``setup``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

import torch
from torch import Tensor

from bench.learning import (
    PixelCounter,
    Setup,
    Split,
    build_split,
    evaluate,
    model_kwargs,
    run_batch,
    train,
)
from models.registry import create_model
from pipeline.synth.megapixel_mnist import DIGIT, MegapixelMNISTSpec


def covered(boxes: Tensor, digits: Tensor) -> Tensor:
    """(B, K, D) bool: box k of scene b covers at least half of digit d (level-0 boxes)."""
    lo = torch.maximum(boxes[:, :, None, :2], digits[:, None, :, :2])
    hi = torch.minimum(boxes[:, :, None, 2:], digits[:, None, :, 2:])
    return (hi - lo).clamp_min(0).prod(-1) * 2 >= DIGIT * DIGIT


def scale_table(model, data: Split, targets: int, batch: int = 64) -> dict:
    """Eval-mode per-scale and fused accuracy, and per zoom: mean / min / max side (level-0
    px), mean digits covered (all, and of the label: the first ``targets`` of a layout) and
    the fraction of canvases with 4 or more digits covered."""
    model.eval()
    n = len(data.keys)
    right, fused, cover, sides = None, 0, [], []
    with torch.no_grad():
        for idx in torch.arange(n).split(batch):
            out = run_batch(
                model,
                replace(data, source=PixelCounter(data.source)),
                idx,
                torch.Generator().manual_seed(0),
            )
            labels = data.labels[idx]
            hit = torch.stack(
                [(lg.argmax(-1) == labels).sum() for lg in out.extras["scale_logits"]]
            )
            right = hit if right is None else right + hit
            fused += int((out.logits.argmax(-1) == labels).sum())
            cov = covered(out.boxes, data.digits[idx])  # (B, zooms, 5)
            cover.append(torch.stack([cov.sum(-1), cov[..., :targets].sum(-1)], -1).float())
            sides.append((out.boxes[..., 2] - out.boxes[..., 0]).float())
    model.train()
    cover_t, side_t = torch.cat(cover), torch.cat(sides)
    return dict(
        scale_acc=[round(int(r) / n, 3) for r in right],
        fused_acc=fused / n,
        side_px_mean=[round(float(v), 1) for v in side_t.mean(0)],
        side_px_min=[int(v) for v in side_t.min(0).values],
        side_px_max=[int(v) for v in side_t.max(0).values],
        digits_covered=[round(float(v), 2) for v in cover_t[..., 0].mean(0)],
        label_digits_covered=[round(float(v), 2) for v in cover_t[..., 1].mean(0)],
        frac_4_or_more=[round(float(v), 3) for v in (cover_t[..., 0] >= 4).float().mean(0)],
    )


def run(setup: Setup, log=print) -> dict:
    """Train ``racnn_mnist`` as ``bench/learning.py`` does and tabulate its scales."""
    torch.set_num_threads(setup.threads)
    spec = MegapixelMNISTSpec(
        canvas=(setup.canvas, setup.canvas),
        n_noise=setup.noise,
        n_other=setup.others,
        margin=setup.margin,
        seed=setup.seed,
    )
    data = (
        build_split(spec, "train", setup.n_train, setup.view),
        build_split(spec, "test", setup.n_test, setup.view),
    )
    reg, kwargs = model_kwargs("racnn", setup)
    torch.manual_seed(setup.seed)
    model = create_model(reg, **kwargs)
    log(f"racnn: {reg} {kwargs}")
    init = scale_table(model, data[1], spec.n_target)
    log(f"  at init: {json.dumps(init)}")
    stats = train(model, data[0], data[1], setup, log)
    trained = scale_table(model, data[1], spec.n_target)
    log(f"  trained: {json.dumps(trained)}")
    ev = evaluate(model, data[1])
    log(
        f"racnn: test acc {ev['acc']:.3f}, {stats['train_s_per_sample'] * 1e3:.1f} ms/sample "
        f"train, {ev['bytes_per_sample']:,.0f} B/sample read ({stats['epochs']} epochs)"
    )
    return dict(
        init=init,
        trained=trained,
        acc=ev["acc"],
        hit_rate=ev["hit_rate"],
        bytes_per_sample=ev["bytes_per_sample"],
        canvas_bytes=setup.canvas**2,
        **stats,
        setup=asdict(setup),
    )


def parse(argv: list[str] | None) -> tuple[Setup, bool]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Setup()
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="CPU seconds of training")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train", type=int, default=d.n_train, help="training canvases")
    p.add_argument("--test", type=int, default=d.n_test, help="test canvases")
    p.add_argument(
        "--track",
        type=int,
        default=200,
        help="test accuracy on this many test canvases after each epoch (not timed)",
    )
    p.add_argument("--model-kwargs", default="{}", help="JSON: keyword arguments of racnn_mnist")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a = p.parse_args(argv)
    setup = Setup(
        budget_s=a.budget_s,
        seed=a.seed,
        n_train=a.train,
        n_test=a.test,
        track=a.track,
        models=("racnn",),
        model_kwargs={"racnn": json.loads(a.model_kwargs)},
    )
    return setup, a.json


def main(argv: list[str] | None = None) -> int:
    setup, as_json = parse(argv)
    report = run(setup, log=(lambda m: print(m, file=sys.stderr, flush=True)) if as_json else print)
    if as_json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
