"""Read amplification of the attended-chunk reader, on a local directory and on S3.

For synthetic scenes of 1k, 4k and 8k px a side (``--sizes``) written with the project's
pyramid format, it reads 16 random patches of 64 px and of 128 px at level 0 with a fresh
``ZarrPixelSource`` with ``EXACT_READS`` (a cold read: metadata, shard indexes and chunk data
all count; no byte-range merging, no index prefetch) and reports:

- amplification: pixels of the inner chunks decoded / pixels of the patches requested;
- bytes per patch on the wire (payload bytes, HTTP headers excluded) and requests per patch;
- bytes per sample: all bytes of one 16-patch read of a scene, and the same for chunk data
  only (what a read costs once the scene's shard indexes are cached);
- full / sample: the bytes of the whole level 0 (every shard object) over the bytes per sample.

Each cell is the mean of ``--trials`` independent draws. The S3 endpoint is a real SeaweedFS
(``pipeline.store.seaweed``), started here on 127.0.0.1 and stopped by PID at the end.
``--zarr-baseline`` also reads the same patches through zarr-python (which re-reads shard
indexes on every read) for comparison. ``--sweep`` compares chunk / shard sizes on the local
store (level 0 only), which is how the defaults were chosen.

``--tensorstore`` races the reader against tensorstore (``bench/tensorstore_read.py``) on the
largest scene: ``--ts-trials`` draws of 16 random patches of each size, both cold (the reader's
caches cleared, a fresh tensorstore context), the same patches, interleaved trial by trial (the
order alternating, 50 ms idle before each read so that neither's background threads run into
the other's time), results checked pixel-identical. The reader runs with the training
settings (``ReaderSettings``: ranges at most 16 KiB apart merged) in this process, without the
index prefetch (which on a cold read asks for every shard index of the level). It reports, per
store and patch size, the median wall time and process CPU per sample of each, and adds
``"over_tensorstore": {"local_64": r, "local_128": r, "s3_64": r, "s3_128": r}`` (project
median wall time over tensorstore's) to ``--json``; S3 also through the latency proxy
(``--latency-ms``, default 20) as ``s3_20ms_64`` / ``s3_20ms_128``.

    .venv/bin/python bench/read_amplification.py            # table
    .venv/bin/python bench/read_amplification.py --json     # + one JSON object on the last line
    .venv/bin/python bench/read_amplification.py --sizes 1024 8192 --tensorstore --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.protocol import ReadRequest
from pipeline.read.reader import ZarrPixelSource
from pipeline.read.settings import EXACT_READS, ReaderSettings
from pipeline.store import pyramid, storage

CHANNELS = 3


def synthetic_scene(side: int, seed: int) -> np.ndarray:
    """(3, side, side) uint8 with structure at several scales plus sensor-like noise, so that
    zstd compresses it about as much as aerial imagery (not to nothing)."""
    rng = np.random.default_rng(seed)
    out = np.empty((CHANNELS, side, side), dtype=np.uint8)
    x = np.arange(side, dtype=np.float32)
    # a coarse random field (fields, blocks) upsampled by repetition, and smooth waves (roads)
    coarse = rng.normal(0, 25, (CHANNELS, side // 64 + 1, side // 64 + 1)).astype(np.float32)
    for y0 in range(0, side, 512):
        y = np.arange(y0, min(y0 + 512, side), dtype=np.float32)[:, None]
        waves = 30 * np.sin(x / 41 + y / 67) + 20 * np.cos(x / 13 - y / 29)
        for c in range(CHANNELS):
            blocks = np.repeat(np.repeat(coarse[c, y0 // 64 : y0 // 64 + 9], 64, 0), 64, 1)
            blocks = blocks[: len(y), :side]
            noise = rng.normal(0, 6, (len(y), side)).astype(np.float32)
            band = 110 + 15 * c + waves + blocks + noise
            out[c, y0 : y0 + len(y)] = band.clip(0, 255).astype(np.uint8)
    return out


def random_boxes(n: int, patch: int, side: int, rng: np.random.Generator,
                 overlap: bool = False) -> torch.Tensor:
    """(1, n, 4) level-0 boxes of ``patch`` px at random positions inside the scene.

    Unless ``overlap``, the boxes do not overlap (redrawn until they do not), as attention
    sampling without replacement picks distinct locations; otherwise a small scene would look
    cheaper only because overlapping patches share chunks.
    """
    boxes: list[list[int]] = []
    for _ in range(1000 * n):
        if len(boxes) == n:
            break
        y0, x0 = (int(v) for v in rng.integers(0, side - patch + 1, 2))
        if overlap or all(y0 >= b[2] or b[0] >= y0 + patch or x0 >= b[3] or b[1] >= x0 + patch
                          for b in boxes):
            boxes.append([y0, x0, y0 + patch, x0 + patch])
    if len(boxes) < n:
        raise ValueError(f"cannot place {n} non-overlapping {patch} px patches in {side} px")
    return torch.tensor([boxes], dtype=torch.int64)


def level0_bytes(scene_uri: str) -> int:
    """Bytes of every level-0 shard object: what reading the whole level 0 fetches."""
    return sum(len(storage.read_bytes(u)) for u in storage.list_prefix(storage.join_uri(scene_uri, "0", "c")))


@dataclass
class Row:
    store: str
    side: int
    patch: int
    amplification: float
    bytes_per_patch: float
    requests_per_patch: float
    bytes_per_sample: float
    data_bytes_per_sample: float
    full_over_sample: float
    ms_per_sample: float


def measure(store: str, scene_uri: str, side: int, patch: int, n: int, trials: int,
            seed: int, full_bytes: int, overlap: bool = False) -> Row:
    rng = np.random.default_rng(seed + side + patch)
    amp, nbytes, data, requests, secs = [], [], [], [], []
    for _ in range(trials):
        source = ZarrPixelSource.from_settings(EXACT_READS)
        boxes = random_boxes(n, patch, side, rng, overlap)
        t0 = time.perf_counter()
        source.read([scene_uri], ReadRequest(boxes, 0, (patch, patch)))
        secs.append(time.perf_counter() - t0)
        c = source.counters()
        amp.append(c.pixels / (n * CHANNELS * patch * patch))
        nbytes.append(c.bytes)
        data.append(c.chunk_bytes)
        requests.append(c.requests)
        source.close()
    per_sample = float(np.mean(nbytes))
    return Row(store, side, patch, float(np.mean(amp)), per_sample / n, float(np.mean(requests)) / n,
               per_sample, float(np.mean(data)), full_bytes / per_sample, 1e3 * float(np.mean(secs)))


def zarr_baseline(scene_uri: str, side: int, patch: int, n: int, seed: int) -> dict:
    """The same kind of read through zarr-python (one slice per patch), counted."""
    import zarr

    from pipeline.store.counting import CountingStore

    store = CountingStore(storage.open_store(scene_uri, read_only=True))
    array = zarr.open_array(store, path="0", mode="r", zarr_format=3)
    store.log.reset()
    boxes = random_boxes(n, patch, side, np.random.default_rng(seed + side + patch))[0].tolist()
    t0 = time.perf_counter()
    for y0, x0, y1, x1 in boxes:
        array[:, y0:y1, x0:x1]
    secs = time.perf_counter() - t0
    c = store.log.counters()
    return {"bytes_per_patch": c.bytes / n, "requests_per_patch": c.requests / n,
            "index_bytes_per_patch": c.index_bytes / n, "ms_per_sample": 1e3 * secs}


# ---------------------------------------------------------------------- S3 server


def start_s3(work: Path) -> tuple[object, dict[str, str]]:
    """SeaweedFS on 127.0.0.1 with a ``bench-pyramids`` bucket; returns the server (``stop()``)
    and the ``AWS_*`` variables that point a client at it."""
    from pipeline.store.seaweed import start_seaweed

    server = start_seaweed(work / "seaweed", access_key="bench", secret_key="bench-secret",
                           buckets=["bench-pyramids"])
    return server, {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


def start_proxy(endpoint: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    """``bench.http_proxy`` in its own process in front of ``endpoint``; (process, endpoint)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_proxy", endpoint, "--latency-ms",
                             str(latency_ms)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline().strip()
    if not line.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"latency proxy did not start (said {line!r})")
    return proc, line


