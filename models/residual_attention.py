"""Residual Attention Network (Wang et al., CVPR 2017).

An attention module is a trunk branch (``t`` residual units) and a soft mask branch
(bottom-up top-down: max-pool down, residual units, bilinear up, skip connections, two 1x1 convs,
an activation), combined as ``(1 + M(x)) * T(x)`` (attention residual learning), with ``p``
residual units before and after. Residual units are pre-activation bottlenecks.

Registered configurations (classifiers of the low-resolution view, no patch reads):
- ``residual_attention_56`` / ``residual_attention_92``: the paper's ImageNet networks, stage
  multiplicities (1, 1, 1) and (1, 2, 3). At 1000 classes they have 31.81 M and 52.47 M
  parameters; the paper quotes 31.9 M and 51.3 M (-0.3 %, +2.3 %). Every convolution of
  Attention-92 here has a counterpart of the same shape in the authors' Caffe file
  (fwang91/residual-attention-network, ``model/Attention-92-deploy.prototxt``) and vice versa,
  and its convolutions plus classifier alone come to 52.33 M (+2.01 %): no counting convention
  (leaving out BatchNorm or the classifier bias) brings the released structure within 2 % of
  51.3 M. The paper's two figures imply 19.4 M for one more stage-2 and two more stage-3
  modules; the paper's module (p=1, t=2, r=1, two 1x1 convs in the mask head) costs 20.66 M.
  Identity mask skip connections (no residual unit on them) would give 31.39 M / 51.77 M, but
  the released prototxt has the units and that variant moves Attention-56 away from its
  figure, so the released structure is kept.
- ``residual_attention_small``: three narrow stages for small views (tens of thousands of params).
- ``residual_attention_patch``: two narrower stages, a feature net for small patches (backbone
  only).
``build_residual_attention_backbone(name)`` gives the same networks without their classifier, as
the feature network of the patch models (``models.backbones.build_backbone`` dispatches it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.protocol import AttentionModel, ModelOutput, Steps
from models.registry import register_model

MASK_ACTIVATIONS = ("mixed", "channel", "spatial")
# "random": PyTorch's default init of the mask head (the paper); "zero": its last 1x1 conv zeroed
MASK_INITS = ("random", "zero")


def mask_activation(x: Tensor, kind: str, eps: float = 1e-6) -> Tensor:
    """The soft mask's activation on (N, C, h, w) pre-activations.

    - ``mixed``: element-wise sigmoid.
    - ``channel``: L2 normalisation over channels at each position, ``x / ||x_{:, i, j}||_2``.
    - ``spatial``: per channel, standardise over space (mean 0, std 1), then sigmoid.
    """
    if kind == "mixed":
        return torch.sigmoid(x)
    if kind == "channel":
        return x / (x.norm(dim=1, keepdim=True) + eps)
    if kind == "spatial":
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return torch.sigmoid((x - mean) / (std + eps))
    raise ValueError(f"unknown mask activation {kind!r}; expected one of {MASK_ACTIVATIONS}")


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1(c/4)-BN-ReLU-3x3(c/4, stride)-BN-ReLU-1x1(c).

    A 1x1 projection (on the pre-activated input) replaces the identity shortcut when the width
    or the stride changes. (N, c_in, h, w) -> (N, c_out, h / stride, w / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        mid = max(c_out // 4, 1)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.project = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if c_in != c_out or stride != 1
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        shortcut = x if self.project is None else self.project(pre)
        return out + shortcut


def _units(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualUnit(c, c) for _ in range(n)])


def _pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class MaskLevel(nn.Module):
    """One level of the bottom-up top-down mask: pool, ``r`` units, then either a deeper level
    (with a skip unit added after its upsampling and ``r`` units after that) or, innermost,
    ``r`` more units. Returns the map at this level's (pooled) resolution."""

    def __init__(self, c: int, depth: int, r: int):
        super().__init__()
        self.down = _units(c, r)
        if depth > 1:
            self.skip = ResidualUnit(c, c)
            self.inner = MaskLevel(c, depth - 1, r)
            self.up = _units(c, r)
        else:
            self.skip = self.inner = None
            self.up = _units(c, r)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(_pool(x))
        if self.inner is None:
            return self.up(y)
        merged = _up(self.inner(y), y) + self.skip(y)
        return self.up(merged)


class AttentionModule(nn.Module):
    """``p`` units, then ``(1 + M) * T`` with a trunk of ``t`` units and a mask of ``depth``
    pooling steps, then ``p`` units. (N, c, h, w) -> (N, c, h, w); also returns the mask M."""

    def __init__(
        self, c: int, depth: int, p: int = 1, t: int = 2, r: int = 1, activation="mixed",
        mask_init: str = "random",
    ):
        super().__init__()
        if activation not in MASK_ACTIVATIONS:
            raise ValueError(f"unknown mask activation {activation!r}; expected {MASK_ACTIVATIONS}")
        if mask_init not in MASK_INITS:
            raise ValueError(f"unknown mask_init {mask_init!r}; expected one of {MASK_INITS}")
        self.activation = activation
        self.pre = _units(c, p)
        self.trunk = _units(c, t)
        self.mask = MaskLevel(c, depth, r)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
        )
        if mask_init == "zero":
            # the mask's last conv starts at zero: M is the same at every position and channel
            # (1/2 with "mixed"), so the module starts as its trunk scaled uniformly
            nn.init.zeros_(self.head[-1].weight)
        self.post = _units(c, p)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = mask_activation(self.head(_up(self.mask(x), x)), self.activation)
        return self.post((1.0 + mask) * trunk), mask


