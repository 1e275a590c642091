"""In-memory ``PixelSource`` over tensor pyramids: for tests and data sets that fit in RAM.

The pyramid is built exactly like the Zarr pyramids of ``pipeline.store.pyramid`` (the same integer
2x2 area average with edge replication), so the same boxes give identical tensors from both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.protocol import ReadRequest, box_at_level, resize_patches


def downsample2x(image: Tensor) -> Tensor:
    """Halve (C, H, W) uint8 by the rounded mean of each 2x2 block.

    Odd sides are padded by replicating the last row/column, so the result is
    (C, ceil(H/2), ceil(W/2)). Integer arithmetic: ``(a + b + c + d + 2) // 4``.
    """
    c, h, w = image.shape
    x = image.to(torch.int32)
    if h % 2 or w % 2:
        x = F.pad(x[None].float(), (0, w % 2, 0, h % 2), mode="replicate")[0].to(torch.int32)
    s = x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]
    return ((s + 2) // 4).to(torch.uint8)


def build_pyramid(image: Tensor, coarsest: int = 256) -> list[Tensor]:
    """Levels of (C, H, W) uint8 ``image`` down to a long side of at most ``coarsest`` px."""
    levels = [image]
    while max(levels[-1].shape[-2:]) > coarsest:
        levels.append(downsample2x(levels[-1]))
    return levels


def crop_padded(level: Tensor, y0: int, x0: int, y1: int, x1: int) -> Tensor:
    """(C, y1-y0, x1-x0) crop of (C, H, W) ``level``; outside the array reads as 0."""
    c, h, w = level.shape
    out = torch.zeros((c, y1 - y0, x1 - x0), dtype=level.dtype)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = level[:, sy0:sy1, sx0:sx1]
    return out


class TensorPyramidSource:
    """``PixelSource`` over a mapping of scene key -> list of uint8 (C, H, W) levels."""

    def __init__(self, pyramids: Mapping[str, Sequence[Tensor]]):
        self.pyramids = {k: list(v) for k, v in pyramids.items()}

    @classmethod
    def from_images(cls, images: Mapping[str, Tensor], coarsest: int = 256) -> TensorPyramidSource:
        """Build pyramids from level-0 uint8 (C, H, W) images."""
        return cls({k: build_pyramid(v, coarsest) for k, v in images.items()})

    def _levels(self, key: str) -> list[Tensor]:
        try:
            return self.pyramids[key]
        except KeyError:
            raise KeyError(f"scene {key!r} is not in this TensorPyramidSource") from None

    def level0_sizes(self, keys: Sequence[str]) -> Tensor:
        return torch.tensor([list(self._levels(k)[0].shape[-2:]) for k in keys], dtype=torch.int64)

    def view(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        views = []
        for key in keys:
            levels = self._levels(key)
            # the coarsest level still at least as large as the view on both sides
            level = next(
                (lv for lv in reversed(levels) if lv.shape[1] >= size[0] and lv.shape[2] >= size[1]),
                levels[0],
            )
            views.append(resize_patches(level[None].float() / 255.0, size)[0])
        return torch.stack(views)

    def read(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        if len(keys) != request.boxes.shape[0]:
            raise ValueError(f"{len(keys)} keys for {request.boxes.shape[0]} rows of boxes")
        out = []
        for key, boxes, at in zip(keys, request.boxes.tolist(), request.levels, strict=True):
            levels = self._levels(key)
            if at >= len(levels):
                raise ValueError(f"scene {key!r} has {len(levels)} levels, asked for {at}")
            level = levels[at]
            patches = [
                resize_patches(crop_padded(level, *box_at_level(b, at))[None].float() / 255.0, request.size)[0]
                for b in boxes
            ]
            out.append(torch.stack(patches) if patches else torch.zeros((0, level.shape[0], *request.size)))
        return torch.stack(out)
