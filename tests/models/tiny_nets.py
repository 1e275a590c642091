"""Tiny feature networks and scenes for the tests of the other families (fast on 2 CPU cores)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.memory import TensorPyramidSource
from models.protocol import PixelSource, ReadRequest


class TinyConv(nn.Module):
    """Two 3x3 convs, stride 2 each: (N, C, h, w) -> (N, width, h/4, w/4)."""

    def __init__(self, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out_channels = width

    def forward(self, x):
        return self.net(x)


class RecordingSource:
    """``PixelSource`` wrapper that records every ``ReadRequest`` it serves."""

    def __init__(self, inner: PixelSource):
        self.inner = inner
        self.requests: list[ReadRequest] = []

    def view(self, keys, size):
        return self.inner.view(keys, size)

    def level0_sizes(self, keys):
        return self.inner.level0_sizes(keys)

    def read(self, keys, request):
        self.requests.append(request)
        return self.inner.read(keys, request)


def random_scenes(shapes, seed: int = 0, coarsest: int = 64) -> tuple[TensorPyramidSource, list[str]]:
    """In-memory pyramids of random uint8 RGB scenes of the given (h, w) shapes."""
    g = torch.Generator().manual_seed(seed)
    images = {
        f"s{i}": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        for i, (h, w) in enumerate(shapes)
    }
    return TensorPyramidSource.from_images(images, coarsest=coarsest), list(images)


def coordinate_scene(h: int, w: int) -> torch.Tensor:
    """uint8 (3, h, w) scene whose channels encode y, x and a checker, so misplaced reads show."""
    y = torch.arange(h)[:, None].expand(h, w)
    x = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([(y * 255) // max(h - 1, 1), (x * 255) // max(w - 1, 1), ((y // 4 + x // 4) % 2) * 255]).to(
        torch.uint8
    )


def scene_batches(source, keys, view_size, labels, batch_size=4):
    views = source.view(keys, view_size).numpy()
    sizes = source.level0_sizes(keys).numpy()
    return [
        {"key": np.array(keys[i : i + batch_size]), "view": views[i : i + batch_size],
         "size": sizes[i : i + batch_size], "label": labels[i : i + batch_size]}
        for i in range(0, len(keys), batch_size)
    ]
