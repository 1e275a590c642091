"""Predict every scene of a manifest with a registered model, as a Ray Data job.

    python jobs/batch_predict.py --model models:/fmow-ats@champion \\
        --manifest data/pyramids/manifest.parquet --out predictions.parquet \\
        [--split all|train|val|test] [--batch-size 8] [--concurrency 2] [--seed 0] \\
        [--tracking-uri URI]

Writes one Parquet row per manifest row (``pipeline.infer.batch.PREDICTION_SCHEMA``: scene,
true label, predicted class and probabilities, bytes read, the model version, an ``error`` for a
scene that could not be read), prints progress, a summary line and, last, one JSON object
``{"predictions", "predicted_scenes", "failed_scenes", "accuracy", "bytes_per_scene", ...}``.
``--manifest`` and ``--out`` may be ``s3://`` URIs (the ``AWS_*`` variables, ``AWS_ENDPOINT_URL``
for a local server). Without a cluster it starts a private local Ray on 127.0.0.1; under ``ray
job submit`` (``RAY_ADDRESS`` set) it joins that cluster. Tracking URI: ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else the work tree's ``mlflow.db``.

Exit: 0 when at least one scene was predicted (failed scenes are in the file), 1 when every
scene failed or the model or manifest could not be read, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION")
    parser.add_argument("--manifest", required=True, help="URI of manifest.parquet")
    parser.add_argument("--out", required=True, help="URI of the .parquet file to write")
    parser.add_argument("--split", default="all", help="manifest split to predict (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per forward pass")
    parser.add_argument("--concurrency", type=int, default=2, help="Ray actors (model copies)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's sampling")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: see above)")
    parser.add_argument("--ray-temp-dir", type=Path, default=ROOT / "ray_tmp",
                        help="temp dir of a local Ray instance started by this job")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's and Ray Data's INFO lines too (off by default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Predict and write the table; see the module docstring for the exit codes."""
    args = parse_args(argv)
    from pipeline.infer import batch

    try:
        spec = batch.BatchPredictSpec(
            model=args.model, manifest=args.manifest, out=args.out, split=args.split,
            batch_size=args.batch_size, concurrency=args.concurrency, seed=args.seed,
            tracking_uri=args.tracking_uri, cpus_per_actor=args.cpus_per_actor)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        job = batch.prepare(spec)  # model and manifest checked before Ray starts
        from pipeline.train.driver import ray_output, start_ray

        cpus = math.ceil(spec.concurrency * spec.cpus_per_actor) + 1
        import ray

        connected = ray.is_initialized()
        output = ray_output(args.verbose)  # Ray's and Ray Data's INFO lines off by default
        start_ray(temp_dir=args.ray_temp_dir, num_cpus=max(os.cpu_count() or 1, cpus),
                  logging_level=output.level)
        try:
            summary = batch.run(job)
        finally:  # a Ray this job started does not outlive it (tests call main in-process)
            if not connected:
                ray.shutdown()
    except Exception as err:  # Ray wraps actor errors; say what failed and keep the exit code
        print(f"error: batch prediction with {args.model} failed: {err}", file=sys.stderr)
        return 1
    print(summary.line(), flush=True)
    print(json.dumps(summary.as_json()), flush=True)
    return 0 if summary.predicted_scenes else 1


if __name__ == "__main__":
    sys.exit(main())
