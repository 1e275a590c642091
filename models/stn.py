"""Spatial transformer (Jaderberg et al., NeurIPS 2015): as a block and as a glimpse model.

``STNBlock`` warps a feature map by an affine ``theta`` that a small localisation network
predicts from that map (``affine_grid`` + ``grid_sample``), initialised to the identity, so it
can sit anywhere inside a network.

``STNGlimpse`` (registered as ``stn``) looks at the low-resolution view, predicts a bounded
square ``theta`` for each of its glimpses (the paper's "attention" transform: scale and
translation, ``GlimpseHead``), reads from the pyramid only each glimpse's box (at the coarsest
level that still has the glimpse's resolution), samples the glimpse inside that patch, and
classifies the glimpses' average feature. Gradients reach the localisation network through
``grid_sample``. A glimpse can never leave the scene nor shrink below ``min_scale``: with an
unbounded affine head, the trained glimpse of the learning benchmark had collapsed (README).

Coordinates: ``theta`` maps the glimpse's output square [-1, 1]^2 (x first, as ``affine_grid``)
to the scene in [-1, 1]^2 (-1 = top/left border, +1 = bottom/right), whatever the scene's aspect.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone
from models.layers import contrast_prior, pooled, scaled_unit
from models.layers.pool import POOLS
from models.protocol import AttentionModel, ModelOutput, ReadRequest, Steps
from models.regions import DEFAULT_COARSEST, read_level, to_level0, to_normalised
from models.registry import register_model


def _theta_head(hidden: int, theta0: Tensor) -> nn.Linear:
    """Last localisation layer: zero weights and ``theta0`` as bias, so it starts at ``theta0``."""
    head = nn.Linear(hidden, 6)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(theta0.reshape(6))
    return head


def identity_theta(scale: float = 1.0) -> Tensor:
    """(2, 3) affine ``[[s, 0, 0], [0, s, 0]]``: a centred square of ``scale`` times the input."""
    return torch.tensor([[scale, 0.0, 0.0], [0.0, scale, 0.0]])


class STNBlock(nn.Module):
    """Spatial transformer block: (N, C, h, w) -> (N, C, h, w) warped by a predicted ``theta``.

    Localisation: 3x3 conv to ``loc_channels``, ReLU, 4x4 adaptive average pool, FC to
    ``hidden``, ReLU, FC to the 6 affine parameters (identity at initialisation, so the block
    starts as a no-op). ``forward(x, return_theta=True)`` also returns ``theta`` (N, 2, 3).
    """

    def __init__(self, channels: int, loc_channels: int = 8, hidden: int = 32):
        super().__init__()
        self.loc = nn.Sequential(
            nn.Conv2d(channels, loc_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(loc_channels * 16, hidden),
            nn.ReLU(inplace=True),
        )
        self.theta = _theta_head(hidden, identity_theta())

    def forward(self, x: Tensor, return_theta: bool = False):
        theta = self.theta(self.loc(x)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (out, theta) if return_theta else out


def grid_bbox(theta: Tensor) -> Tensor:
    """Normalised bounding box ``[y0, x0, y1, x1]`` in [0, 1] scene units of the square [-1, 1]^2
    mapped by ``theta`` (N, 2, 3). Returns (N, 4); it may leave [0, 1] (read as zeros)."""
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    pts = torch.einsum("nij,kj->nki", theta, corners.to(theta))  # (N, 4, 2) as (x, y)
    lo, hi = pts.min(dim=1).values, pts.max(dim=1).values
    return torch.stack([lo[:, 1], lo[:, 0], hi[:, 1], hi[:, 0]], dim=-1).add(1.0).mul(0.5)


def theta_in_box(theta: Tensor, box: Tensor) -> Tensor:
    """Re-express ``theta`` (N, 2, 3) relative to a patch covering normalised ``box`` (N, 4).

    A scene point ``u`` in [0, 1] lies at ``q = 2 (u - b0) / (b1 - b0) - 1`` in the patch's
    [-1, 1] frame and ``u = (p + 1) / 2`` for ``p = theta [x, y, 1]``, so the new affine is
    ``q = p / (b1 - b0) + (1 - 2 b0) / (b1 - b0) - 1`` applied row by row (x row, then y row).
    Differentiable in ``theta``; ``box`` is treated as a constant (it only says what was read).
    """
    y0, x0, y1, x1 = box.unbind(-1)
    scale = torch.stack([1.0 / (x1 - x0), 1.0 / (y1 - y0)], dim=-1)  # (N, 2)
    shift = torch.stack([(1 - 2 * x0) / (x1 - x0) - 1, (1 - 2 * y0) / (y1 - y0) - 1], dim=-1)
    out = theta * scale[:, :, None]
    return torch.cat([out[:, :, :2], out[:, :, 2:] + shift[:, :, None]], dim=-1)


def glimpse_anchors(views: Tensor, count: int, mode: str, grid: int) -> Tensor:
    """(B, count, 2) glimpse anchors ``(x, y)`` in [-1, 1] scene units.

    ``"grid"``: the centres of a ``sqrt(count)``-square grid over the scene (one glimpse: the
    centre), the same for every scene. ``"contrast"``: the centres of the ``count`` cells of a
    ``grid x grid`` partition of the view with the most local contrast (``contrast_prior``):
    the glimpses start on structure, not on background. Not differentiable (a fixed start).
    """
    b = views.shape[0]
    if mode == "grid":
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"grid anchors need a square number of glimpses, got {count}")
        ticks = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
        y, x = torch.meshgrid(ticks, ticks, indexing="ij")
        return torch.stack([x, y], -1).reshape(1, count, 2).expand(b, count, 2)
    contrast = contrast_prior(views, (grid, grid)).flatten(1)  # (B, grid * grid)
    idx = contrast.topk(count, dim=-1).indices
    ticks = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    return torch.stack([ticks[idx % grid], ticks[idx // grid]], -1)


class GlimpseHead(nn.Module):
    """Bounded attention transforms of ``count`` glimpses: (B, C, h, w) view -> (B, K, 2, 3).

    Each glimpse is an axis-aligned square (the "attention" transform of the STN paper: scale and
    translation), ``theta = [[s, 0, cx], [0, s, cy]]``, with its side ``s`` (a fraction of the
    scene's) in ``[min_scale, max_scale]`` by a sigmoid, and its centre ``c = (1 - s) tanh(a +
    u)`` strictly inside ``[-(1 - s), 1 - s]`` (with ``max_shift > 0``: ``anchor + max_shift
    tanh(u)`` clipped to that range, so a glimpse only refines its anchor's position): the
    glimpse can never leave the scene or shrink to nothing, whatever the weights (an unbounded
    affine head collapsed in training). ``a``
    places the glimpse on its anchor (``glimpse_anchors``) at the initial scale; ``u`` and the
    scale's logit come from a small conv net on the view, sampled at the anchor, then two linear
    layers, the last zero-initialised (the glimpses start on their anchors at ``init_scale``).
    """

    def __init__(self, in_channels: int, count: int, init_scale: float, min_scale: float,
                 max_scale: float, anchors: str = "grid", anchor_grid: int = 10, hidden: int = 32,
                 max_shift: float = 0.0):
        super().__init__()
        if not 0.0 < min_scale <= init_scale <= max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= glimpse_scale <= max_scale <= 1, got "
                             f"{min_scale}, {init_scale}, {max_scale}")
        if anchors not in ("grid", "contrast"):
            raise ValueError(f"anchors must be 'grid' or 'contrast', got {anchors!r}")
        self.count, self.anchors, self.anchor_grid = count, anchors, anchor_grid
        self.min_scale, self.max_scale, self.init_scale = min_scale, max_scale, init_scale
        self.max_shift = float(max_shift)
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        self.mlp = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(inplace=True))
        self.out = nn.Linear(hidden, 3)  # scale logit, u_x, u_y
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            frac = (init_scale - min_scale) / max(max_scale - min_scale, 1e-6)
            self.out.bias.copy_(torch.tensor([math.log(max(frac, 1e-4) / max(1 - frac, 1e-4)), 0, 0]))

    def forward(self, views: Tensor) -> Tensor:
        k = self.count
        anchor = glimpse_anchors(views, k, self.anchors, self.anchor_grid).to(views)  # (B, K, 2)
        fmap = self.trunk(views)  # (B, 16, h', w')
        local = F.grid_sample(fmap, anchor[:, :, None, :], align_corners=False)[..., 0]  # (B, 16, K)
        glob = fmap.mean((-2, -1))[:, :, None].expand(-1, -1, k)
        u = self.out(self.mlp(torch.cat([local, glob], 1).transpose(1, 2)))  # (B, K, 3)
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.sigmoid(u[..., 0])
        inside = (1 - s)[..., None]  # the centre's bound that keeps the glimpse in the scene
        if self.max_shift:
            shifted = anchor + self.max_shift * torch.tanh(u[..., 1:])
            centre = torch.maximum(torch.minimum(shifted, inside), -inside)
        else:
            a = torch.atanh((anchor / (1 - self.init_scale)).clamp(-0.999, 0.999))
            centre = inside * torch.tanh(a + u[..., 1:])  # (B, K, 2) as (x, y)
        zero = torch.zeros_like(s)
        rows = [torch.stack([s, zero, centre[..., 0]], -1), torch.stack([zero, s, centre[..., 1]], -1)]
        return torch.stack(rows, -2)


class STNGlimpse(AttentionModel):
    """Spatial-transformer glimpse classifier (see the module docstring).

    Args:
        num_classes: classes. view_size: (h, w) of the view the localisation net sees.
        glimpse_size: (h, w) of each glimpse that the backbone classifies.
        glimpses: glimpses per scene (the paper's parallel transformers); their features are
            averaged and classified.
        glimpse_scale: initial side of a glimpse as a fraction of the scene's; ``min_scale``,
            ``max_scale``: the bounds it can never leave (``GlimpseHead``).
        anchors: where the glimpses start, ``"grid"`` or ``"contrast"`` (``glimpse_anchors``,
            ``anchor_grid`` cells a side). max_shift: 0 lets a glimpse go anywhere in the scene;
            > 0 keeps its centre within this many scene half-widths of its anchor.
        read_scale: the patch read from the pyramid has ``read_scale * glimpse_size`` pixels
            over the glimpse's box.
        backbone: feature network name (``models.backbones.build_backbone``) or module.
        backbone_kwargs: keyword arguments of the backbone builder, e.g. ``{"se": true}``,
            ``{"norm": "group"}`` (``models.backbones.build_backbone``).
        loc_hidden: width of the localisation net's hidden layer.
        max_level: the deepest pyramid level to read from (None: whatever the scene has).
        coarsest: long side (px) of the pyramids' coarsest level (training sets it from
            the pyramids: ``pipeline.train.driver.pyramids_coarsest``), so that reads use
            only the levels each scene's pyramid has.
        pool: "avg" or "max" global pooling of each glimpse's feature map.
        feature_scale: 0 averages the glimpses' features as they are; > 0 L2-normalises each
            and multiplies it by this (``models.layers.scaled_unit``).
    """

    def __init__(
        self,
        num_classes: int,
        view_size: tuple[int, int],
        glimpse_size: tuple[int, int],
        glimpses: int = 1,
        glimpse_scale: float = 0.5,
        min_scale: float = 0.05,
        max_scale: float = 1.0,
        anchors: str = "grid",
        anchor_grid: int = 10,
        max_shift: float = 0.0,
        read_scale: float = 1.0,
        backbone: str | nn.Module = "small_cnn",
        in_channels: int = 3,
        backbone_kwargs: dict | None = None,
        loc_hidden: int = 32,
        max_level: int | None = None,
        coarsest: int = DEFAULT_COARSEST,
        pool: str = "avg",
        feature_scale: float = 0.0,
    ):
        super().__init__()
        self.pool, self.feature_scale = pool, float(feature_scale)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.view_size = tuple(view_size)
        self.glimpse_size = tuple(glimpse_size)
        self.read_size = tuple(max(1, round(s * read_scale)) for s in glimpse_size)
        self.max_level = max_level
        self.coarsest = int(coarsest)
        self.head = GlimpseHead(in_channels, glimpses, glimpse_scale, min_scale, max_scale,
                                anchors, anchor_grid, loc_hidden, max_shift)
        self.features = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        theta = self.head(views)  # (B, K, 2, 3)
        b, k = theta.shape[:2]
        boxes = grid_bbox(theta.detach().flatten(0, 1)).view(b, k, 4)
        boxes0 = to_level0(boxes, sizes)  # (B, K, 4)
        level = read_level(boxes0, self.read_size, sizes, coarsest=self.coarsest,
                           max_level=self.max_level)
        patches = yield ReadRequest(boxes0, level, self.read_size)  # (B, K, C, h, w)
        local = theta_in_box(theta.flatten(0, 1), to_normalised(boxes0, sizes).flatten(0, 1))
        grid = F.affine_grid(local, [b * k, 1, *self.glimpse_size], align_corners=False)
        glimpse = F.grid_sample(patches.flatten(0, 1), grid, mode="bilinear", align_corners=False)
        feats = scaled_unit(pooled(self.features(glimpse), self.pool), self.feature_scale).view(b, k, -1)
        return ModelOutput(
            logits=self.classifier(feats.mean(1)), boxes=boxes0, weights=torch.full((b, k), 1.0 / k),
            extras={"theta": theta, "glimpse": glimpse.view(b, k, *glimpse.shape[1:])},
        )


@register_model("stn")
def stn(**kwargs) -> STNGlimpse:
    """Spatial-transformer glimpses on the view; reads one patch per glimpse (keyword arguments of
    ``STNGlimpse``; ``num_classes`` 10, ``view_size`` (64, 64) and ``glimpse_size`` (32, 32)
    by default)."""
    return STNGlimpse(**{"num_classes": 10, "view_size": (64, 64), "glimpse_size": (32, 32), **kwargs})


# The Megapixel MNIST setting of bench/learning.py: 10 glimpses of a tenth of the canvas (50 px
# of a 500 px canvas) read as 24 px at level 1 (the digit at 14 px, as ``ats_mnist``'s patches),
# starting on the 10 cells of a 10 x 10 grid of the view with the most contrast and moving at
# most one cell from there (free glimpses wandered off the digits: README), sides between 40
# and 75 px, the feature CNN of ``ats_mnist`` with its max pool and scaled unit features.
MNIST_SETTING = dict(
    in_channels=1,
    num_classes=10,
    view_size=(50, 50),
    glimpse_size=(24, 24),
    glimpses=10,
    glimpse_scale=0.1,
    min_scale=0.08,
    max_scale=0.15,
    anchors="contrast",
    max_shift=0.1,
    backbone="small_cnn",
    backbone_kwargs={"widths": (16, 32, 64)},
    pool="max",
    feature_scale=16.0,
)


@register_model("stn_mnist")
def stn_mnist(**kwargs) -> STNGlimpse:
    """Spatial-transformer glimpses set up for Megapixel MNIST (``MNIST_SETTING``, overridable)."""
    return STNGlimpse(**{**MNIST_SETTING, **kwargs})
