"""Train an attention-sampling model on an ingested fMoW-layout manifest with Ray Train.

    python jobs/train_fmow.py --config jobs/configs/fmow_ats.yaml [--set optim.epochs=3 ...]
        [--register fmow-demo [--alias champion]] [--json] [--verbose]

Without a cluster it starts a private local Ray instance on 127.0.0.1 (temp files under
``ray_tmp/``); under ``ray job submit`` (``RAY_ADDRESS`` set) or with ``--set
run.ray_address=HOST:PORT`` it joins that cluster. Re-running with the same ``run.name`` and
``run.storage_path`` resumes from the last checkpoint and continues the same MLflow run.

Output: start and finish lines, a step count with rate and ETA during the first epoch, one line
per epoch from rank 0, the summary; Ray's own INFO lines only with ``--verbose``
(``pipeline.train.driver.ray_output``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pipeline.train.config import ConfigError, load_job_config

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file overriding the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--register", metavar="NAME", help="register the final model under NAME")
    parser.add_argument("--alias", help="alias of the registered version (default: run.register_alias)")
    parser.add_argument("--ray-temp-dir", type=Path, default=ROOT / "ray_tmp",
                        help="temp dir of a local Ray instance started by this job")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--verbose", action="store_true", help="Ray's, Ray Data's and Ray Train's INFO lines too")
    return parser.parse_args(argv)


def _stopped(signum: int, frame) -> None:
    """SIGTERM (``ray job stop``) ends the job like Ctrl-C: its MLflow run is marked KILLED."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Train; 0 on success, 2 on a bad config, 1 when training failed (128 + 15 when stopped
    with SIGTERM)."""
    args = parse_args(argv)
    if __name__ == "__main__":  # run as the job's script, not imported by a test
        signal.signal(signal.SIGTERM, _stopped)
    try:
        config = load_job_config(args.config, args.overrides, args.register, args.alias)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from pipeline.train.driver import run_training

    try:
        outcome = run_training(config, ray_temp_dir=args.ray_temp_dir, verbose=args.verbose)
    except Exception as err:  # Ray wraps worker errors; say what failed and keep the exit code
        import traceback

        traceback.print_exc()  # where it failed (a bare "[Errno 2]" says nothing of where)
        print(f"error: training run {config.run.name!r} failed: {err}", file=sys.stderr)
        return 1
    m = outcome.metrics
    print(f"run {config.run.name}: val accuracy {m.get('val/accuracy', float('nan')):.3f} "
          f"(chance {1 / max(len(outcome.classes), 1):.3f}), train loss {m.get('train/loss', float('nan')):.3f}")
    print(f"bytes read per sample: {m.get('train/bytes_per_sample', 0):,.0f} "
          f"vs {outcome.full_scene_bytes_per_sample:,.0f} for the full scenes "
          f"({outcome.full_scene_bytes_per_sample / max(m.get('train/bytes_per_sample', 0), 1):.1f}x less)")
    print(f"checkpoint: {outcome.checkpoint_dir}")
    print(f"MLflow run: {outcome.run_id}  model: {outcome.model_uri}"
          + (f"  registered: {config.run.register_name} v{outcome.registered_version} "
             f"@{config.run.register_alias}" if outcome.registered_version else ""))
    if args.json:
        print(json.dumps({
            "run": config.run.name, "run_id": outcome.run_id, "model_uri": outcome.model_uri,
            "registered_version": outcome.registered_version, "metrics": m,
            "classes": outcome.classes, "checkpoint": outcome.checkpoint_dir,
            "full_scene_bytes_per_sample": outcome.full_scene_bytes_per_sample,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
