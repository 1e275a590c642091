"""The one backbone builder: ``build_backbone(name_or_module, in_channels, se=, cbam=, **kwargs)``.

Every backbone maps (N, C, h, w) float images to a feature map (N, out_channels, h', w') and
has an ``out_channels`` attribute; pooling and heads belong to the models. Built with torch
alone (torchvision cannot be installed beside the CPU torch build here). Every model family
builds its networks here and takes the builder's keyword arguments as ``backbone_kwargs``
(``<role>_backbone_kwargs`` beside a ``<role>_backbone`` argument).

Names:
    ats_feature      the reference ATS patch feature net: 7x7 conv then three 3x3 convs,
                     32 channels, ReLU (``widths``, ``padding``).
    ats_attention    the reference ATS attention net: 3x3 convs of 8, 8 channels with tanh,
                     then a 3x3 conv to ONE channel (``out_channels == 1``): its output is a
                     1-channel logit map at the input's resolution (``widths``).
    small_cnn        a small generic CNN: a 3x3 stem, then stages of two 3x3 convs (the first
                     with stride 2), normalisation and ReLU (``widths``, ``norm``); 8x smaller
                     output with the default 3 stages.
    resnet18/34/50   ResNet v1.5 (stride in the 3x3 conv), headless, ``width`` multiplier,
                     ``stem`` "imagenet" (7x7/2 + max pool, 32x smaller output) or "small"
                     (3x3/1 without pool, 8x smaller), ``norm``.
    efficientnet_b0  EfficientNet-B0: MBConv blocks with their own SE (a quarter of the block's
                     input channels) and swish, 1x1 head to 1280 channels, 32x smaller output.
    residual_attention_56/92/small/patch
                     the Residual Attention Network's feature extractor
                     (``models.residual_attention``; ``p``, ``t``, ``r``, ``activation``).
    dasnet           dasNet's gated CNN (``models.dasnet.GatedBackbone``): ``passes`` passes of
                     ``backbone`` with per-filter gains from an SNES-trained policy (all 1
                     until trained); ``backbone_kwargs``, ``gate``, ``policy``.
    timm:<name>      any timm model's ``forward_features`` when timm is installed;
                     ``weights_path=`` loads a local state dict (.safetensors or torch file);
                     nothing is ever downloaded.

An ``nn.Module`` with an ``out_channels`` attribute is used as given (tests inject tiny conv
stacks that way); keyword arguments are then ignored.

``se=True`` / ``cbam=True`` insert ``models.layers.SEBlock`` / ``CBAM`` (ratio ``ratio``,
default 16) after every conv block of the plain conv stacks, and on the residual branch
(before the addition) of every ResNet block, as SE-ResNet and CBAM-ResNet do. EfficientNet-B0
already has SE (``SEBlock`` with swish) in every MBConv (``se`` changes nothing);
``cbam=True`` replaces that SE by CBAM with the same bottleneck width.

``norm``: "batch" (default), "group" (GroupNorm, per-sample: batch-invariant in training) or
"none". The ATS nets have no normalisation, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.layers import CBAM, SEBlock, attention_block


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected 'batch', 'group' or 'none'")


def _padding(padding: str, kernel: int) -> int:
    if padding == "same":
        return kernel // 2
    if padding == "valid":
        return 0
    raise ValueError(f"unknown padding {padding!r}; expected 'same' or 'valid'")


class Backbone(nn.Sequential):
    """An ``nn.Sequential`` with the ``out_channels`` of its feature map."""

    def __init__(self, *layers: nn.Module, out_channels: int):
        super().__init__(*layers)
        self.out_channels = out_channels


# --------------------------------------------------------------------------------------------
# Reference ATS nets and a small CNN
# --------------------------------------------------------------------------------------------


def ats_feature(
    in_channels: int = 3,
    *,
    widths: Sequence[int] = (32, 32, 32, 32),
    kernels: Sequence[int] = (7, 3, 3, 3),
    padding: str = "same",
    se: bool = False,
    cbam: bool = False,
    ratio: int = 16,
) -> Backbone:
    """Reference ATS feature net (Megapixel MNIST): conv 7x7, 3x conv 3x3, ReLU, no norm.

    ``padding="valid"`` reproduces the reference exactly (output 6 px smaller per side for a
    patch); "same" (default) keeps any patch size valid, even tiny test patches.
    """
    if len(widths) != len(kernels):
        raise ValueError(f"ats_feature: {len(widths)} widths for {len(kernels)} kernels")
    layers: list[nn.Module] = []
    c = in_channels
    for w, k in zip(widths, kernels, strict=True):
        layers += [nn.Conv2d(c, w, k, padding=_padding(padding, k)), nn.ReLU(inplace=True)]
        layers.append(attention_block(w, se=se, cbam=cbam, ratio=ratio))
        c = w
    return Backbone(*layers, out_channels=c)


def ats_attention(
    in_channels: int = 3,
    *,
    widths: Sequence[int] = (8, 8),
    kernel: int = 3,
    se: bool = False,
    cbam: bool = False,
    ratio: int = 16,
) -> Backbone:
    """Reference ATS attention net: 3x3 convs (8, 8) with tanh, then a 3x3 conv to 1 channel.

    Output (N, 1, h, w): unnormalised attention logits at the input's resolution.
    """
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, kernel, padding=kernel // 2), nn.Tanh()]
        layers.append(attention_block(w, se=se, cbam=cbam, ratio=ratio))
        c = w
    layers.append(nn.Conv2d(c, 1, kernel, padding=kernel // 2))
    return Backbone(*layers, out_channels=1)


def small_cnn(
    in_channels: int = 3,
    *,
    widths: Sequence[int] = (32, 64, 128),
    norm: str = "batch",
    se: bool = False,
    cbam: bool = False,
    ratio: int = 16,
    mask: bool = False,
    stem_stride: int = 1,
) -> Backbone:
    """3x3 stem to ``widths[0]`` (stride ``stem_stride``: 2 lets a large input cost what one
    of half its side would, with a learned rather than an interpolated downsampling), then per
    width: conv 3x3 stride 2 + conv 3x3 (norm, ReLU), then the attention block of ``se`` /
    ``cbam`` / ``mask`` (Residual Attention's soft mask, ``models.layers.SoftMask``)."""

    def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        bias = norm == "none"
        return [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        ]

    layers = conv(in_channels, widths[0], stride=stem_stride)
    c = widths[0]
    for w in widths:
        layers += conv(c, w, stride=2) + conv(w, w)
        layers.append(attention_block(w, se=se, cbam=cbam, ratio=ratio, mask=mask))
        c = w
    return Backbone(*layers, out_channels=c)


# --------------------------------------------------------------------------------------------
# ResNet (v1.5, as torchvision's)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs; the attention block acts on the residual branch before the addition."""

    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int, norm: str, attn: Callable[[int], nn.Module]
    ):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.attn = attn(cout)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.attn(self.bn2(self.conv2(y)))
        return torch.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4; attention before the addition."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int, norm: str, attn: Callable[[int], nn.Module]
    ):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = _norm(norm, cout)
        self.attn = attn(cout)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.attn(self.bn3(self.conv3(y)))
        return torch.relu(y + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))


_RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def resnet(
    depth_name: str,
    in_channels: int = 3,
    *,
    width: float = 1.0,
    stem: str = "imagenet",
    norm: str = "batch",
    se: bool = False,
    cbam: bool = False,
    ratio: int = 16,
) -> Backbone:
    """Headless ResNet: stem, four stages (64, 128, 256, 512) x ``width`` planes."""
    block, depths = _RESNETS[depth_name]
    if width <= 0:
        raise ValueError(f"{depth_name}: width must be > 0, got {width}")
    planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
    c = planes[0]
    if stem == "imagenet":
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False),
            _norm(norm, c),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
    elif stem == "small":
        layers = [
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
            _norm(norm, c),
            nn.ReLU(inplace=True),
        ]
    else:
        raise ValueError(f"{depth_name}: unknown stem {stem!r}; expected 'imagenet' or 'small'")

    def attn(channels: int) -> nn.Module:
        return attention_block(channels, se=se, cbam=cbam, ratio=ratio)

    for i, (p, n) in enumerate(zip(planes, depths, strict=True)):
        for j in range(n):
            stride = 2 if (j == 0 and i > 0) else 1
            layers.append(block(c, p, stride, norm, attn))
            c = p * block.expansion
    return Backbone(*layers, out_channels=c)


# --------------------------------------------------------------------------------------------
# EfficientNet-B0
# --------------------------------------------------------------------------------------------

