"""How the demo config learns in one process: train and validation accuracy per epoch.

    python bench/demo_learning.py [--manifest data/demo/pyramids/manifest.parquet]
        [--config jobs/configs/fmow_demo.yaml] [--seed 0] [--epochs 45] [--batch 12]
        [--no-read-ahead] [--set KEY=VALUE] [--json]

The per-worker loop of ``pipeline.train.loop`` without Ray: one worker with the demo's global
batch (2 workers x 6 = 12), every scene's pyramid in memory, the epoch order and sampling
seeded by ``--seed``. Two runs that differ only in ``--no-read-ahead`` (or in a ``--set``)
see the same data in the same order, which the 2-worker Ray demo does not (its split depends
on timing), so this is the place to compare settings. Loading every level of the demo's 260
scenes into memory takes several minutes on 2 cores; a 45-epoch run about 10. Each epoch
prints train accuracy, validation accuracy and the mean |log(a/q)| of the draws read ahead;
with ``--json`` the last line is one JSON object with those per epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def batches(rows: dict, views: np.ndarray, order: np.ndarray, size: int) -> list[dict]:
    """``rows`` (``SplitData.rows``) and their views in ``order``, in batches of ``size``."""
    return [{"key": rows["key"][order[i:i + size]], "view": views[order[i:i + size]],
             "size": rows["size"][order[i:i + size]], "label": rows["label"][order[i:i + size]]}
            for i in range(0, len(order), size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(ROOT / "data" / "demo" / "pyramids" / "manifest.parquet"))
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "fmow_demo.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--batch", type=int, default=12, help="scenes per optimiser step")
    parser.add_argument("--no-read-ahead", dest="read_ahead", action="store_false")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from bench.train_throughput import memory_source
    from models.registry import create_model
    from pipeline.read.source import open_split
    from pipeline.train.config import load_config
    from pipeline.train.driver import resolve_config
    from pipeline.train.loop import StepRunner, cosine_schedule, evaluate, train_epoch

    train_split = open_split(args.manifest, "train")  # its reader is unused: scenes in memory
    classes = list(train_split.classes)
    config = resolve_config(load_config(args.config, args.set), classes)
    epochs = args.epochs or config.optim.epochs
    train, val = train_split.rows, train_split.sibling("val").rows
    source = memory_source(list(train["key"]) + list(val["key"]))
    torch.manual_seed(args.seed)
    model = create_model(config.model.name, **config.model.overrides)
    train_views = source.view(list(train["key"]), model.view_size).numpy()
    val_views = source.view(list(val["key"]), model.view_size).numpy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    steps = -(-len(train["key"]) // args.batch)
    runner = StepRunner(
        model=model, optimizer=optimizer, source=source,
        scheduler=cosine_schedule(optimizer, steps * epochs) if config.optim.scheduler == "cosine" else None,
        micro_batches=config.data.micro_batches, ramp=config.data.ramp_micro_batches,
        clip_norm=config.optim.clip_norm, generator=torch.Generator().manual_seed(args.seed + 1),
        read_ahead=args.read_ahead)
    history = []
    for epoch in range(epochs):
        order = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(train["key"]))
        t = train_epoch(runner, batches(train, train_views, order, args.batch), epoch).metrics("train")
        v = evaluate(runner, batches(val, val_views, np.arange(len(val["key"])), args.batch),
                     seed=epoch, num_classes=len(classes)).metrics("val")
        row = {"epoch": epoch + 1, "train_accuracy": t["train/accuracy"],
               "val_accuracy": v["val/accuracy"],
               "abs_log_ratio": t.get("train/read_ahead_abs_log_ratio", 0.0)}
        history.append(row)
        print(f"epoch {epoch + 1}/{epochs}: train acc {row['train_accuracy']:.3f} | val acc "
              f"{row['val_accuracy']:.3f} | read-ahead |log(a/q)| {row['abs_log_ratio']:.4f}", flush=True)
    if args.json:
        print(json.dumps({"seed": args.seed, "read_ahead": args.read_ahead, "sets": args.set,
                          "history": history}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
