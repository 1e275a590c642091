"""Residual Attention's attention residual learning as a block (Wang et al., CVPR 2017).

``SoftMask`` gates a stage's output with a bottom-up top-down soft mask, ``out = (1 + M(x)) * x``:
the stage's own convolutions are the trunk, and the mask branch is one level of the paper's
hourglass (3x3 max-pool with stride 2, a 3x3 conv with batch norm and ReLU at the pooled
resolution, bilinear upsampling back, then the paper's mask head: 1x1 conv and an element-wise
sigmoid, the "mixed" attention). The backbones insert it as they insert SE and CBAM
(``attention_block(..., mask=True)``), so the soft-attention family can sit inside a
patch network at a fraction of the full Residual Attention Network's cost
(``models.residual_attention``: pre-activation bottleneck units, ``p``, ``t``, ``r``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftMask(nn.Module):
    """``(1 + M(x)) * x`` with a one-level bottom-up top-down mask branch: (N, C, h, w) ->
    (N, C, h, w); ``M`` in (0, 1) per channel and position, so the block never hides its input
    (at worst it passes it unchanged: attention residual learning)."""

    def __init__(self, channels: int):
        super().__init__()
        self.down = nn.Sequential(
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(channels, channels, 1)

    def mask(self, x: Tensor) -> Tensor:
        """The soft mask M (N, C, h, w) in (0, 1)."""
        up = F.interpolate(self.down(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(up))

    def forward(self, x: Tensor) -> Tensor:
        return (1.0 + self.mask(x)) * x
