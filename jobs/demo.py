"""``make demo``: sample data -> pyramids -> Ray head -> ``ray job submit`` training -> registry.

1. generate a small fMoW-layout sample (``pipeline.synth.demo``) under ``data/demo/raw``;
2. ingest it into pyramids + manifest under ``data/demo/pyramids`` (resumable: a re-run skips
   what is there);
3. start a Ray head from this virtual environment on 127.0.0.1 (temp files in ``ray_tmp/``);
4. ``ray job submit --working-dir . -- python jobs/train_fmow.py --config
   jobs/configs/fmow_demo.yaml --register fmow-demo`` (the uploaded working dir stays small:
   ``.gitignore`` and ``.rayignore`` keep data, runs and the venv out);
5. print the validation accuracy, bytes read per sample against the bytes of the whole scenes,
   and where the MLflow run and the registered model are;
6. stop the Ray head it started (only that one: by its process group, never ``ray stop``).

Output: the demo's own lines, the ingest's progress, the job's lines (one per epoch) and the
summary; Ray's INFO lines (the CLI's and the job's) only with ``--verbose``.

    python jobs/demo.py [--train 200] [--val 200] [--epochs N] [--seed S] [--set KEY=VALUE]
        [--verbose]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.stack.ray_cluster import ray_env, start_head, stop_head
from pipeline.synth.demo import DEMO_SPEC
from pipeline.train.config import TrainConfig, load_job_config
from pipeline.train.driver import write_token_file

ROOT = Path(__file__).resolve().parents[1]

VENV_BIN = Path(sys.executable).parent
DATA = ROOT / "data" / "demo"
CONFIG = ROOT / "jobs" / "configs" / "fmow_demo.yaml"
REGISTER = "fmow-demo"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def make_data(train: int, val: int) -> str:
    """Sample + ingest (each skipped when already complete); returns the manifest path."""
    from pipeline.synth.demo import make_demo_data

    spec = dataclasses.replace(DEMO_SPEC, splits=(("train", train), ("val", val)))
    return make_demo_data(DATA, spec, workers=2, say=say).manifest


RAY_INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|SUCC)\s")
"""An INFO line of Ray's own loggers (the CLI's and the job manager's), record style."""


def submit(address: str, manifest: str, epochs: int | None, sets: list[str],
           env: dict[str, str], verbose: bool = False) -> TrainConfig:
    """``ray job submit`` the training job (its output streams through, without Ray's INFO
    lines unless ``verbose``; no colour codes unless stdout is a terminal); returns its config.

    The job's result is then read where it is recorded, in MLflow (``find_run``), not parsed
    out of the job's output.
    """
    from pipeline.track.tracking import default_tracking_uri

    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": default_tracking_uri(), "OMP_NUM_THREADS": "1"}}
    # a new run name each time: re-using one would resume (and end) the previous demo run
    name = time.strftime("fmow-demo-%Y%m%d-%H%M%S")
    sets = [f"data.manifest={manifest}", f"run.storage_path={ROOT / 'runs'}", f"run.name={name}",
            *sets]
    if epochs:
        sets.append(f"optim.epochs={epochs}")
    config = load_job_config(CONFIG, sets, REGISTER)
    color = "auto" if sys.stdout.isatty() else "false"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--log-style", "record", "--log-color", color,
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/train_fmow.py", "--config", str(CONFIG.relative_to(ROOT)),
           *[x for s in sets for x in ("--set", s)], "--register", REGISTER,
           *(["--verbose"] if verbose else [])]
    say("submitting: " + " ".join(cmd[:8]) + " ... -- python jobs/train_fmow.py --config "
        + str(CONFIG.relative_to(ROOT)) + f" --register {REGISTER}")
    status = _run_filtered(cmd, env, None if verbose else RAY_INFO_LINE)
    if status != 0:
        raise RuntimeError(f"the training job failed (ray job submit exited {status})")
    return config


