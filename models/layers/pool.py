"""Pooling helpers shared by the model heads."""

from __future__ import annotations

import torch


def pooled(fmap: torch.Tensor) -> torch.Tensor:
    """Global average pool: (N, D, h, w) -> (N, D)."""
    return fmap.mean(dim=(-2, -1))
