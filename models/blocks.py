"""Small attention blocks that the built-in backbones can switch on: SE and CBAM.

Both map (N, C, h, w) -> (N, C, h, w) by multiplying the input with gates in (0, 1), and both
are per-sample (no batch statistics), so they never couple the scenes of a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _hidden(channels: int, ratio: int) -> int:
    if channels < 1 or ratio < 1:
        raise ValueError(f"channels and ratio must be >= 1, got {channels}, {ratio}")
    return max(1, channels // ratio)


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018).

    Global average pool -> FC (C -> C/ratio) -> ReLU -> FC (C/ratio -> C) -> sigmoid -> scale
    each channel: ``out[n, c] = x[n, c] * gate[n, c]``. The FC layers have biases, as in
    SE-ResNet (SE-ResNet-50 then has 28.09 M parameters with a 1000-class head).
    """

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = _hidden(channels, ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, x: Tensor) -> Tensor:
        """(N, C) channel gates in (0, 1)."""
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(-2, -1))))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)[:, :, None, None]


class ChannelGate(nn.Module):
    """CBAM's channel attention: ``sigmoid(MLP(avgpool x) + MLP(maxpool x))``, shared MLP."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = _hidden(channels, ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

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

    def gate(self, x: Tensor) -> Tensor:
        """(N, 1, h, w) spatial gates in (0, 1)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al., 2018): channel gate, then spatial gate.

    ``out = s(x') * x'`` with ``x' = c(x) * x``: the spatial gate sees the channel-gated input.
    """

    def __init__(self, channels: int, ratio: int = 16, kernel: int = 7):
        super().__init__()
        self.channel = ChannelGate(channels, ratio)
        self.spatial = SpatialGate(kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


def attention_block(
    channels: int, *, se: bool = False, cbam: bool = False, ratio: int = 16
) -> nn.Module:
    """The block the backbones insert: SE, CBAM, both (SE then CBAM) or identity."""
    layers: list[nn.Module] = []
    if se:
        layers.append(SEBlock(channels, ratio))
    if cbam:
        layers.append(CBAM(channels, ratio))
    if not layers:
        return nn.Identity()
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
