"""Large test scenes as tiled BigTIFFs of any size, written tile by tile (never held whole).

A scene of ``side`` x ``side`` RGB px: a plaid background of period 16 px (so that its
statistics, and the bytes a patch costs, are the same at every side; zlib and zstd compress it
well) with a gentle vertical gradient, and a few tiny objects (filled squares of 24-64 px in
saturated colours at seeded positions). ``tifffile`` pulls the tiles from a generator, so
memory is a few tiles whatever the side: a 32,768 px scene (3.2 GB of pixels) is a ~100 MB file.
``geo`` adds GeoTIFF tags (a UTM 33N raster with ``gsd`` m pixels) for the ingest's geo
attributes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PERIOD = 16  # px of the background plaid; divides every TIFF tile side (multiples of 16)


@dataclass(frozen=True, slots=True)
class LargeScene:
    """What ``write_large_scene`` wrote: the file, its side and tile, the objects' boxes
    ``(y0, x0, y1, x1)`` (level-0 px, half-open) and colours."""

    path: str
    side: int
    tile: int
    boxes: tuple[tuple[int, int, int, int], ...]
    colours: tuple[tuple[int, int, int], ...]


def plan_objects(side: int, objects: int, seed: int) -> tuple[tuple, tuple]:
    """``objects`` seeded squares of 24-64 px inside the scene: (boxes, colours)."""
    rng = np.random.default_rng(seed)
    boxes, colours = [], []
    for _ in range(objects):
        size = int(rng.integers(24, 65))
        size = min(size, side)
        y0, x0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        boxes.append((y0, x0, y0 + size, x0 + size))
        colours.append(tuple(int(v) for v in rng.choice([0, 255], size=3)))
    return tuple(boxes), tuple(colours)


def background_tile(tile: int) -> np.ndarray:
    """(tile, tile, 3) uint8 plaid, the same for every tile (period ``PERIOD`` px)."""
    t = np.arange(tile)
    wave = np.sin(2 * math.pi * t / PERIOD)
    r = 110 + 25 * wave[None, :] + 15 * wave[:, None]
    g = 100 + 20 * np.cos(2 * math.pi * t / PERIOD)[None, :] + 0 * t[:, None]
    b = 90 + 18 * wave[:, None] + 0 * t[None, :]
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def scene_tiles(side: int, tile: int, boxes: tuple, colours: tuple) -> Iterator[np.ndarray]:
    """The scene's (tile, tile, 3) tiles in row-major order (edge tiles full size: TIFF pads)."""
    base = background_tile(tile)
    across = -(-side // tile)
    for ty in range(across):
        shade = np.uint8(round(24 * ty / max(across - 1, 1)))
        row = base + shade
        for tx in range(across):
            y0, x0 = ty * tile, tx * tile
            hits = [(b, c) for b, c in zip(boxes, colours, strict=True)
                     if b[0] < y0 + tile and b[2] > y0 and b[1] < x0 + tile and b[3] > x0]
            if not hits:
                yield row
                continue
            out = row.copy()
            for (by0, bx0, by1, bx1), colour in hits:
                out[max(by0 - y0, 0) : by1 - y0, max(bx0 - x0, 0) : bx1 - x0] = colour
            yield out


def write_large_scene(path: str, side: int, *, tile: int = 256, objects: int = 6, seed: int = 0,
                      gsd: float | None = None, level: int = 1) -> LargeScene:
    """Write the scene as a tiled, zlib-compressed BigTIFF at local ``path``.

    Args:
        side: px of each side. tile: TIFF tile side (a multiple of 16). objects: squares.
        seed: object positions and colours. gsd: metres per pixel for GeoTIFF tags (None:
            plain TIFF). level: zlib level (1: fast; the plaid compresses well anyway).
    """
    import tifffile

    if side < 1 or tile < 16 or tile % 16:
        raise ValueError(f"side must be >= 1 and tile a multiple of 16, got {side}, {tile}")
    boxes, colours = plan_objects(side, objects, seed)
    tifffile.imwrite(
        path, scene_tiles(side, tile, boxes, colours), shape=(side, side, 3), dtype=np.uint8,
        tile=(tile, tile), bigtiff=True, photometric="rgb", compression="zlib",
        compressionargs={"level": level}, extratags=geo_tags(gsd) if gsd else (),
    )
    return LargeScene(path, side, tile, boxes, colours)


def geo_tags(gsd: float) -> list[tuple]:
    """GeoTIFF tags of a raster in UTM zone 33N (EPSG 32633), metres, ``gsd`` m pixels, its
    top-left corner at (500,000 E, 5,000,000 N): pixel scale, tiepoint, GeoKey directory."""
    keys = [1, 1, 0, 4,
            1024, 0, 1, 1,       # GTModelTypeGeoKey: projected
            1025, 0, 1, 1,       # GTRasterTypeGeoKey: pixel is area
            3072, 0, 1, 32633,   # ProjectedCSTypeGeoKey: WGS 84 / UTM 33N
            3076, 0, 1, 9001]    # ProjLinearUnitsGeoKey: metre
    return [
        (33550, "d", 3, (gsd, gsd, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0), True),
        (34735, "H", len(keys), keys, True),
    ]
