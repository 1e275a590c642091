"""The SE / CBAM / soft-mask switch of the built-in backbones (``se=True`` / ``cbam=True`` /
``mask=True``)."""

from __future__ import annotations

from torch import nn

from models.layers.cbam import CBAM
from models.layers.se import SEBlock
from models.layers.soft_mask import SoftMask


def attention_block(
    channels: int, *, se: bool = False, cbam: bool = False, ratio: int = 16, mask: bool = False
) -> nn.Module:
    """The block the backbones insert: any of SE, CBAM and Residual Attention's soft mask
    (``SoftMask``), in that order, or identity."""
    layers: list[nn.Module] = []
    if se:
        layers.append(SEBlock(channels, ratio))
    if cbam:
        layers.append(CBAM(channels, ratio))
    if mask:
        layers.append(SoftMask(channels))
    if not layers:
        return nn.Identity()
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
