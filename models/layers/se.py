"""Squeeze-and-excitation (Hu et al., 2018): the one SE block of every model family."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_ACTIVATIONS = {"relu": torch.relu, "silu": nn.functional.silu}

# Parameter names of the SE blocks this one replaced, so that their state dicts still load:
# EfficientNet's (1x1 convs ``reduce`` / ``expand``) and TNet's (``fc = Sequential(fc, relu, fc)``).
_LEGACY_NAMES = {"reduce.": "fc1.", "expand.": "fc2.", "fc.0.": "fc1.", "fc.2.": "fc2."}


def hidden_width(channels: int, ratio: int) -> int:
    """Bottleneck width ``max(1, channels // ratio)`` of an SE or CBAM channel gate."""
    if channels < 1 or ratio < 1:
        raise ValueError(f"channels and ratio must be >= 1, got {channels}, {ratio}")
    return max(1, channels // ratio)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: (N, C, h, w) -> (N, C, h, w), per sample (no batch statistics).

    Global average pool -> FC (C -> hidden) -> activation -> FC (hidden -> C) -> sigmoid ->
    scale each channel: ``out[n, c] = x[n, c] * gate[n, c]``. Both FC layers have biases, as
    in SE-ResNet (SE-ResNet-50 then has 28.09 M parameters with a 1000-class head).

    Args:
        channels: C.
        ratio: bottleneck ratio; the hidden width is ``max(1, C // ratio)``.
        hidden: the hidden width itself (overrides ``ratio``; EfficientNet sets it from the
            MBConv block's input channels).
        act: "relu" (SE-ResNet, TNet) or "silu" (EfficientNet).
        conv: hold the FC layers as 1x1 convs (EfficientNet's layout, weights (out, in, 1, 1))
            rather than ``nn.Linear``: the same function and initial values, but the conv
            kernels round differently, so each family keeps the layout it was trained with.
    """

    def __init__(
        self,
        channels: int,
        ratio: int = 16,
        *,
        hidden: int | None = None,
        act: str = "relu",
        conv: bool = False,
    ):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown SE activation {act!r}; expected one of {sorted(_ACTIVATIONS)}")
        width = hidden_width(channels, ratio) if hidden is None else hidden
        self.act, self.conv = act, conv
        layer = (lambda cin, cout: nn.Conv2d(cin, cout, 1)) if conv else nn.Linear
        self.fc1 = layer(channels, width)
        self.fc2 = layer(width, channels)

    def gate(self, x: Tensor) -> Tensor:
        """(N, C) channel gates in (0, 1)."""
        squeezed = x.mean(dim=(-2, -1), keepdim=self.conv)
        return torch.sigmoid(self.fc2(_ACTIVATIONS[self.act](self.fc1(squeezed)))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)[:, :, None, None]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = dict(self.named_parameters())
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            for old, new in _LEGACY_NAMES.items():
                if rest.startswith(old):
                    name = new + rest[len(old) :]
                    value = state_dict.pop(key)
                    if name in own and value.numel() == own[name].numel():
                        value = value.reshape(own[name].shape)  # linear <-> 1x1 conv weights
                    state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args)
