"""``make stack-demo``: the demo on the production stack (S3, PostgreSQL + MLflow, two Ray nodes).

1. bring the stack up (``pipeline.stack.stack``; or use the one recorded running in
   ``--state-dir``);
2. generate the demo's fMoW-layout sample locally (``pipeline.synth.demo.DEMO_SPEC``);
3. ``ray job submit`` the ingest into ``s3://pyramids/stack-demo/<sample>/`` (resumable);
4. ``ray job submit`` the training (``jobs/configs/fmow_demo.yaml``) with checkpoints in
   ``s3://checkpoints/stack-demo``, 2 workers spread over both nodes (``scaling.
   placement_strategy=SPREAD``; the state API tells on which nodes the workers ran) and
   ``--register NAME`` (alias ``@champion``);
5. ``ray job submit`` one scheduled retraining (``jobs/retrain.py``: promote or keep;
   skipped with ``--retrain-epochs 0``);
6. ``ray job submit`` batch inference with the champion (``jobs/batch_predict.py``) into
   ``s3://pyramids/predictions/<stamp>.parquet``;
7. print one JSON object as the last line, and stop the stack unless ``--keep`` (a stack that
   was already running is left running).

Every job gets the stack's client environment (MLflow server, S3 endpoint and keys) through
its runtime environment, and ``ray job submit`` the cluster's token. ``--two-jobs`` submits
steps 3-4 as one Ray job and 5-6 as a second (``sh -c 'python jobs/ingest_fmow.py ... &&
python jobs/train_fmow.py ...'``): the same job files on the same servers, two jobs' start-up
instead of four (the tiny test, ``tests/pipeline/stack/test_stack_tiny.py``, runs it). Not one
job: each ``python`` step that joins the cluster is a Ray driver of its own, and the jobs API
names only the last driver of a submission, so the state API could not tell which training
workers were the training's.

    python jobs/stack_demo.py [--train N] [--val N] [--epochs E] [--retrain-epochs R]
        [--two-jobs] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.stack import stack as stack_mod
from pipeline.stack.ray_cluster import VENV_BIN, job_actor_nodes, ray_env
from pipeline.synth.demo import DEMO_COARSEST, DEMO_SPEC

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/fmow_demo.yaml"
JOB_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def say(message: str) -> None:
    print(f"[stack-demo] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    splits = dict(DEMO_SPEC.splits)
    parser.add_argument("--train", type=int, default=splits["train"], help="train scenes")
    parser.add_argument("--val", type=int, default=splits["val"], help="validation scenes")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (config: 20)")
    parser.add_argument("--retrain-epochs", type=int, default=5,
                        help="epochs of the retraining (0: no retraining)")
    parser.add_argument("--register", default="fmow-stack", help="registered model name")
    parser.add_argument("--state-dir", type=Path, default=stack_mod.DEFAULT_STATE_DIR)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "stack-demo",
                        help="where the raw sample is generated")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra training overrides (repeatable)")
    parser.add_argument("--two-jobs", action="store_true",
                        help="ingest and training as one Ray job, retraining and batch "
                             "inference as a second")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    return parser.parse_args(argv)


def make_raw(root: Path, train: int, val: int) -> tuple[Path, str]:
    """The demo sample under ``root/raw-<fingerprint>``, generated once."""
    from pipeline.synth.demo import demo_raw_once

    return demo_raw_once(root, train, val, say)


def job_command(*steps: list[str]) -> list[str]:
    """The job's entrypoint for ``ray job submit --``: ``python STEP`` for one step; for
    several, ``sh -c 'python STEP1 && python STEP2 ...'`` (Ray quotes the words it is given,
    so the ``&&`` must be inside one ``sh -c`` word): the job fails at the first step that
    fails."""
    if len(steps) == 1:
        return ["python", *steps[0]]
    return ["sh", "-c", " && ".join(shlex.join(["python", *step]) for step in steps)]


def submit(stack: stack_mod.Stack, name: str, *steps: list[str]) -> list[str]:
    """``ray job submit`` the job running ``steps`` (``job_command``) to the stack (its output
    streams through); returns the output lines. Raises RuntimeError when the job fails."""
    env = ray_env(Path(stack.env["RAY_AUTH_TOKEN_PATH"]))
    runtime_env = stack.runtime_env()
    entrypoint = job_command(*steps)
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", stack.env["RAY_ADDRESS"],
           "--submission-id", name, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    say(f"ray job submit --submission-id {name} -- {shlex.join(entrypoint)}")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if proc.wait() != 0:
        raise RuntimeError(f"job {name} failed (ray job submit exited {proc.returncode})")
    say(f"job {name} done in {time.monotonic() - start:.0f} s")
    return lines


def last_json(lines: list[str], key: str) -> dict:
    """The last output line that is a JSON object holding ``key``."""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("{") and key in text:
            try:
                found = json.loads(text)
            except ValueError:
                continue
            if key in found:
                return found
    raise RuntimeError(f"no JSON line with {key!r} in the job's output")


def ingest_step(raw: Path, tag: str) -> tuple[list[str], str]:
    """The ingest into ``s3://pyramids/stack-demo/<tag>``: its argv and the manifest URI."""
    dst = f"s3://pyramids/stack-demo/{tag}"
    return (["jobs/ingest_fmow.py", "--src", str(raw), "--dst", dst, "--workers", "2",
             "--coarsest", str(DEMO_COARSEST)], f"{dst}/manifest.parquet")


def train_sets(manifest: str, epochs: int | None, extra: list[str]) -> list[str]:
    sets = [f"data.manifest={manifest}", "run.storage_path=s3://checkpoints/stack-demo",
            "scaling.placement_strategy=SPREAD", *extra]
    return sets + ([f"optim.epochs={epochs}"] if epochs else [])


