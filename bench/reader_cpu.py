"""CPU time of the attended-chunk reader per sample: what a training thread pays for it.

    python bench/reader_cpu.py --manifest data/demo/pyramids/manifest.parquet
        [--scenes 48] [--batches 200] [--batch 3] [--patches 16] [--patch 64] [--level 1]
        [--max-gap 16384] [--in-flight 3] [--json]

Reads ``--batches`` batches of ``--batch`` scenes, each with ``--patches`` random boxes of
``--patch`` level-0 pixels read at ``--level`` (the demo's ATS reads 16 boxes of 64 px at level
1), from local pyramids, on the calling thread's own event loop (``read_async``), after a
warm-up of 20 batches that fills the metadata and shard-index caches. Prints wall and process
CPU milliseconds per sample and the reader's counters; with ``--json`` the last line is one
JSON object. Same boxes on every run (seeded), so two versions of the reader can be compared.

Then, with ``--in-flight K`` (default 3; 0 skips it), the latency a training step sees: groups
of K batches are submitted at once through ``submit`` (as the micro-batch scheduler does), by
the reader in this process and in a child process (``pipeline.read.process``), and the median
milliseconds until each of the K comes back are printed (run with ``--batch 2`` for the demo's
micro-batches of 2 scenes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time

import numpy as np
import torch


def random_requests(sizes: np.ndarray, args, rng: np.random.Generator):
    """(scene indices, ReadRequest) per batch: boxes of ``args.patch`` px inside each scene."""
    from models.protocol import ReadRequest

    out = []
    for _ in range(args.batches + 20):
        idx = rng.choice(len(sizes), args.batch, replace=False)
        boxes = []
        for i in idx:
            h, w = sizes[i]
            y = rng.integers(0, max(1, h - args.patch), args.patches)
            x = rng.integers(0, max(1, w - args.patch), args.patches)
            boxes.append(np.stack([y, x, y + args.patch, x + args.patch], 1))
        size = (args.patch >> args.level,) * 2
        out.append((idx, ReadRequest(torch.tensor(np.stack(boxes)), args.level, size)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--max-gap", type=int, default=16384)
    parser.add_argument("--in-flight", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from pipeline.read.reader import ZarrPixelSource
    from pipeline.read.settings import EXACT_READS, ReaderSettings
    from pipeline.read.source import open_split

    # the in-flight readers: the training concurrency and cache, --max-gap, no index prefetch
    settings = ReaderSettings(max_gap=args.max_gap, process=False, prefetch_indexes=False)
    split = open_split(args.manifest, "train", settings, args.scenes)
    keys = split.keys
    requests = random_requests(np.asarray(split.rows["size"]), args, np.random.default_rng(0))
    source = ZarrPixelSource.from_settings(dataclasses.replace(EXACT_READS, max_gap=args.max_gap))

    async def run() -> tuple[float, float]:
        """One event loop for all (the reader's semaphore belongs to one loop)."""
        for i, (idx, request) in enumerate(requests):
            if i == 20:  # after the warm-up that fills the metadata and shard-index caches
                source.reset_counters()
                wall, cpu = time.perf_counter(), time.process_time()
            await source.read_async([keys[i] for i in idx], request)
        return time.perf_counter() - wall, time.process_time() - cpu

    wall, cpu = asyncio.run(run())
    n = args.batches * args.batch
    c = source.counters()
    report = {"wall_ms_per_sample": 1e3 * wall / n, "cpu_ms_per_sample": 1e3 * cpu / n,
              "requests_per_sample": c.requests / n, "bytes_per_sample": c.bytes / n,
              "chunks_per_sample": c.chunks / n, "samples": n}
    print(f"{n} samples of {args.patches} x {args.patch} px at level {args.level}: "
          f"{report['cpu_ms_per_sample']:.2f} ms CPU / {report['wall_ms_per_sample']:.2f} ms wall "
          f"per sample; {report['requests_per_sample']:.1f} requests, "
          f"{report['chunks_per_sample']:.0f} chunks, {report['bytes_per_sample']:,.0f} bytes per sample")
    if args.in_flight > 0:
        for process in (False, True):
            done = in_flight(keys, requests, args, split.source_factory.settings, process)
            name = "child process" if process else "this process"
            report[f"in_flight_ms_{'process' if process else 'thread'}"] = done
            print(f"{args.in_flight} reads of {args.batch} scenes in flight, reader in {name}: "
                  f"back after {', '.join(f'{t:.1f}' for t in done)} ms (median)")
    if args.json:
        print(json.dumps(report))
    return 0


def in_flight(keys: list[str], requests: list, args, settings, process: bool) -> list[float]:
    """Median ms until each of ``args.in_flight`` reads submitted together comes back, from
    the reader of ``settings`` (a ``ReaderSettings``) in this process or in a child."""
    from pipeline.read.source import ZarrSourceFactory

    source = ZarrSourceFactory(dataclasses.replace(settings, process=process))()
    k, times = args.in_flight, []
    try:
        for idx, request in requests[:20]:
            source.read([keys[i] for i in idx], request)
        for g in range(20, len(requests) - k + 1, k):
            t0 = time.perf_counter()
            futures = [source.submit([keys[i] for i in idx], request)
                       for idx, request in requests[g:g + k]]
            back = []
            for future in futures:
                future.result()
                back.append(1e3 * (time.perf_counter() - t0))
            times.append(back)
    finally:
        source.close()
    return np.median(np.array(times), 0).round(1).tolist()


if __name__ == "__main__":
    sys.exit(main())
