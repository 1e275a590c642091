"""What zstd's content checksum (pyramid format 3) costs the reader: the same scene written with
and without it, read with the same boxes, interleaved.

    python bench/checksum_cost.py [--side 4096] [--rounds 7] [--batches 40] [--batch 3]
        [--patches 16] [--patch 64] [--level 0] [--json]

Writes one ``--side`` px textured scene twice into a temporary directory (format 3 with the
checksum, and the same writer with ``ZSTD_CHECKSUM`` off, i.e. the format-2 chunk encoding),
then for ``--rounds`` rounds reads ``--batches`` batches of ``--batch`` x ``--patches`` random
``--patch`` px boxes from each, alternating which goes first, with warm index caches (what a
training read costs after the first epoch) and, separately, only the chunk decode
(``ChunkDecoder.decode`` of every chunk of the scene). Prints the median per-sample read
milliseconds and per-chunk decode microseconds of each and their ratio (checksum / none);
with ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def write_both(root: str, side: int) -> dict[str, str]:
    """The same scene with (``"checksum"``) and without (``"none"``) the zstd checksum."""
    from pipeline.store import pyramid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    base = 100 + 60 * np.sin(yy / 7.0) * np.cos(xx / 11.0)
    img = np.stack([base + rng.normal(0, 20, (side, side)) for _ in range(3)]).clip(0, 255)
    img = img.astype(np.uint8)
    uris = {}
    try:
        for name, checksum in (("checksum", True), ("none", False)):
            pyramid.ZSTD_CHECKSUM = checksum
            uris[name] = pyramid.write_pyramid(root, name, img, {})
    finally:
        pyramid.ZSTD_CHECKSUM = True
    return uris


def requests(args, side: int) -> list:
    from models.protocol import ReadRequest

    rng = np.random.default_rng(1)
    out = []
    for _ in range(args.batches):
        y = rng.integers(0, side - args.patch, (args.batch, args.patches))
        x = rng.integers(0, side - args.patch, (args.batch, args.patches))
        boxes = np.stack([y, x, y + args.patch, x + args.patch], -1)
        out.append(ReadRequest(torch.tensor(boxes), args.level, (args.patch >> args.level,) * 2))
    return out


def read_ms(source, uri: str, reqs: list) -> float:
    """Milliseconds per sample of reading every request from ``uri`` (caches warm)."""
    t0 = time.perf_counter()
    for request in reqs:
        source.read([uri] * request.boxes.shape[0], request)
    return 1e3 * (time.perf_counter() - t0) / sum(r.boxes.shape[0] for r in reqs)


def decode_us(uri: str) -> float:
    """Microseconds per chunk of decoding every stored chunk of level 0 in one batch call."""
    import os

    from pipeline.read.layout import ChunkDecoder, level_meta, object_index

    level = os.path.join(uri, "0")
    meta = level_meta(uri, 0, level, json.load(open(os.path.join(level, "zarr.json"))))
    shards = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(level, "c")) for f in fs]
    decoder, chunks, t = ChunkDecoder(), 0, 0.0
    for path in shards:
        data = open(path, "rb").read()
        index = np.frombuffer(object_index(meta, data)[:-4], "<u8").reshape(-1, 2)
        index = index[index[:, 0] != 2**64 - 1]
        t0 = time.perf_counter()
        decoder.decode(meta, data, index[:, 0], index[:, 0] + index[:, 1])
        t += time.perf_counter() - t0
        chunks += len(index)
    return 1e6 * t / chunks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--side", 4096), ("--rounds", 7), ("--batches", 40), ("--batch", 3),
                          ("--patches", 16), ("--patch", 64), ("--level", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from pipeline.read.reader import ZarrPixelSource

    with tempfile.TemporaryDirectory() as root:
        uris, reqs = write_both(root, args.side), requests(args, args.side)
        source = ZarrPixelSource()
        times: dict[str, list[float]] = {"checksum": [], "none": [], "decode_checksum": [],
                                         "decode_none": []}
        for name in uris:
            read_ms(source, uris[name], reqs[:5])  # warm the caches
        for r in range(args.rounds):
            for name in (("checksum", "none") if r % 2 == 0 else ("none", "checksum")):
                times[name].append(read_ms(source, uris[name], reqs))
                times[f"decode_{name}"].append(decode_us(uris[name]))
        source.close()
    result = {k: statistics.median(v) for k, v in times.items()}
    result["read_ratio"] = result["checksum"] / result["none"]
    result["decode_ratio"] = result["decode_checksum"] / result["decode_none"]
    print(f"read per sample: checksum {result['checksum']:.2f} ms, none {result['none']:.2f} ms, "
          f"ratio {result['read_ratio']:.3f} | decode per chunk: checksum "
          f"{result['decode_checksum']:.2f} us, none {result['decode_none']:.2f} us, ratio "
          f"{result['decode_ratio']:.3f} (medians of {args.rounds} interleaved rounds)")
    if args.json:
        print(json.dumps({"args": vars(args), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
