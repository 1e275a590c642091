"""Scheduled retraining: train a candidate, promote it only if it beats the champion.

    python jobs/retrain.py --config infra/configs/fmow_ats_local.yaml --register fmow-demo \\
        [--alias champion] [--margin 0.01] [--metric accuracy] [--set key=value ...] [--json] [--verbose]

Each invocation is a new training run named ``<run.name>-retrain-<UTC timestamp>`` (so it never
resumes a previous run; ``--run-name`` overrides) registered as a new version of ``--register``
with the alias ``candidate``. The candidate and the current ``@champion`` are then evaluated on
the same validation split (``data.val_split`` of the manifest, same sampling seed) and the
candidate takes ``@champion`` only when it wins by more than ``--margin``
(``pipeline.track.promotion``). The decision is recorded as ``retrain.*`` tags on the new version and
on its MLflow run. Exit code 0 whether promoted or not; 1 if training or evaluation failed;
2 on a bad config. ``infra/cron/retrain.cron`` and ``infra/k8s/retrain-cronjob.yaml`` run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from pipeline.train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="YAML training config (see jobs/configs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable)",
    )
    parser.add_argument("--register", metavar="NAME", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias that the winner holds")
    parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="the candidate must beat the champion by more than this (metric units)",
    )
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "loss"])
    parser.add_argument("--run-name", help="training run name (default: <run.name>-retrain-<ts>)")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per evaluation batch")
    parser.add_argument("--ray-temp-dir", type=Path, default=ROOT / "ray_tmp")
    parser.add_argument("--json", action="store_true", help="print the decision as JSON last")
    parser.add_argument("--verbose", action="store_true", help="Ray's, Ray Data's and Ray Train's INFO lines too")
    return parser.parse_args(argv)


def retrain_config(config: TrainConfig, name: str, run_name: str | None) -> TrainConfig:
    """The training config of one retraining: a fresh run name, registered as ``candidate``."""
    from pipeline.track.promotion import CANDIDATE_ALIAS

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run = dataclasses.replace(
        config.run,
        name=run_name or f"{config.run.name}-retrain-{stamp}",
        register_name=name,
        register_alias=CANDIDATE_ALIAS,
    )
    return dataclasses.replace(config, run=run)


def validation_evaluator(config: TrainConfig, batch_size: int):
    """``evaluate_fn`` scoring registered models on the config's validation split."""
    from pipeline.read.source import open_split
    from pipeline.track.promotion import registered_evaluator

    val = open_split(config.data.manifest, config.data.val_split, config.reader, config.data.limit)
    return registered_evaluator(
        val.source_factory(),
        val.keys,
        val.labels,
        batch_size=batch_size,
        seed=config.run.seed,
    )


def main(argv: list[str] | None = None) -> int:
    """Retrain and maybe promote; 0 on a decision, 1 on a failure, 2 on a bad config."""
    args = parse_args(argv)
    try:
        config = retrain_config(
            load_config(args.config, args.overrides), args.register, args.run_name
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from pipeline.track.promotion import retrain
    from pipeline.train.driver import run_training

    try:
        decision = retrain(
            lambda: run_training(config, ray_temp_dir=args.ray_temp_dir, verbose=args.verbose),
            validation_evaluator(config, args.batch_size),
            args.register,
            alias=args.alias,
            margin=args.margin,
            metric=args.metric,
            experiment=config.run.mlflow_experiment,
        )
    except Exception as err:
        print(f"error: retraining run {config.run.name!r} failed: {err}", file=sys.stderr)
        return 1
    champion = (
        f"v{decision.champion_version} {decision.metric}={decision.champion_score:.4f}"
        if decision.champion_version
        else "none"
    )
    verdict = "PROMOTED" if decision.promoted else "kept the champion"
    print(
        f"{args.register}: candidate v{decision.candidate_version} "
        f"{decision.metric}={decision.candidate_score:.4f} vs champion {champion}: {verdict} "
        f"({decision.reason})"
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(decision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
