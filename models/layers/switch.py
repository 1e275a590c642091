"""The SE / CBAM switch of the built-in backbones (``se=True`` / ``cbam=True``)."""

from __future__ import annotations

from torch import nn

from models.layers.cbam import CBAM
from models.layers.se import SEBlock


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
