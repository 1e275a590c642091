"""Pooling helpers shared by the model heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("avg", "max")


def pooled(fmap: torch.Tensor, kind: str = "avg") -> torch.Tensor:
    """Global pool: (N, D, h, w) -> (N, D); ``kind`` "avg" or "max" (max keeps a small object's
    response whole where the average dilutes it over the empty rest of the map)."""
    if kind == "avg":
        return fmap.mean(dim=(-2, -1))
    if kind == "max":
        return fmap.amax(dim=(-2, -1))
    raise ValueError(f"pool must be one of {POOLS}, got {kind!r}")


def scaled_unit(features: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, D) features L2-normalised and multiplied by ``scale`` (a cosine classifier's
    temperature: a fresh linear layer on unit features gives logits of about +-1, and
    cross-entropy barely moves); ``scale == 0`` returns them unchanged."""
    return scale * F.normalize(features, dim=-1) if scale else features


class AttentionPool(nn.Module):
    """Learned global pool: ``sum_p softmax_p(a(x_p)) x_p`` over the map's positions p, with
    ``a`` a 1x1 convolution to one score per position (attention-based MIL pooling, Ilse et
    al. 2018, with a linear score). (N, D, h, w) -> (N, D).

    The scores start at zero, so the pool starts as the average and learns where to look: an
    average over the positions it weights, so, unlike the max, it still counts repeated objects.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(fmap).flatten(1), dim=-1)  # (N, h*w)
        return torch.einsum("np,ndp->nd", weights, fmap.flatten(2))
