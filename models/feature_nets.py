"""Feature networks for the Models II family, built by name or injected as a module.

``make_backbone("small_cnn")`` goes to ``models.backbones.build_backbone`` (the shared built-in
backbones, with SE / CBAM switches); ``residual_attention_*`` names build the Residual Attention
Network's feature extractor of ``models.residual_attention``; an ``nn.Module`` with an
``out_channels`` attribute is used as given (tests inject tiny conv stacks that way). Every
backbone maps (N, C, h, w) to a feature map (N, out_channels, h', w').
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_backbone(spec: str | nn.Module, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A feature network from a registered name or a ready module (with ``out_channels``)."""
    if isinstance(spec, nn.Module):
        if not hasattr(spec, "out_channels"):
            raise TypeError(f"backbone module {type(spec).__name__} has no `out_channels`")
        return spec
    if spec.startswith("residual_attention"):
        from models.residual_attention import build_residual_attention_backbone

        return build_residual_attention_backbone(spec, in_channels=in_channels, **kwargs)
    from models.backbones import build_backbone

    return build_backbone(spec, in_channels=in_channels, **kwargs)


def pooled(fmap: torch.Tensor) -> torch.Tensor:
    """Global average pool: (N, D, h, w) -> (N, D)."""
    return fmap.mean(dim=(-2, -1))