def copy_tree(src_uri: str, dst_uri: str) -> None:
    """Copy every object below ``src_uri`` to ``dst_uri`` byte for byte."""
    for uri in storage.list_prefix(src_uri):
        rel = os.path.relpath(uri, src_uri)
        storage.write_bytes(storage.join_uri(dst_uri, rel), storage.read_bytes(uri))


# ---------------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    head = (f"{'store':<6} {'side':>6} {'patch':>5} {'amplif.':>7} {'B/patch':>9} {'req/patch':>9} "
            f"{'B/sample':>10} {'data B/sample':>13} {'full/sample':>11} {'ms/sample':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.store:<6} {r.side:>6} {r.patch:>5} {r.amplification:>7.2f} "
              f"{r.bytes_per_patch:>9.0f} {r.requests_per_patch:>9.2f} {r.bytes_per_sample:>10.0f} "
              f"{r.data_bytes_per_sample:>13.0f} {r.full_over_sample:>11.0f} {r.ms_per_sample:>9.1f}")


def sweep(work: Path, sizes: list[int], patches: list[int], n: int, trials: int, seed: int,
          overlap: bool) -> None:
    configs = [(16, 128), (16, 256), (16, 512), (32, 512)]
    print(f"\nchunk/shard sweep (local, level 0 only, {trials} trials of {n} patches)")
    print(f"{'chunk':>5} {'shard':>5} {'side':>6} {'patch':>5} {'amplif.':>7} {'B/sample':>10} "
          f"{'data B/sample':>13} {'index B/sample':>14} {'write s':>7}")
    images = {side: synthetic_scene(side, seed + side) for side in sizes}
    for chunk, shard in configs:
        for side in sizes:
            root = str(work / f"sweep-{chunk}-{shard}")
            t0 = time.perf_counter()
            uri = pyramid.write_pyramid(root, f"s{side}", images[side], {}, coarsest=10**9,
                                        chunk=chunk, shard=shard)
            write_s = time.perf_counter() - t0
            for patch in patches:
                r = measure("local", uri, side, patch, n, trials, seed, level0_bytes(uri), overlap)
                index = r.bytes_per_sample - r.data_bytes_per_sample
                print(f"{chunk:>5} {shard:>5} {side:>6} {patch:>5} {r.amplification:>7.2f} "
                      f"{r.bytes_per_sample:>10.0f} {r.data_bytes_per_sample:>13.0f} "
                      f"{index:>14.0f} {write_s:>7.1f}")
            storage.delete_prefix(uri)


