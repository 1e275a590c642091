"""Thousands of scenes: the per-scene overhead of one Ray Data training epoch at N scenes
against the same epoch at a few hundred, and a resumable ingest of the N scenes.

    python bench/many_scenes.py [--scenes 5000] [--small 200] [--work data/many]
        [--kill-at 0.3] [--reingest] [--config jobs/configs/tiny.yaml] [--set KEY=VALUE] [--json]

1. **Data**: ``--scenes`` train scenes (plus ``VAL_SCENES`` validation scenes) from the fMoW
   sample generator (``pipeline.synth.fmow_sample``) at ``MANY_SPEC``: 192-256 px a side,
   4 classes; generated once under ``<work>/raw-<N>``.
2. **Ingest** with the real job (``jobs/ingest_fmow.py``, 2 dask workers, ``--coarsest 64``:
   3 levels per scene) in a child process, killed with SIGKILL once ``--kill-at`` of the
   scenes are done (read from its progress lines), then run again to the end: the second
   run's summary says how many scenes it skipped (complete before the kill) and wrote. Both
   runs' first and last progress lines (counts, rate, ETA) are kept. A later invocation
   reuses the store and the ingest figures saved with it (``<work>/ingest-<N>.json``, with
   the time they were measured) unless ``--reingest``.
3. **Manifests**: the full one, and a ``--small`` one with a seeded random choice of the same
   train scenes and the same validation scenes (``pipeline.store.manifest.write_manifest``).
4. **Training**: one Ray instance started here (``pipeline.train.driver.start_ray``) and
   warmed up (``warm_up``: 64 views read through Ray Data, so that its worker processes
   exist before the first run), neither counted; then ``pipeline.train.driver.run_training``
   (the training job's own path: Ray Data view datasets dealt to the ranks, ``TorchTrainer``
   with 2 workers, the reader in a child process per worker) for ONE epoch on the small manifest, the full one, and the small
   one again (so that a change of the machine's load during the long run falls on both
   sizes). Same config for all: ``--config`` (default ``jobs/configs/tiny.yaml``, the
   smallest ATS: 32 px view, 4 patches of 16 px at level 1) with ``data.limit=0``,
   ``optim.epochs=1``, ``data.batch_size=8`` and ``--set`` overrides; a null tracker (no
   MLflow).

**Overhead, defined once for every run** (seconds; per-worker figures are the mean over the
workers, as ``pipeline.train.loop.EpochStats.metrics`` reports them)::

    setup    = open_s + train_datasets_s     driver: read the manifest and the split's rows;
                                             deal the rows to the ranks and build and
                                             materialise each rank's Ray Data view dataset
                                             (from_items, map_batches of the view reads)
    epoch    = train/pass_s                  a worker's training pass, first batch asked to
                                             last step done
    compute  = train/step_s - train/storage_wait_s
                                             the steps minus their wait for the reader: the
                                             model's forward, backward, gradient averaging
                                             and optimiser step
    overhead = setup + epoch - compute       = setup + Ray Data's per-batch wait
                                             (train/batch_wait_s) + the reader wait + the
                                             loop's own bookkeeping
    per_scene = overhead / train scenes

``ratio`` = per_scene at ``--scenes`` over the smaller per_scene of the two small runs (goal:
at most 1.2; a load spike in one small run, e.g. Ray Data restarting its worker processes,
cannot flatter it; ``ratio_to_mean`` uses their mean). ``marginal_per_scene_s`` =
(overhead(N) - overhead(small)) / (N - small): the cost of one more scene, with the fixed
costs cancelled out. Not counted: starting Ray (once, before the runs), Ray Train's start
and end of each fit (worker group, process group, model, the reader's child process,
validation, checkpoint: ``fit_s - pass_s``, reported as ``fit_other_s``) and the
validation datasets (the same 8 scenes in every run). The machine is shared (2 cores): read the
figures of one invocation together.

The last line with ``--json`` is one JSON object: ``scenes``, ``small``, ``ratio``,
``ratio_to_mean``, ``small_per_scene_s``, ``small_mean_per_scene_s``,
``marginal_per_scene_s``, ``per_scene_s`` (large, small runs), ``runs`` (every figure of
every run), ``ingest`` (the kill-and-resume figures) and ``command``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synth.fmow_sample import SampleSpec

ROOT = Path(__file__).resolve().parents[1]

VAL_SCENES = 8
COARSEST = 64  # px: 192-256 px scenes get 3 levels, so ATS's level-1 patches are a real read
MANY_SPEC = SampleSpec(
    splits=(("train", 5000), ("val", VAL_SCENES)),
    size_range=(192, 256),
    min_long_side=224,
    large_fraction=0.0,
    class_objects=(1, 2),
    distractors=(1, 2),
    object_sides=(24, 32),
)
"""Small scenes (0.05 Mpx): the per-scene costs of the data path, not the pixels, dominate."""
RAY_START_ATTEMPTS = 3
RAY_START_FAILED = "timed out during startup"
SETTINGS = ("data.limit=0", "optim.epochs=1", "data.batch_size=8")
PROGRESS = re.compile(
    r"\[ingest\] (\d+)/(\d+) scenes \| (\d+) written, (\d+) skipped, "
    r"(\d+) rejected \| ([\d.]+) scenes/s.*eta (\S+) s"
)
SUMMARY = re.compile(r"\[ingest\] done in ([\d.]+) s: (\d+) scenes, (\d+) written, (\d+) skipped")


def say(message: str) -> None:
    print(f"[many] {message}", flush=True)


# --------------------------------------------------------------------------- overhead (pure)


def overhead(timings: dict[str, float], metrics: dict[str, float], scenes: int) -> dict[str, float]:
    """The module docstring's figures of one run from ``TrainOutcome.timings`` (driver
    seconds) and ``TrainOutcome.metrics`` (per-worker means); ``scenes``: train scenes."""
    setup = timings["open_s"] + timings["train_datasets_s"]
    epoch = metrics["train/pass_s"]
    compute = metrics["train/step_s"] - metrics["train/storage_wait_s"]
    total = setup + epoch - compute
    return {
        "scenes": scenes,
        "setup_s": setup,
        "epoch_s": epoch,
        "compute_s": compute,
        "batch_wait_s": metrics["train/batch_wait_s"],
        "storage_wait_s": metrics["train/storage_wait_s"],
        "loop_other_s": epoch - metrics["train/step_s"] - metrics["train/batch_wait_s"],
        "overhead_s": total,
        "per_scene_s": total / scenes,
        "setup_per_scene_s": setup / scenes,
        "batch_wait_per_batch_s": metrics["train/batch_wait_s"] / max(metrics["train/steps"], 1),
        "fit_other_s": timings["fit_s"] - epoch,
    }


def compare(large: dict[str, float], smalls: list[dict[str, float]]) -> dict[str, float]:
    """``ratio``: per-scene overhead of the large run over the small run with the least (a
    load spike in one small run cannot flatter it); ``ratio_to_mean``: over the small runs'
    mean; ``marginal_per_scene_s``: the overhead of one more scene (large minus the least
    small overhead, over the extra scenes)."""
    best = min(smalls, key=lambda s: s["overhead_s"])
    mean = float(np.mean([s["per_scene_s"] for s in smalls]))
    extra = large["scenes"] - best["scenes"]
    return {
        "ratio": large["per_scene_s"] / best["per_scene_s"],
        "ratio_to_mean": large["per_scene_s"] / mean,
        "small_per_scene_s": best["per_scene_s"],
        "small_mean_per_scene_s": mean,
        "marginal_per_scene_s": (large["overhead_s"] - best["overhead_s"]) / extra,
    }


# --------------------------------------------------------------------------- data


def make_raw(work: Path, scenes: int) -> Path:
    """``scenes`` train and ``VAL_SCENES`` val scenes of ``MANY_SPEC`` under ``work/raw-N``
    (generated once: a marker file beside it)."""
    from pipeline.synth.fmow_sample import generate_sample

    raw, marker = work / f"raw-{scenes}", work / f"raw-{scenes}.complete"
    if not marker.exists():
        spec = dataclasses.replace(MANY_SPEC, splits=(("train", scenes), ("val", VAL_SCENES)))
        began = time.monotonic()
        count = sum(1 for _ in generate_sample(str(raw), spec, workers=2))
        say(f"generated {count} scenes in {raw} in {time.monotonic() - began:.0f} s")
        marker.touch()
    return raw


def small_manifest(full: str, out: str, small: int, seed: int = 0) -> str:
    """A manifest at ``out`` with ``small`` train rows of ``full`` (a seeded random choice)
    and all its other rows; same class list."""
    from pipeline.store.manifest import read_classes, read_manifest, write_manifest

    rows = read_manifest(full).to_pylist()
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    if small > len(train):
        raise ValueError(f"--small {small} is more than the {len(train)} train scenes")
    keep = set(np.random.default_rng(seed).choice(train, size=small, replace=False).tolist())
    chosen = [r for i, r in enumerate(rows) if r["split"] != "train" or i in keep]
    write_manifest(out, chosen, read_classes(full))
    return out


# --------------------------------------------------------------------------- ingest


def parse_progress(line: str) -> dict[str, Any] | None:
    """An ingest progress line's figures (done, total, written, skipped, rejected, rate in
    scenes/s, eta in s or None while unknown), or None for another line."""
    m = PROGRESS.search(line)
    if not m:
        return None
    done, total, written, skipped, rejected = (int(v) for v in m.groups()[:5])
    return {
        "done": done,
        "total": total,
        "written": written,
        "skipped": skipped,
        "rejected": rejected,
        "rate": float(m.group(6)),
        "eta_s": None if m.group(7) == "?" else float(m.group(7)),
        "line": line.strip(),
    }


def parse_summary(text: str) -> dict[str, Any]:
    """The ingest summary's seconds, scenes, written and skipped (``ValueError`` if absent)."""
    m = SUMMARY.search(text)
    if not m:
        raise ValueError(f"no ingest summary in: {text[-500:]}")
    return {
        "seconds": float(m.group(1)),
        "scenes": int(m.group(2)),
        "written": int(m.group(3)),
        "skipped": int(m.group(4)),
    }


