"""Convolutional block attention module (Woo et al., 2018) and its two gates.

Both gates map (N, C, h, w) -> (N, C, h, w) by multiplying the input with gates in (0, 1), per
sample (no batch statistics), so they never couple the scenes of a batch. Both start at exactly
1/2 everywhere (zero-initialised output layers), a uniform scale, and learn from there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.layers.se import hidden_width


class ChannelGate(nn.Module):
    """CBAM's channel attention: ``sigmoid(MLP(avgpool x) + MLP(maxpool x))``, shared MLP."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = hidden_width(channels, ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        # zero-initialised output: every gate starts at exactly 1/2, uniform, and learns from there
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def gate(self, x: Tensor) -> Tensor:
        """(N, C) channel gates in (0, 1)."""
        return torch.sigmoid(self.mlp(x.mean(dim=(-2, -1))) + self.mlp(x.amax(dim=(-2, -1))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM's spatial attention: ``sigmoid(conv_k([mean_c x, max_c x]))``, one map per sample.

    The official CBAM code adds a BatchNorm after this conv; it is left out here so that the
    gate stays per-sample (a conv with a bias has the same expressive power at inference).
    """

    def __init__(self, kernel: int = 7):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"CBAM spatial kernel must be odd and >= 1, got {kernel}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel, padding=kernel // 2)
        # zero-initialised: the gate starts at exactly 1/2 everywhere. A random 7x7 conv on the
        # channel mean and max gave a random spatial mask at initialisation that hid parts of
        # the objects (ATS with CBAM learned late: 0.788 against 0.956 without; README)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def gate(self, x: Tensor) -> Tensor:
        """(N, 1, h, w) spatial gates in (0, 1)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel gate, then spatial gate: ``out = s(x') * x'`` with ``x' = c(x) * x`` (the spatial
    gate sees the channel-gated input)."""

    def __init__(self, channels: int, ratio: int = 16, kernel: int = 7):
        super().__init__()
        self.channel = ChannelGate(channels, ratio)
        self.spatial = SpatialGate(kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))