def train_step(manifest: str, args, stamp: str) -> list[str]:
    """The training (``--register NAME``, alias ``@champion``)."""
    sets = train_sets(manifest, args.epochs, [f"run.name=stack-demo-{stamp}", *args.overrides])
    return ["jobs/train_fmow.py", "--config", CONFIG, *[x for s in sets for x in ("--set", s)],
            "--register", args.register, "--json"]


def retrain_step(manifest: str, args, stamp: str) -> list[str]:
    """One scheduled retraining (promote or keep)."""
    sets = train_sets(manifest, args.retrain_epochs,
                      [f"run.name=stack-demo-{stamp}", *args.overrides])
    return ["jobs/retrain.py", "--config", CONFIG, "--register", args.register,
            *[x for s in sets for x in ("--set", s)], "--json"]


def predict_step(manifest: str, model: str, stamp: str) -> tuple[list[str], str]:
    """Batch inference into ``s3://pyramids/predictions/<stamp>.parquet``: argv and URI."""
    out = f"s3://pyramids/predictions/stack-demo-{stamp}.parquet"
    return ["jobs/batch_predict.py", "--model", model, "--manifest", manifest, "--out", out], out


def train_worker_nodes(stack, job: str) -> int:
    """How many nodes hosted a training worker of the job submitted as ``job``."""
    nodes = job_actor_nodes(stack.endpoints["ray_dashboard"],
                            Path(stack.env["RAY_AUTH_TOKEN_PATH"]), job, "RayTrainWorker")
    say(f"training workers ran on {len(nodes)} node(s): {sorted(n[:8] for n in nodes)}")
    return len(nodes)


def parquet_rows(uri: str) -> int:
    """Row count of the Parquet file at ``uri`` (read from S3 by this process)."""
    import io

    import pyarrow.parquet as pq

    from pipeline.store import storage

    return pq.read_metadata(io.BytesIO(storage.read_bytes(uri))).num_rows


def champion_version(name: str) -> str | None:
    """The version behind ``name@champion``, asked from the stack's MLflow server."""
    from pipeline.track import tracking

    return tracking.alias_version(None, name, "champion")


def run_steps(stack, args, stamp: str) -> dict:
    """Steps 3-6 as four jobs, or as two (``--two-jobs``); what the final JSON needs from
    them: the manifest, the training summary, the hosts of its workers, the retraining's
    decision (None without one) and the predictions' URI."""
    raw, tag = make_raw(args.data, args.train, args.val)
    ingest, manifest = ingest_step(raw, tag)
    train = train_step(manifest, args, stamp)
    retrain = retrain_step(manifest, args, stamp) if args.retrain_epochs > 0 else None
    predict, predictions = predict_step(manifest, f"models:/{args.register}@champion", stamp)
    if args.two_jobs:
        job = f"stack-demo-train-{stamp}"
        train_lines = submit(stack, job, ingest, train)
        retrain_lines = submit(stack, f"stack-demo-predict-{stamp}",
                               *[s for s in (retrain, predict) if s])
    else:
        job = f"stack-demo-train-{stamp}"
        submit(stack, f"stack-demo-ingest-{stamp}", ingest)
        train_lines = submit(stack, job, train)
        retrain_lines = submit(stack, f"stack-demo-retrain-{stamp}", retrain) if retrain else []
        submit(stack, f"stack-demo-predict-{stamp}", predict)
    return {"manifest": manifest, "summary": last_json(train_lines, "checkpoint"),
            "train_nodes": train_worker_nodes(stack, job),
            "decision": last_json(retrain_lines, "promoted") if retrain else None,
            "predictions": predictions}


def run_demo(stack, args) -> dict:
    """Steps 2-6 on a running stack; returns the final JSON object."""
    from pipeline.stack.ray_cluster import alive_nodes

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    done = run_steps(stack, args, stamp)
    summary, decision, checkpoint = done["summary"], done["decision"], done["summary"]["checkpoint"]
    return {
        "s3_endpoint": stack.endpoints["s3"], "mlflow_uri": stack.endpoints["mlflow"],
        "mlflow_backend": stack.endpoints["mlflow_backend"],
        "artifact_root": stack.endpoints["artifact_root"],
        "ray_nodes": len(alive_nodes(stack.endpoints["ray_dashboard"],
                                     Path(stack.env["RAY_AUTH_TOKEN_PATH"]))),
        "train_worker_nodes": done["train_nodes"],
        "pyramids": done["manifest"].rsplit("/", 1)[0],
        "checkpoint": checkpoint if "://" in checkpoint else f"s3://{checkpoint}",
        "registered": f"{args.register}@champion",
        "champion_version": champion_version(args.register),
        "val_accuracy": summary["metrics"].get("val/accuracy"),
        "retrain": decision and {k: decision.get(k) for k in (
            "promoted", "candidate_version", "candidate_score", "champion_score", "reason")},
        "predictions": done["predictions"], "predicted_scenes": parquet_rows(done["predictions"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    found = stack_mod.load(args.state_dir)
    reuse = found is not None and found.alive()
    if reuse:
        say(f"using the stack running from {args.state_dir}")
        stack = found
    else:
        stack = stack_mod.up(args.state_dir)
    os.environ.update({k: stack.env[k] for k in JOB_ENV})  # this process reads MLflow and S3
    ok = False
    try:
        result = run_demo(stack, args)
        ok = True
    finally:
        if not reuse and (not args.keep or not ok):
            stack_mod.down(args.state_dir)
    say(f"done in {time.monotonic() - start:.0f} s" + (" (stack left running)" if reuse or args.keep else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