def ingest_run(raw: Path, dst: Path, kill_at: float | None) -> dict[str, Any]:
    """``jobs/ingest_fmow.py`` in a child process; with ``kill_at``, SIGKILL once that share
    of the scenes is done. Its progress lines, exit status and (finished) summary."""
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "ingest_fmow.py"),
        "--src",
        str(raw),
        "--dst",
        str(dst),
        "--coarsest",
        str(COARSEST),
        "--workers",
        "2",
        "--progress-s",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines, progress = [], []
    for line in proc.stderr:
        lines.append(line)
        seen = parse_progress(line)
        if seen is None:
            continue
        progress.append(seen)
        if kill_at is not None and seen["done"] >= kill_at * seen["total"]:
            proc.send_signal(signal.SIGKILL)
            break
    rc = proc.wait()
    proc.stderr.close()
    out = {
        "rc": rc,
        "wall_s": time.monotonic() - began,
        "first": progress[:1],
        "last": progress[-1:],
        "progress_lines": len(progress),
    }
    if kill_at is None:
        out["summary"] = parse_summary("".join(lines))
    return out


def ingest(raw: Path, dst: Path, kill_at: float) -> dict[str, Any]:
    """Ingest killed part-way, then resumed; the figures and the resume check."""
    say(f"ingest of {raw} into {dst}: killed at {kill_at:.0%} of the scenes, then again")
    killed = ingest_run(raw, dst, kill_at)
    resumed = ingest_run(raw, dst, None)
    s = resumed["summary"]
    done_at_kill = killed["last"][0]["done"] if killed["last"] else 0
    # every scene reported done before the kill is complete, so it is skipped; a few more may
    # have finished between that progress line and the kill
    ok = (
        s["written"] + s["skipped"] == s["scenes"]
        and s["skipped"] >= done_at_kill
        and resumed["rc"] == 0
    )
    say(
        f"killed at {done_at_kill} scenes done; the re-run skipped {s['skipped']}, wrote "
        f"{s['written']} in {s['seconds']:.0f} s; resume {'ok' if ok else 'NOT ok'}"
    )
    return {"killed": killed, "resumed": resumed, "done_at_kill": done_at_kill, "resume_ok": ok}