def summary(rows: list[Row], sizes: list[int]) -> dict:
    small, big = min(sizes), max(s for s in sizes if s <= 8192)

    def pick(side: int) -> list[Row]:
        return [r for r in rows if r.side == side]

    ratios = [b.bytes_per_sample / s.bytes_per_sample
              for s in pick(small) for b in pick(big) if (s.store, s.patch) == (b.store, b.patch)]
    data_ratios = [b.data_bytes_per_sample / s.data_bytes_per_sample
                   for s in pick(small) for b in pick(big) if (s.store, s.patch) == (b.store, b.patch)]
    return {
        "amplification": max(r.amplification for r in rows),
        "amplification_by_patch": {str(p): max(r.amplification for r in rows if r.patch == p)
                                   for p in sorted({r.patch for r in rows})},
        # the worst (farthest from 1) over stores and patch sizes
        "bytes_per_sample_8k_over_1k": max(ratios, key=lambda v: abs(v - 1)),
        "data_bytes_per_sample_8k_over_1k": max(data_ratios, key=lambda v: abs(v - 1)),
        "full_read_over_sample_8k": min(r.full_over_sample for r in pick(big)),
        "sizes": [small, big],
        "rows": [r.__dict__ for r in rows],
    }


def versus_tensorstore(scene_uri: str, side: int, patch: int, n: int, trials: int,
                       seed: int) -> dict:
    """The reader against tensorstore on the same cold reads, interleaved (see the module
    docstring): medians of wall ms and process CPU ms per sample, bytes and requests per
    sample, and ``ratio`` = the reader's median wall time over tensorstore's."""
    from bench.tensorstore_read import TensorstoreReader, kvstore_counters

    settings = dataclasses.replace(ReaderSettings(), prefetch_indexes=False, process=False)
    ours = ZarrPixelSource.from_settings(settings)
    theirs = TensorstoreReader(scene_uri)
    kind = "s3" if scene_uri.startswith("s3://") else "file"
    rng = np.random.default_rng(seed + 7 * patch)
    warm = random_boxes(n, patch, side, rng)  # imports, threads, HTTP clients: not timed
    ours.read([scene_uri], ReadRequest(warm, 0, (patch, patch)))
    theirs.read(warm, (patch, patch))
    times: dict[str, list[tuple[float, float, int, int]]] = {"project": [], "tensorstore": []}

    def run_ours(boxes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        ours.clear_cache()
        ours.reset_counters()
        out = ours.read([scene_uri], ReadRequest(boxes, 0, (patch, patch)))
        c = ours.counters()
        return out, c.requests, c.bytes

    def run_theirs(boxes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        before = kvstore_counters(kind)
        out = theirs.read(boxes, (patch, patch))
        after = kvstore_counters(kind)
        return out, after["requests"] - before["requests"], after["bytes"] - before["bytes"]

    for trial in range(trials):
        boxes = random_boxes(n, patch, side, rng)
        order = [("project", run_ours), ("tensorstore", run_theirs)]
        outs = {}
        for name, run in order if trial % 2 == 0 else order[::-1]:
            time.sleep(0.05)  # let the other's background threads (tensorstore's) go idle
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name], requests, nbytes = run(boxes)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0, requests,
                                nbytes))
        if not torch.equal(outs["project"], outs["tensorstore"]):
            raise RuntimeError(f"{scene_uri} {patch} px trial {trial}: results differ")
    ours.close()
    med = {k: np.median(np.array(v, dtype=np.float64), axis=0) for k, v in times.items()}
    out = {f"{k}_{f}": float(m[i] * (1e3 if i < 2 else 1))
           for k, m in med.items()
           for i, f in enumerate(("ms", "cpu_ms", "requests", "bytes"))}
    out["ratio"] = float(med["project"][0] / med["tensorstore"][0])
    out["cpu_ratio"] = float(med["project"][1] / med["tensorstore"][1])
    return out


