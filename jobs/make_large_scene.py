"""Write one large test scene as a tiled BigTIFF, tile by tile (``pipeline/synth/large_scene.py``).

    python jobs/make_large_scene.py --side 32768 --out data/large/scene_32k.tif \
        [--tile 256] [--objects 6] [--seed 0] [--gsd 0.5]

Memory stays at a few tiles whatever ``--side`` (65,536 px works). ``--gsd`` adds GeoTIFF tags
(UTM 33N, metres). Prints one line with the file's size and the time. Exit 0, or 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline.synth.large_scene import write_large_scene


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--side", type=int, required=True, help="px of each side")
    p.add_argument("--out", required=True, help="local path of the .tif to write")
    p.add_argument("--tile", type=int, default=256, help="TIFF tile side (multiple of 16)")
    p.add_argument("--objects", type=int, default=6, help="tiny objects drawn on the plaid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gsd", type=float, default=None, help="metres per px: add GeoTIFF tags")
    args = p.parse_args(argv)
    if args.side < 1 or args.tile < 16 or args.tile % 16 or args.objects < 0:
        p.error("--side must be >= 1, --tile a multiple of 16, --objects >= 0")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.monotonic()
    scene = write_large_scene(args.out, args.side, tile=args.tile, objects=args.objects,
                              seed=args.seed, gsd=args.gsd)
    seconds = time.monotonic() - start
    print(f"[large-scene] {scene.path}: {args.side} x {args.side} px "
          f"({args.side**2 / 1e6:.0f} Mpx), {os.path.getsize(scene.path) / 1e6:.1f} MB, "
          f"{len(scene.boxes)} objects, {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
