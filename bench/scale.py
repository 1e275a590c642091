"""Per-sample cost of training the demo model on scenes of 1k to 32k px a side, and their ingest.

    python bench/scale.py --sides 1024,8192,32768 [--samples 8] [--rounds 3] [--work data/scale]
        [--config infra/configs/fmow_ats_local.yaml] [--set KEY=VALUE] [--reingest] [--json]

For each side, one scene (``pipeline/synth/large_scene.py``: a plaid background, a few tiny
objects) is written as a tiled BigTIFF and ingested by the folder loader, band by band, in a
child process (nice 5) that reports its wall time, CPU time and peak RSS (``ru_maxrss``); the
pyramid and those figures are kept under ``--work`` and reused by later runs (``--reingest``
measures the ingest again).

Training samples: the demo's recipe (two-stage Zoom-In, ``infra/configs/fmow_ats_local.yaml``)
with ``tile_level`` automatic (``null``: per scene, the level where a tile spans ``tile_view``;
the recipe's fixed level 1 reads 4,096 px tiles from a 32k scene) and the model's ``coarsest``
from the pyramids (``pipeline.train.driver.pyramids_coarsest``). One sample = one scene's
training step: the two attended reads (tile views, then patches) through the reader with the
config's settings, in this process, forward and backward; the low-resolution view is read once
per scene before training, as the training job does, and reported apart. Per sample:

- bytes and requests the reader fetched, cold (a fresh reader: metadata, shard indexes and
  chunks all count) and warm (one reader per side kept across samples: its caches as in a
  long run), and the pixels of the chunks it decoded (content-independent);
- reader time: wall time inside the two reads (median), and the whole step's;
- peak memory: torch's CPU allocations during the step (profiler, forward + backward + the
  reads' tensors) plus numpy's (tracemalloc: the reader's decoded chunks), measured in a
  separate pass (the profiler slows the step).

Measurements are interleaved: ``--rounds`` rounds, each running ``--samples`` samples of every
side in a rotating order, so the machine's changing load falls on every side alike.
``full_read_over_sample`` is the stored bytes of the whole level 0 over the cold bytes per
sample. The last line with ``--json`` is one JSON object: ``max_side``, ``bytes_max_over_1k``
(cold), ``warm_bytes_max_over_1k``, ``pixels_max_over_1k``, ``memory_max_over_1k``,
``time_max_over_1k`` (reader time), ``full_read_over_sample_max``, ``ingest_peak_rss_mb``,
``ingest_wall_s``, ``ingest_cpu_s``, ``ingest_mpx_per_s`` (per side) and ``per_side``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COARSEST = 128  # the demo's ingest (``pipeline.synth.demo.DEMO_COARSEST``)


# --------------------------------------------------------------------------- ingest (child)


def ingest_child(tiff: str, dst: str) -> dict:
    """Ingest one TIFF (folder loader, band by band) in this process; its figures."""
    from pipeline.ingest.engine import SceneTask, run_ingest
    from pipeline.ingest.folder import load_folder_scene

    task = SceneTask(Path(tiff).stem, "train", tiff, "a")
    start, cpu = time.monotonic(), time.process_time()
    report = run_ingest([task], load_folder_scene, ("a", "b"), dst, coarsest=COARSEST,
                        workers=1, out=None)
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    if report.rejects:
        raise SystemExit(f"ingest of {tiff} rejected: {report.rejects[0]['reason']}")
    row = report.rows[0]
    mpx = row["height"] * row["width"] / 1e6
    return {"wall_s": wall, "cpu_s": cpu, "mpx": mpx, "mpx_per_s": mpx / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "row": row, "status": report.counts}


def ensure_scene(work: Path, side: int, reingest: bool, nice: int) -> dict:
    """The side's TIFF (written if absent), its pyramid and ingest figures (measured now when
    absent or ``reingest``, else those saved when it was measured)."""
    from pipeline.store.pyramid import pyramid_complete
    from pipeline.synth.large_scene import write_large_scene

    tiff, dst, saved = work / "raw" / f"s{side}.tif", work / "pyramids", work / f"ingest_{side}.json"
    if not tiff.exists():
        tiff.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        write_large_scene(str(tiff), side, tile=256, seed=side)
        print(f"[scale] wrote {tiff} ({tiff.stat().st_size / 1e6:.1f} MB) in "
              f"{time.monotonic() - start:.1f} s", flush=True)
    if reingest or not saved.exists() or not pyramid_complete(str(dst), f"s{side}"):
        if (dst / f"s{side}").exists():
            import shutil

            shutil.rmtree(dst / f"s{side}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ingest-child", str(tiff), str(dst)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                             preexec_fn=lambda: os.nice(nice))
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        figures["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        saved.write_text(json.dumps(figures))
    figures = json.loads(saved.read_text())
    print(f"[scale] ingest {side} px: {figures['wall_s']:.1f} s wall, {figures['cpu_s']:.1f} s "
          f"CPU, {figures['mpx_per_s']:.2f} Mpx/s, peak RSS {figures['peak_rss_mb']:.0f} MB "
          f"(measured {figures['measured_at']})", flush=True)
    return figures


# --------------------------------------------------------------------------- one sample


class TimedSource:
    """The reader, timing the reads (wall seconds inside ``read``)."""

    def __init__(self, source):
        self.source, self.read_s = source, 0.0

    def read(self, keys, request):
        start = time.perf_counter()
        try:
            return self.source.read(keys, request)
        finally:
            self.read_s += time.perf_counter() - start


def one_sample(model, source, key: str, view, size, seed: int) -> dict:
    """One training step of one scene (forward, backward) served by ``source``; its costs."""
    from models.protocol import drive

    timed = TimedSource(source)
    source.reset_counters()
    start = time.perf_counter()
    out = drive(model.steps(view, size, torch.Generator().manual_seed(seed)), timed, [key])
    model.loss(out, torch.zeros(1, dtype=torch.int64)).backward()
    model.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    c = source.counters()
    return {"bytes": c.bytes, "requests": c.requests, "index_bytes": c.index_bytes,
            "pixels": c.pixels, "read_s": timed.read_s, "step_s": step_s}


def peak_memory(model, source, key: str, view, size, seed: int) -> dict:
    """Peak bytes of one sample, the same sample twice: numpy's and Python's allocations
    (tracemalloc: the reader's decoded chunks), then torch's CPU allocations (profiler:
    activations, gradients, the reads' tensors); each without the other's overhead."""
    from bench.torch_memory import peak_cpu_bytes

    tracemalloc.start()
    try:
        one_sample(model, source, key, view, size, seed)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    torch_peak = peak_cpu_bytes(lambda: one_sample(model, source, key, view, size, seed))
    return {"torch_peak": torch_peak, "numpy_peak": numpy_peak, "peak": torch_peak + numpy_peak}


# --------------------------------------------------------------------------- the run


def build(config_path: Path, sets: list[str], rows: list[dict]):
    """The demo model (automatic tile level, coarsest from the pyramids) and reader settings."""
    import dataclasses

    import pandas as pd

    from models.registry import create_model
    from pipeline.train.config import load_config
    from pipeline.train.driver import pyramids_coarsest, resolve_config

    config = load_config(config_path, ["model.overrides.tile_level=null", *sets])
    config = resolve_config(config, ["a", "b"], pyramids_coarsest(pd.DataFrame(rows)))
    torch.manual_seed(0)
    model = create_model(config.model.name, **config.model.overrides).train()
    return model, dataclasses.replace(config.reader, process=False), config


def level0_stored_bytes(uri: str) -> int:
    """Bytes of every stored level-0 shard (what a full-resolution read fetches)."""
    total = 0
    for base, _, files in os.walk(os.path.join(uri, "0", "c")):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def measure(model, settings, scenes: dict, samples: int, rounds: int) -> dict:
    """Interleaved rounds of cold and warm samples per side, then a memory pass."""
    from pipeline.read.reader import ZarrPixelSource

    sides = list(scenes)
    warm = {s: ZarrPixelSource.from_settings(settings) for s in sides}
    results = {s: {"cold": [], "warm": [], "memory": []} for s in sides}
    for side in sides:  # warm-up: metadata and the first shard indexes in the warm readers
        key, view, size = scenes[side]
        one_sample(model, warm[side], key, view, size, seed=10**6)
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            key, view, size = scenes[side]
            for k in range(samples):
                seed = 1000 * r + k
                cold = ZarrPixelSource.from_settings(settings)
                results[side]["cold"].append(one_sample(model, cold, key, view, size, seed))
                cold.close()
                results[side]["warm"].append(one_sample(model, warm[side], key, view, size, seed))
    key, view, size = scenes[sides[0]]
    peak_memory(model, warm[sides[0]], key, view, size, 6)  # the profiler's first start allocates
    for r in range(3):  # memory pass, interleaved too
        for side in sides:
            key, view, size = scenes[side]
            results[side]["memory"].append(peak_memory(model, warm[side], key, view, size, 7 + r))
    for side in sides:
        warm[side].close()
    return results


def summarise(side: int, res: dict, full: int, view_bytes: int) -> dict:
    """Means (bytes, requests, pixels) and medians (times, memory) of one side."""
    def mean(kind, name):
        return float(np.mean([s[name] for s in res[kind]]))

    def median(kind, name):
        return float(statistics.median(s[name] for s in res[kind]))

    out = {
        "bytes": mean("cold", "bytes"), "requests": mean("cold", "requests"),
        "index_bytes": mean("cold", "index_bytes"), "pixels": mean("cold", "pixels"),
        "warm_bytes": mean("warm", "bytes"), "warm_requests": mean("warm", "requests"),
        "read_ms": 1000 * median("cold", "read_s"), "warm_read_ms": 1000 * median("warm", "read_s"),
        "step_ms": 1000 * median("warm", "step_s"),
        "memory_mb": median("memory", "peak") / 2**20,
        "torch_memory_mb": median("memory", "torch_peak") / 2**20,
        "numpy_memory_mb": median("memory", "numpy_peak") / 2**20,
        "view_bytes": view_bytes, "level0_stored_bytes": full,
        "samples": len(res["cold"]),
    }
    out["full_read_over_sample"] = full / max(out["bytes"], 1)
    return out


def print_table(per_side: dict) -> None:
    print(f"{'side':>6} {'B/sample':>10} {'warm B':>9} {'req':>6} {'Mpx dec':>8} {'read ms':>8} "
          f"{'warm ms':>8} {'step ms':>8} {'mem MB':>7} {'view B':>8} {'full/sample':>12}")
    for side, m in per_side.items():
        print(f"{side:>6} {m['bytes']:>10,.0f} {m['warm_bytes']:>9,.0f} {m['requests']:>6.1f} "
              f"{m['pixels'] / 1e6:>8.3f} {m['read_ms']:>8.1f} {m['warm_read_ms']:>8.1f} "
              f"{m['step_ms']:>8.1f} {m['memory_mb']:>7.1f} {m['view_bytes']:>8,} "
              f"{m['full_read_over_sample']:>12,.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="1024,8192,32768", help="scene sides, px, the first is the base")
    parser.add_argument("--samples", type=int, default=8, help="samples per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "scale")
    parser.add_argument("--config", type=Path, default=ROOT / "infra" / "configs" / "fmow_ats_local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reingest", action="store_true", help="measure the ingest again")
    parser.add_argument("--nice", type=int, default=5, help="nice level of the ingest child")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--ingest-child", nargs=2, metavar=("TIFF", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ingest_child:
        print(json.dumps(ingest_child(*args.ingest_child)))
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sides = [int(s) for s in args.sides.split(",")]
    ingest = {s: ensure_scene(args.work, s, args.reingest, args.nice) for s in sides}
    model, settings, config = build(args.config, args.set, [ingest[s]["row"] for s in sides])
    print(f"[scale] model {config.model.name} {config.model.overrides}; reader {settings}; "
          f"{args.rounds} rounds x {args.samples} samples per side, interleaved", flush=True)
    from pipeline.read.reader import ZarrPixelSource

    scenes, views = {}, {}
    for s in sides:
        uri = ingest[s]["row"]["uri"]
        viewer = ZarrPixelSource.from_settings(settings)
        scenes[s] = (uri, viewer.view([uri], model.view_size), torch.tensor([[s, s]]))
        views[s] = viewer.counters().bytes
        viewer.close()
    results = measure(model, settings, scenes, args.samples, args.rounds)
    per_side = {s: summarise(s, results[s], level0_stored_bytes(scenes[s][0]), views[s])
                for s in sides}
    print_table(per_side)
    base, top = per_side[sides[0]], per_side[sides[-1]]
    summary = {
        "max_side": sides[-1],
        "bytes_max_over_1k": top["bytes"] / base["bytes"],
        "warm_bytes_max_over_1k": top["warm_bytes"] / base["warm_bytes"],
        "pixels_max_over_1k": top["pixels"] / base["pixels"],
        "memory_max_over_1k": top["memory_mb"] / base["memory_mb"],
        "time_max_over_1k": top["read_ms"] / base["read_ms"],
        "warm_time_max_over_1k": top["warm_read_ms"] / base["warm_read_ms"],
        "full_read_over_sample_max": top["full_read_over_sample"],
        "ingest_peak_rss_mb": {str(s): round(ingest[s]["peak_rss_mb"]) for s in sides},
        "ingest_wall_s": {str(s): round(ingest[s]["wall_s"], 1) for s in sides},
        "ingest_cpu_s": {str(s): round(ingest[s]["cpu_s"], 1) for s in sides},
        "ingest_mpx_per_s": {str(s): round(ingest[s]["mpx_per_s"], 2) for s in sides},
        "per_side": {str(s): {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}
                     for s, m in per_side.items()},
    }
    print(f"\n[scale] {sides[-1]} px over {sides[0]} px per sample: bytes "
          f"{summary['bytes_max_over_1k']:.3f} cold / {summary['warm_bytes_max_over_1k']:.3f} "
          f"warm, pixels decoded {summary['pixels_max_over_1k']:.3f}, memory "
          f"{summary['memory_max_over_1k']:.3f}, reader time {summary['time_max_over_1k']:.3f}; "
          f"a full level-0 read costs {summary['full_read_over_sample_max']:,.0f}x a sample")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