def print_versus(cells: dict[str, dict]) -> None:
    print(f"\n{'cell':<12} {'project ms':>10} {'ts ms':>7} {'ratio':>6} {'proj CPU':>8} "
          f"{'ts CPU':>7} {'CPU ratio':>9} {'proj req':>8} {'ts req':>7} {'proj B':>8} {'ts B':>8}")
    for name, c in cells.items():
        print(f"{name:<12} {c['project_ms']:>10.1f} {c['tensorstore_ms']:>7.1f} {c['ratio']:>6.2f} "
              f"{c['project_cpu_ms']:>8.1f} {c['tensorstore_cpu_ms']:>7.1f} {c['cpu_ratio']:>9.2f} "
              f"{c['project_requests']:>8.0f} {c['tensorstore_requests']:>7.0f} "
              f"{c['project_bytes']:>8.0f} {c['tensorstore_bytes']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--n", type=int, default=16, help="patches per sample")
    parser.add_argument("--trials", type=int, default=4, help="samples averaged per cell")
    parser.add_argument("--chunk", type=int, default=pyramid.DEFAULT_CHUNK)
    parser.add_argument("--shard", type=int, default=pyramid.DEFAULT_SHARD)
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap", action="store_true",
                        help="let patches overlap (default: distinct, non-overlapping patches)")
    parser.add_argument("--zarr-baseline", action="store_true")
    parser.add_argument("--tensorstore", action="store_true",
                        help="race the reader against tensorstore on the largest scene")
    parser.add_argument("--ts-trials", type=int, default=20, help="draws per tensorstore cell")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="added per request on the proxied S3 tensorstore cells (0: none)")
    parser.add_argument("--sweep", action="store_true", help="compare chunk/shard sizes")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="read-amp-"))
    work.mkdir(parents=True, exist_ok=True)
    stoppers: list = []
    saved_env: dict[str, str | None] = {}
    try:
        if args.sweep:
            sweep(work, args.sizes, args.patches, args.n, args.trials, args.seed, args.overlap)
            return 0
        scenes = write_scenes(work, args)
        uris = {("local", s): u for s, u in scenes.items()}
        if "s3" in args.stores or args.tensorstore:
            server, env = start_s3(work)
            stoppers.append(lambda: server.stop(timeout_s=2))  # throwaway data: no need to wait
            saved_env = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            for side, uri in scenes.items():
                uris[("s3", side)] = f"s3://bench-pyramids/scene-{side}"
                copy_tree(uri, uris[("s3", side)])
        rows = [measure(store, uris[(store, side)], side, patch, args.n, args.trials, args.seed,
                        level0_bytes(uris[(store, side)]), args.overlap)
                for store in args.stores for side in args.sizes for patch in args.patches]
        print()
        print_table(rows)
        result = summary(rows, args.sizes)
        if args.zarr_baseline:
            result["zarr_baseline"] = zarr_baselines(scenes, rows, args)
        print(f"\namplification (worst) {result['amplification']:.2f}   "
              f"bytes/sample {result['sizes'][1]}/{result['sizes'][0]}: "
              f"{result['bytes_per_sample_8k_over_1k']:.3f} (data only "
              f"{result['data_bytes_per_sample_8k_over_1k']:.3f})   "
              f"full read / sample at {result['sizes'][1]}: {result['full_read_over_sample_8k']:.0f}x")
        if args.tensorstore:
            cells = tensorstore_cells(uris, args, stoppers)
            print_versus(cells)
            result["versus_tensorstore"] = cells
            result["over_tensorstore"] = {k: round(c["ratio"], 3) for k, c in cells.items()}
        if args.json:
            print(json.dumps(result))
        return 0
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for stop in reversed(stoppers):
            stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def write_scenes(work: Path, args: argparse.Namespace) -> dict[int, str]:
    """A synthetic scene of every ``--sizes`` side written as a local pyramid: {side: uri}."""
    print(f"chunk {args.chunk} px, shard {args.shard} px, {args.n} patches per sample, "
          f"{args.trials} trials; writing scenes of {args.sizes} px ...", flush=True)
    scenes: dict[int, str] = {}
    for side in args.sizes:
        t0 = time.perf_counter()
        image = synthetic_scene(side, args.seed + side)
        scenes[side] = pyramid.write_pyramid(str(work / "local"), f"scene-{side}", image, {},
                                             chunk=args.chunk, shard=args.shard)
        print(f"  {side} px: written in {time.perf_counter() - t0:.1f} s, level 0 "
              f"{level0_bytes(scenes[side]) / image.nbytes:.2f} of raw", flush=True)
    return scenes


