"""Scenes whose pixels name their own (y, x), and a source that records what it was asked for
and what it returned, to check that models read the pixels under their boxes."""

import torch


def coded_scene(h: int, w: int) -> torch.Tensor:
    """(3, h, w) uint8: channel 0 = y % 256, channel 1 = x % 256, channel 2 =
    (y // 256) * 16 + x // 256, so every pixel of a scene up to 4096 px names its (y, x)."""
    y = torch.arange(h)[:, None].expand(h, w)
    x = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([y % 256, x % 256, (y // 256) * 16 + x // 256]).to(torch.uint8)


def decode(patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, h, w) float patch in [0, 1] of a coded scene -> (y, x) int64 maps."""
    v = (patch * 255).round().to(torch.int64)
    return v[0] + (v[2] // 16) * 256, v[1] + (v[2] % 16) * 256


class Recording:
    """PixelSource wrapper that keeps every request and the patches it returned."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def view(self, keys, size):
        return self.inner.view(keys, size)

    def level0_sizes(self, keys):
        return self.inner.level0_sizes(keys)

    def read(self, keys, request):
        out = self.inner.read(keys, request)
        self.log.append((request, out))
        return out
