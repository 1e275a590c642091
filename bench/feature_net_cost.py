"""CPU cost of a patch feature net, forward + backward, against ATS's own (16, 32, 64)
``small_cnn``: how many times its cost each soft-attention variant adds.

    python bench/feature_net_cost.py [--patches 80] [--side 24] [--rounds 30] [--json]

One torch thread; ``--patches`` patches of ``--side`` px (the learning benchmark's 10 patches
of 8 canvases, read as 24 px); every round times each net once, in turn, so the machine's
changing load falls on all of them alike. Prints each net's CPU seconds over the rounds
divided by ``small_cnn``'s, and its parameter count; with ``--json`` the last line is one JSON
object ``{"ratio": {...}, "params": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.backbones import build_backbone

_WIDTHS = {"widths": (16, 32, 64)}
# name -> (backbone, keyword arguments); the first is the reference
NETS = {
    "small_cnn": ("small_cnn", _WIDTHS),
    "small_cnn+se": ("small_cnn", {**_WIDTHS, "se": True}),
    "small_cnn+cbam": ("small_cnn", {**_WIDTHS, "cbam": True}),
    "small_cnn+soft_mask": ("small_cnn", {**_WIDTHS, "mask": True}),
    "residual_attention_patch": ("residual_attention_patch", {}),
}


def measure(patches: int, side: int, rounds: int) -> dict:
    """CPU seconds of forward + backward per net, interleaved over ``rounds``, as ratios to
    the first net, and each net's parameter count."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = {name: build_backbone(b, 1, **kw) for name, (b, kw) in NETS.items()}
    x = torch.rand(patches, 1, side, side)
    seconds = dict.fromkeys(nets, 0.0)
    for _ in range(rounds):
        for name, net in nets.items():
            start = time.process_time()
            net(x).mean().backward()
            seconds[name] += time.process_time() - start
    first = seconds[next(iter(nets))]
    return dict(
        ratio={name: s / first for name, s in seconds.items()},
        params={name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=80)
    p.add_argument("--side", type=int, default=24)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a = p.parse_args(argv)
    report = measure(a.patches, a.side, a.rounds)
    for name, ratio in report["ratio"].items():
        print(f"{name:<26}{ratio:6.2f}x  {report['params'][name]:>8,} parameters")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