def zarr_baselines(scenes: dict[int, str], rows: list[Row], args: argparse.Namespace) -> dict:
    side = max(args.sizes)
    print(f"\nzarr-python on the same patches (local, {side} px, one slice per patch):")
    out = {}
    for patch in args.patches:
        base = zarr_baseline(scenes[side], side, patch, args.n, args.seed)
        ours = next(r for r in rows if (r.store, r.side, r.patch) == ("local", side, patch))
        out[str(patch)] = base
        print(f"  {patch} px: {base['bytes_per_patch']:.0f} B/patch "
              f"({base['index_bytes_per_patch']:.0f} of them index), "
              f"{base['requests_per_patch']:.2f} req/patch, {base['ms_per_sample']:.1f} "
              f"ms/sample; this reader: {ours.bytes_per_patch:.0f} B/patch, "
              f"{ours.requests_per_patch:.2f} req/patch, {ours.ms_per_sample:.1f} ms/sample")
    return out


def tensorstore_cells(uris: dict, args: argparse.Namespace, stoppers: list) -> dict[str, dict]:
    """``versus_tensorstore`` on the largest scene: local, S3, and S3 through the latency
    proxy (both clients pointed at it, then back)."""
    side = max(args.sizes)
    print(f"\nproject reader vs tensorstore: {side} px scene, {args.n} patches, "
          f"{args.ts_trials} interleaved cold trials per cell ...", flush=True)
    cells = {}
    for store in ("local", "s3"):
        for patch in args.patches:
            cells[f"{store}_{patch}"] = versus_tensorstore(
                uris[(store, side)], side, patch, args.n, args.ts_trials, args.seed)
    if args.latency_ms > 0:
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        proxy, proxied = start_proxy(endpoint, args.latency_ms)
        stoppers.append(proxy.kill)
        os.environ["AWS_ENDPOINT_URL"] = proxied
        try:
            for patch in args.patches:
                cells[f"s3_{args.latency_ms:g}ms_{patch}"] = versus_tensorstore(
                    uris[("s3", side)], side, patch, args.n, args.ts_trials, args.seed)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
    return cells


if __name__ == "__main__":
    raise SystemExit(main())
