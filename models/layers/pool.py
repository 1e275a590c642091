"""Pooling helpers shared by the model heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
