"""Pyramid scenes for the store and read tests: textured images with empty chunks, pyramids
written from them, random (possibly out-of-scene) boxes."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.store.pyramid import write_pyramid

CHUNK, SHARD, COARSEST = 16, 64, 64


def textured(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Noise plus smooth structure, with an all-zero block so empty chunks occur."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 100 + 60 * np.sin(yy / 7.0) * np.cos(xx / 11.0)
    img = np.stack([base + rng.normal(0, 20, (h, w)) for _ in range(c)])
    img = img.clip(0, 255).astype(np.uint8)
    img[:, : h // 3, : w // 4] = 0
    return img


def write_scenes(root: str, shapes) -> dict[str, torch.Tensor]:
    images = {}
    for i, (h, w) in enumerate(shapes):
        img = textured(3, h, w, seed=10 + i)
        uri = write_pyramid(root, f"scene-{i}", img, {"label": i}, coarsest=COARSEST,
                            chunk=CHUNK, shard=SHARD)
        images[uri] = torch.from_numpy(img)
    return images


def random_boxes(b: int, k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randint(-30, h, (b, k, 1), generator=g)
    x0 = torch.randint(-30, w, (b, k, 1), generator=g)
    hh = torch.randint(1, 90, (b, k, 1), generator=g)
    ww = torch.randint(1, 90, (b, k, 1), generator=g)
    return torch.cat([y0, x0, y0 + hh, x0 + ww], -1)
