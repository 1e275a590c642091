"""Layers shared by the model families (as timm's ``layers``): attention blocks and pooling.

- ``se``: ``SEBlock``, the one squeeze-and-excitation block (SE-ResNet's, EfficientNet's MBConv
  SE and TNet's location module all use it, with their own width and activation);
- ``cbam``: ``ChannelGate``, ``SpatialGate``, ``CBAM``;
- ``soft_mask``: ``SoftMask``, Residual Attention's ``(1 + M) x`` with a one-level mask branch;
- ``switch``: ``attention_block``, the SE / CBAM / soft-mask switch that the built-in backbones insert;
- ``pool``: ``pooled``, global average or max pooling of a feature map; ``AttentionPool``, a
  learned softmax-weighted average of its positions; ``scaled_unit``, the cosine classifier's
  scaled unit features;
- ``prior``: ``contrast_prior``, the fixed starting point of hard attention's scores;
- ``shift``: ``random_shift``, whole-pixel random translations (a patch augmentation), and
  ``patch_shift_setting``, the models' check of its size.

Pure PyTorch, no I/O; nothing here imports another ``models`` module.
"""

from models.layers.cbam import CBAM, ChannelGate, SpatialGate
from models.layers.pool import AttentionPool, pooled, scaled_unit
from models.layers.prior import contrast_prior
from models.layers.se import SEBlock, hidden_width
from models.layers.shift import patch_shift_setting, random_shift
from models.layers.soft_mask import SoftMask
from models.layers.switch import attention_block

__all__ = [
    "AttentionPool",
    "CBAM",
    "ChannelGate",
    "SEBlock",
    "SoftMask",
    "SpatialGate",
    "attention_block",
    "contrast_prior",
    "hidden_width",
    "patch_shift_setting",
    "pooled",
    "random_shift",
    "scaled_unit",
]