def _run_filtered(cmd: list[str], env: dict[str, str], drop: re.Pattern | None) -> int:
    """Run ``cmd`` in the work tree, its output (stdout and stderr) to our stdout without the
    lines matching ``drop``; its exit status."""
    if drop is None:
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode
    with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            if not drop.match(line):
                print(line, end="", flush=True)
    return proc.returncode


def find_run(config: TrainConfig) -> dict:
    """The finished run as MLflow recorded it: found by its run key tag, with the registered
    version behind ``REGISTER@champion``."""
    from pipeline.track import tracking

    runs = tracking.runs_with_key(config.run.run_key, config.run.mlflow_experiment)
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run tagged {config.run.run_key!r} in experiment "
                           f"{config.run.mlflow_experiment!r}, found {len(runs)}")
    run = tracking.run_info(runs[0])
    run["registered_version"] = tracking.alias_version(None, REGISTER, config.run.register_alias)
    return run


def level0_stored_bytes() -> float:
    """Mean bytes of the level-0 arrays in the demo store: what a full-resolution CNN reads."""
    from pipeline.store import storage
    from pipeline.store.manifest import read_manifest

    uris = list(read_manifest(str(DATA / "pyramids" / "manifest.parquet")).to_pandas()["uri"])
    total = sum(len(storage.read_bytes(u)) for uri in uris
                for u in storage.list_prefix(storage.join_uri(uri, "0")))
    return total / max(len(uris), 1)


def report(config: TrainConfig, run: dict) -> None:
    from pipeline.store.manifest import read_classes, read_manifest
    from pipeline.track.tracking import default_tracking_uri
    from pipeline.train.driver import full_scene_bytes

    m = run["metrics"]
    classes = read_classes(config.data.manifest)
    chance = 1 / len(classes)
    read = m["train/bytes_per_sample"]
    full = full_scene_bytes(read_manifest(config.data.manifest), config.data.train_split)
    stored = level0_stored_bytes()
    print()
    say(f"validation accuracy: {m['val/accuracy']:.3f} (chance {chance:.3f}, "
        f"{len(classes)} classes: {', '.join(classes)})")
    say(f"bytes read per training sample: {read:,.0f} (patches; the view is read once) vs a "
        f"whole scene at full resolution: {stored:,.0f} stored (zstd) = {stored / max(read, 1):.0f}x"
        f" more, {full:,.0f} raw uint8 = {full / max(read, 1):.0f}x more")
    say(f"throughput {m['train/samples_per_s']:.1f} samples/s, data wait "
        f"{100 * m['train/data_wait_fraction']:.0f}% of step time")
    say(f"MLflow: run {run['run_id']} at {default_tracking_uri()} "
        f"(mlflow ui --backend-store-uri {default_tracking_uri()})")
    say(f"model: {run['tags'].get('pipeline.model_uri')}, registered as "
        f"models:/{REGISTER}@{config.run.register_alias} (version {run['registered_version']})")
    say(f"checkpoints: {config.run.run_key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    splits = dict(DEMO_SPEC.splits)
    parser.add_argument("--train", type=int, default=splits["train"], help="train scenes")
    parser.add_argument("--val", type=int, default=splits["val"], help="validation scenes")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=None,
                        help="run.seed: model initialisation, sampling and data order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other override of the training config (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's INFO lines too (the CLI's, the job's, Ray Data's, Ray Train's)")
    args = parser.parse_args(argv)
    sets = list(args.overrides) + ([f"run.seed={args.seed}"] if args.seed is not None else [])
    start = time.monotonic()
    manifest = make_data(args.train, args.val)
    say(f"data ready in {time.monotonic() - start:.0f} s")
    token = write_token_file(ROOT / "ray_tmp")
    env = ray_env(token)
    head, address = start_head(ROOT / "ray_tmp" / "demo", env)
    try:
        config = submit(address, manifest, args.epochs, sets, env, args.verbose)
    finally:
        stop_head(head)
        shutil.rmtree(token.parent, ignore_errors=True)
    report(config, find_run(config))
    say(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