# (expand ratio, kernel, stride, output channels, repeats) of B0's seven stages (Tan & Le, 2019)
_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, SE (or CBAM), 1x1 project; skip if shapes match."""

    def __init__(
        self, cin: int, cout: int, expand: int, kernel: int, stride: int, norm: str, cbam: bool
    ):
        super().__init__()
        hidden = cin * expand
        squeeze = max(1, cin // 4)
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(cin, hidden, 1, bias=False),
                _norm(norm, hidden),
                nn.SiLU(inplace=True),
            ]
        layers += [
            nn.Conv2d(
                hidden,
                hidden,
                kernel,
                stride=stride,
                padding=kernel // 2,
                groups=hidden,
                bias=False,
            ),
            _norm(norm, hidden),
            nn.SiLU(inplace=True),
            CBAM(hidden, ratio=max(1, hidden // squeeze))
            if cbam
            else SEBlock(hidden, hidden=squeeze, act="silu", conv=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            _norm(norm, cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def efficientnet_b0(
    in_channels: int = 3,
    *,
    width: float = 1.0,
    norm: str = "batch",
    se: bool = True,
    cbam: bool = False,
) -> Backbone:
    """Headless EfficientNet-B0 (depth 1.0); ``width`` scales every channel count (rounded to 8).

    ``se`` is accepted for the uniform interface: SE is part of every MBConv of B0.
    """
    del se

    def ch(c: int) -> int:
        return c if width == 1.0 else max(8, int(c * width + 4) // 8 * 8)

    stem = ch(32)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
        _norm(norm, stem),
        nn.SiLU(inplace=True),
    ]
    c = stem
    for expand, kernel, stride, cout, repeats in _B0_STAGES:
        for j in range(repeats):
            layers.append(MBConv(c, ch(cout), expand, kernel, stride if j == 0 else 1, norm, cbam))
            c = ch(cout)
    head = ch(1280)
    layers += [nn.Conv2d(c, head, 1, bias=False), _norm(norm, head), nn.SiLU(inplace=True)]
    return Backbone(*layers, out_channels=head)


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


class TimmBackbone(nn.Module):
    """A timm model's ``forward_features``; weights only from a local file."""

    def __init__(
        self, name: str, in_channels: int = 3, weights_path: str | None = None, **kwargs: Any
    ):
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError(
                f"backbone 'timm:{name}' needs the timm package, which is not installed "
                "(pip install timm; it must not pull torchvision into this environment)"
            ) from err
        self.model = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", in_chans=in_channels, **kwargs
        )
        self.out_channels = int(self.model.num_features)
        if weights_path is not None:
            self._load(Path(weights_path))

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"timm weights file {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # the file may hold a classifier that the headless model no longer has
        classifier = getattr(self.model, "pretrained_cfg", {}).get("classifier", "") or "\0"
        heads = (classifier, "fc.", "head.", "classifier.")
        stray = [k for k in unexpected if not k.startswith(heads)]
        if missing or stray:
            raise ValueError(
                f"timm weights {path} do not fit the model: missing {missing[:5]}, "
                f"unexpected {stray[:5]}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

def _residual_attention(name: str) -> Callable[..., nn.Module]:
    """Builder of the Residual Attention Network's feature extractor ``name`` (no SE / CBAM)."""

    def build(in_channels: int = 3, *, se: bool = False, cbam: bool = False, **kwargs: Any):
        if se or cbam:
            raise TypeError("se/cbam switches exist only in the plain conv stacks and ResNets")
        # imported here: models.residual_attention registers models, which backbones never need
        from models.residual_attention import build_residual_attention_backbone

        return build_residual_attention_backbone(name, in_channels, **kwargs)

    return build


def _dasnet(in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Builder of dasNet's gated CNN (``models.dasnet.GatedBackbone``: ``backbone``,
    ``backbone_kwargs``, ``passes``, ``gate``, ``policy``; ``se`` / ``cbam`` go to the inner
    backbone)."""
    # imported here: models.dasnet registers models, which backbones never need
    from models.dasnet import GatedBackbone

    return GatedBackbone(in_channels, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ats_feature": ats_feature,
    "ats_attention": ats_attention,
    "small_cnn": small_cnn,
    "dasnet": _dasnet,
    "resnet18": lambda c, **kw: resnet("resnet18", c, **kw),
    "resnet34": lambda c, **kw: resnet("resnet34", c, **kw),
    "resnet50": lambda c, **kw: resnet("resnet50", c, **kw),
    "efficientnet_b0": efficientnet_b0,
    **{
        name: _residual_attention(name)
        for name in ("residual_attention_56", "residual_attention_92", "residual_attention_small",
                     "residual_attention_patch")
    },
}


def backbone_names() -> list[str]:
    """Built-in backbone names (plus ``timm:<name>`` when timm is installed)."""
    return sorted(_BUILDERS)


def build_backbone(
    name: str | nn.Module,
    in_channels: int = 3,
    *,
    se: bool = False,
    cbam: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Backbone ``name`` mapping (N, in_channels, h, w) -> (N, out_channels, h', w').

    See the module docstring for names and their keyword arguments; an unknown name or
    argument raises with the list of what is accepted. A module (with ``out_channels``) is
    returned as it is, whatever the other arguments.
    """
    if isinstance(name, nn.Module):
        if not hasattr(name, "out_channels"):
            raise TypeError(f"backbone module {type(name).__name__} has no `out_channels`")
        return name
    if name.startswith("timm:"):
        if se or cbam:
            raise ValueError(
                f"backbone {name!r}: se/cbam switches exist only in built-in backbones"
            )
        return TimmBackbone(name[len("timm:") :], in_channels, **kwargs)
    if name not in _BUILDERS:
        raise KeyError(
            f"unknown backbone {name!r}; built-in: {', '.join(backbone_names())}, timm:<name>"
        )
    try:
        return _BUILDERS[name](in_channels, se=se, cbam=cbam, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for backbone {name!r}: {err}") from err