def ensure_store(work: Path, scenes: int, kill_at: float, reingest: bool) -> tuple[str, dict]:
    """The full manifest and its ingest figures (measured now, or saved by the run that built
    the store)."""
    raw = make_raw(work, scenes)
    dst, saved = work / f"pyramids-{scenes}", work / f"ingest-{scenes}.json"
    if reingest or not saved.exists():
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        figures = ingest(raw, dst, kill_at)
        saved.write_text(json.dumps({**figures, "at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    else:
        say(f"reusing the store {dst} (ingest figures from {saved}; --reingest measures again)")
    return str(dst / "manifest.parquet"), json.loads(saved.read_text())


# --------------------------------------------------------------------------- training


def train_once(config_path: Path, manifest: str, sets: list[str], work: Path, tag: str) -> dict:
    """One epoch of ``run_training`` on ``manifest`` (a fresh run name: never a resume);
    its timings and train metrics."""
    from pipeline.track.tracking import Tracker
    from pipeline.train.config import load_config
    from pipeline.train.driver import run_training

    name = f"many-{tag}-{time.time_ns()}"
    overrides = [
        *SETTINGS,
        *sets,
        f"data.manifest={manifest}",
        f"run.storage_path={work / 'runs'}",
        f"run.name={name}",
    ]
    config = load_config(config_path, overrides)
    began = time.perf_counter()
    outcome = run_training(config, tracker=Tracker())
    wall = time.perf_counter() - began
    metrics = {k: v for k, v in outcome.metrics.items() if k.startswith("train/")}
    return {"tag": tag, "wall_s": wall, "timings": outcome.timings, "metrics": metrics}


def start_ray_patiently(temp_dir: Path, attempts: int = RAY_START_ATTEMPTS) -> None:
    """A private local Ray (``start_ray``: 3 CPUs, 2 training workers and the driver's tasks),
    started again when its raylet misses Ray's hard-coded 30 s to register, as it does on a
    loaded machine (``bench/faults.py`` does the same)."""
    import ray

    from pipeline.train.driver import start_ray

    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    for attempt in range(1, attempts + 1):
        try:
            start_ray(temp_dir=temp_dir, num_cpus=3, logging_level="WARNING")
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            if RAY_START_FAILED not in str(err) or attempt == attempts:
                raise
            say(f"Ray did not start (attempt {attempt}): {err}; again")


def warm_up(manifest: str, scenes: int = 64) -> None:
    """Read the views of ``scenes`` train scenes of ``manifest`` through a Ray Data view
    dataset, as training does (not counted): Ray's first tasks start its worker processes and
    import the reader, which would otherwise fall on whichever run comes first."""
    from pipeline.read.source import open_split
    from pipeline.train import data

    split = open_split(manifest, "train", limit=scenes)
    data.view_dataset(split.rows, split.source_factory.in_process(), (32, 32))


def train_all(args: argparse.Namespace, manifests: dict[str, str]) -> list[dict]:
    """Small, large, small: one epoch each on one Ray instance started here."""
    import torch

    from pipeline.train.driver import ray_output

    torch.set_num_threads(1)
    ray_output()  # Ray's INFO lines off, as in every training run (also for the warm-up)
    began = time.perf_counter()
    start_ray_patiently(args.work / "ray")
    say(f"Ray started in {time.perf_counter() - began:.1f} s (not counted)")
    began = time.perf_counter()
    warm_up(manifests["small"])
    say(f"Ray Data warmed up in {time.perf_counter() - began:.1f} s (not counted)")
    runs = []
    for tag in ("small", "large", "small"):
        run = train_once(args.config, manifests[tag], args.set, args.work, tag)
        scenes = args.scenes if tag == "large" else args.small
        run["figures"] = overhead(run["timings"], run["metrics"], scenes)
        say(
            f"{tag} ({scenes} scenes): "
            + ", ".join(f"{k} {v:.4f}" for k, v in run["figures"].items() if k != "scenes")
        )
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenes", type=int, default=5000, help="train scenes of the large run")
    p.add_argument("--small", type=int, default=200, help="train scenes of the small runs")
    p.add_argument("--work", type=Path, default=ROOT / "data" / "many")
    p.add_argument("--kill-at", type=float, default=0.3, help="share of scenes done at the kill")
    p.add_argument("--reingest", action="store_true", help="ingest (and kill, resume) again")
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    full, ingest_figures = ensure_store(args.work, args.scenes, args.kill_at, args.reingest)
    manifests = {
        "large": full,
        "small": small_manifest(full, str(args.work / f"small-{args.small}.parquet"), args.small),
    }
    runs = train_all(args, manifests)
    large = runs[1]["figures"]
    result = compare(large, [runs[0]["figures"], runs[2]["figures"]])
    say(
        f"per-scene overhead: {large['per_scene_s'] * 1e3:.2f} ms at {args.scenes} scenes, "
        f"{result['small_per_scene_s'] * 1e3:.2f} ms at {args.small} (the less of 2): ratio "
        f"{result['ratio']:.3f} (goal <= 1.2); one more scene costs "
        f"{result['marginal_per_scene_s'] * 1e3:.2f} ms"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "scenes": args.scenes,
                    "small": args.small,
                    **result,
                    "per_scene_s": {
                        "large": large["per_scene_s"],
                        "small": [
                            runs[0]["figures"]["per_scene_s"],
                            runs[2]["figures"]["per_scene_s"],
                        ],
                    },
                    "runs": runs,
                    "ingest": ingest_figures,
                    "command": " ".join(
                        ["python", "bench/many_scenes.py", *(argv or sys.argv[1:])]
                    ),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
