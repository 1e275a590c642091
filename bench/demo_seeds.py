"""The demo's training on several seeds: does it learn every time?

    python bench/demo_seeds.py [--seeds 0,1,2,3,4] [--config jobs/configs/fmow_demo.yaml]
        [--set KEY=VALUE ...] [--json]

Makes the demo's data (``pipeline.synth.demo``, skipped when already under ``data/demo``),
starts one private local Ray (loopback only) and runs the demo's training
(``pipeline.train.driver.run_training``, 2 CPU workers as in ``make demo``) once per seed with
``run.seed`` set, which fixes model initialisation, sampling and the data order. Each run is
an MLflow run of the experiment ``demo-seeds``. Prints one line per seed; with ``--json`` the
last line is one JSON object::

    {"val_accuracy": [...], "val_scenes": n, "min": x, "median": y, "max": z,
     "bytes_per_sample": b, "full_scene_bytes": f, "seconds": s, "seconds_per_seed": [...]}

``bytes_per_sample`` is the mean over seeds of the last epoch's bytes read per training
sample; ``full_scene_bytes`` the mean uint8 bytes of a whole level-0 scene of the train split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run seeds")
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "fmow_demo.yaml")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo", help="the demo's data root")
    p.add_argument("--manifest", default="", help="train on this manifest instead of the demo's data")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="checkpoints (run.storage_path)")
    p.add_argument("--ray-temp-dir", type=Path, default=ROOT / "ray_tmp" / "seeds",
                   help="temp dir of the private Ray (its socket paths must stay under 107 bytes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    return p.parse_args(argv)


def run_seed(args: argparse.Namespace, manifest: str, seed: int, stamp: str) -> dict:
    """One training run of the demo config with ``run.seed = seed``; its figures."""
    from pipeline.train.config import load_config
    from pipeline.train.driver import run_training

    sets = [f"data.manifest={manifest}", f"run.seed={seed}", f"run.name=demo-seed{seed}-{stamp}",
            f"run.storage_path={args.runs}", "run.mlflow_experiment=demo-seeds",
            *args.overrides]
    start = time.monotonic()
    outcome = run_training(load_config(args.config, sets), ray_temp_dir=args.ray_temp_dir)
    m = outcome.metrics
    return {"seed": seed, "val_accuracy": m["val/accuracy"], "train_accuracy": m["train/accuracy"],
            "bytes_per_sample": m["train/bytes_per_sample"],
            "full_scene_bytes": outcome.full_scene_bytes_per_sample,
            "seconds": time.monotonic() - start}


def main(argv: list[str] | None = None) -> int:
    import ray

    from pipeline.store.manifest import read_manifest
    from pipeline.synth.demo import make_demo_data

    args = parse(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.monotonic()
    manifest = args.manifest or make_demo_data(
        args.data, say=lambda m: print(f"[seeds] {m}", file=sys.stderr)).manifest
    table = read_manifest(manifest).to_pandas()
    val_scenes = int((table["split"] == "val").sum())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    try:
        for seed in seeds:
            rows.append(run_seed(args, manifest, seed, stamp))
            r = rows[-1]
            print(f"[seeds] seed {seed}: val accuracy {r['val_accuracy']:.3f} (train "
                  f"{r['train_accuracy']:.3f}), {r['bytes_per_sample']:,.0f} B/sample, "
                  f"{r['seconds']:.0f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    acc = [r["val_accuracy"] for r in rows]
    summary = {
        "val_accuracy": acc, "val_scenes": val_scenes, "seeds": seeds,
        "min": min(acc), "median": statistics.median(acc), "max": max(acc),
        "train_accuracy": [r["train_accuracy"] for r in rows],
        "bytes_per_sample": statistics.fmean(r["bytes_per_sample"] for r in rows),
        "full_scene_bytes": rows[0]["full_scene_bytes"],
        "seconds": time.monotonic() - start,
        "seconds_per_seed": [round(r["seconds"], 1) for r in rows],
    }
    print(f"[seeds] val accuracy over {len(seeds)} seeds ({val_scenes} val scenes): min "
          f"{summary['min']:.3f}, median {summary['median']:.3f}, max {summary['max']:.3f}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