@dataclass(frozen=True, slots=True)
class RANConfig:
    """Architecture of a Residual Attention Network.

    Attributes:
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "small" (3x3 conv, stride 1) or
            "patch" (3x3 conv, stride 2).
        stem_width: channels after the stem.
        widths: output channels of each attention stage (one residual unit enters each stage,
            the first at stride 1, the others at stride 2).
        modules: attention modules per stage.
        mask_depths: pooling steps of each stage's mask branch.
        final_width: channels of the last (post-attention) residual units, entered at stride 2.
        final_units: number of those units.
    """

    stem: str
    stem_width: int
    widths: tuple[int, ...]
    modules: tuple[int, ...]
    mask_depths: tuple[int, ...]
    final_width: int
    final_units: int


CONFIGS = {
    "residual_attention_56": RANConfig("imagenet", 64, (256, 512, 1024), (1, 1, 1), (3, 2, 1), 2048, 3),
    "residual_attention_92": RANConfig("imagenet", 64, (256, 512, 1024), (1, 2, 3), (3, 2, 1), 2048, 3),
    "residual_attention_small": RANConfig("small", 16, (32, 64, 128), (1, 1, 1), (2, 1, 1), 256, 1),
    # a patch-sized feature net (24 px patches of the learning benchmark): a stride-2 stem, two
    # stages of one attention module each, the widths and strides of ``small_cnn``'s (16, 32, 64)
    "residual_attention_patch": RANConfig("patch", 16, (16, 32), (1, 1), (1, 1), 64, 1),
}


class ResidualAttentionFeatures(nn.Module):
    """The network without its classifier: (N, C, h, w) -> (N, out_channels, h', w').

    ``forward(x, return_masks=True)`` also returns every attention module's mask.
    """

    def __init__(
        self, config: RANConfig, in_channels: int = 3, p=1, t=2, r=1, activation="mixed",
        mask_init: str = "random",
    ):
        super().__init__()
        if config.stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, config.stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(config.stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif config.stem in ("small", "patch"):
            stride = 2 if config.stem == "patch" else 1
            self.stem = nn.Conv2d(in_channels, config.stem_width, 3, stride=stride, padding=1, bias=False)
        else:
            raise ValueError(f"unknown stem {config.stem!r}")
        stages, c_in = [], config.stem_width
        for i, (width, n, depth) in enumerate(
            zip(config.widths, config.modules, config.mask_depths, strict=True)
        ):
            entry = ResidualUnit(c_in, width, stride=1 if i == 0 else 2)
            blocks = [
                AttentionModule(width, depth, p, t, r, activation, mask_init) for _ in range(n)
            ]
            stages.append(nn.ModuleList([entry, *blocks]))
            c_in = width
        self.stages = nn.ModuleList(stages)
        final = [ResidualUnit(c_in, config.final_width, stride=2)]
        final += [ResidualUnit(config.final_width, config.final_width) for _ in range(config.final_units - 1)]
        self.final = nn.Sequential(*final, nn.BatchNorm2d(config.final_width), nn.ReLU(inplace=True))
        self.out_channels = config.final_width

    def forward(self, x: Tensor, return_masks: bool = False):
        masks = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage[0](x)
            for module in stage[1:]:
                x, mask = module(x)
                masks.append(mask)
        x = self.final(x)
        return (x, masks) if return_masks else x


def build_residual_attention_backbone(
    name: str, in_channels: int = 3, p: int = 1, t: int = 2, r: int = 1, activation: str = "mixed",
    mask_init: str = "random",
) -> ResidualAttentionFeatures:
    """Feature network ``name`` (a key of ``CONFIGS``), with ``out_channels``."""
    if name not in CONFIGS:
        raise KeyError(f"unknown residual attention network {name!r}; known: {sorted(CONFIGS)}")
    return ResidualAttentionFeatures(CONFIGS[name], in_channels, p, t, r, activation, mask_init)


class ResidualAttentionClassifier(AttentionModel):
    """Classifier of the view: features -> global average pool -> linear. Reads no patches.

    ``attention`` in the output is the last attention module's mask averaged over channels,
    upsampled to the view size (B, h, w), normalised to sum to 1 per scene.
    """

    def __init__(
        self,
        config: RANConfig,
        num_classes: int,
        view_size: tuple[int, int],
        in_channels: int = 3,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        activation: str = "mixed",
    ):
        super().__init__()
        self.view_size = tuple(view_size)
        self.features = ResidualAttentionFeatures(config, in_channels, p, t, r, activation)
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        yield from ()  # reads nothing beyond the view
        fmap, masks = self.features(views, return_masks=True)
        logits = self.classifier(fmap.mean(dim=(-2, -1)))
        attention = _up(masks[-1].mean(dim=1, keepdim=True), views)[:, 0]
        attention = attention.clamp(min=0) / attention.clamp(min=0).sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        return ModelOutput(logits=logits, attention=attention.detach())


def _factory(name: str, default_view: tuple[int, int]):
    defaults = {"num_classes": 10, "view_size": default_view}

    def build(**kwargs) -> ResidualAttentionClassifier:
        return ResidualAttentionClassifier(CONFIGS[name], **{**defaults, **kwargs})

    build.__doc__ = (
        f"{name}: Residual Attention Network classifying the view "
        "(keyword arguments of ``ResidualAttentionClassifier`` but ``config``)."
    )
    return register_model(name)(build)


residual_attention_56 = _factory("residual_attention_56", (224, 224))
residual_attention_92 = _factory("residual_attention_92", (224, 224))
residual_attention_small = _factory("residual_attention_small", (64, 64))
