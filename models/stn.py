"""Spatial transformer (Jaderberg et al., NeurIPS 2015): as a block and as a glimpse model.

``STNBlock`` warps a feature map by an affine ``theta`` that a small localisation network
predicts from that map (``affine_grid`` + ``grid_sample``), initialised to the identity, so it
can sit anywhere inside a network.

``STNGlimpse`` (registered as ``stn``) looks at the low-resolution view, predicts ``theta`` for a
glimpse of the scene, reads from the pyramid only the bounding box of the transformed sampling
grid (at the coarsest level that still has the glimpse's resolution), samples the glimpse inside
that patch, and classifies it. Gradients reach the localisation network through ``grid_sample``.

Coordinates: ``theta`` maps the glimpse's output square [-1, 1]^2 (x first, as ``affine_grid``)
to the scene in [-1, 1]^2 (-1 = top/left border, +1 = bottom/right), whatever the scene's aspect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone
from models.layers import pooled
from models.protocol import AttentionModel, ModelOutput, ReadRequest, Steps
from models.regions import read_level, to_level0, to_normalised
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


class STNGlimpse(AttentionModel):
    """Spatial-transformer glimpse classifier (see the module docstring).

    Args:
        num_classes: classes. view_size: (h, w) of the view the localisation net sees.
        glimpse_size: (h, w) of the glimpse that the backbone classifies.
        glimpse_scale: side of the initial glimpse as a fraction of the scene (identity
            transform scaled by it, centred).
        read_scale: the patch read from the pyramid has ``read_scale * glimpse_size`` pixels
            over the grid's bounding box (> 1 keeps resolution under rotations and shears).
        backbone: feature network name (``models.backbones.build_backbone``) or module.
        backbone_kwargs: keyword arguments of the backbone builder, e.g. ``{"se": true}``,
            ``{"norm": "group"}`` (``models.backbones.build_backbone``).
        loc_hidden: width of the localisation net's hidden layer.
        max_level: the deepest pyramid level to read from (None: whatever the scene has).
    """

    def __init__(
        self,
        num_classes: int,
        view_size: tuple[int, int],
        glimpse_size: tuple[int, int],
        glimpse_scale: float = 0.5,
        read_scale: float = 1.0,
        backbone: str | nn.Module = "small_cnn",
        in_channels: int = 3,
        backbone_kwargs: dict | None = None,
        loc_hidden: int = 32,
        max_level: int | None = None,
    ):
        super().__init__()
        self.view_size = tuple(view_size)
        self.glimpse_size = tuple(glimpse_size)
        self.read_size = tuple(max(1, round(s * read_scale)) for s in glimpse_size)
        self.max_level = max_level
        self.loc = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(16 * 16, loc_hidden),
            nn.ReLU(inplace=True),
        )
        self.theta = _theta_head(loc_hidden, identity_theta(glimpse_scale))
        self.features = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        theta = self.theta(self.loc(views)).view(-1, 2, 3)
        boxes0 = to_level0(grid_bbox(theta.detach())[:, None], sizes)  # (B, 1, 4)
        level = read_level(boxes0, self.read_size, sizes, max_level=self.max_level)
        patches = yield ReadRequest(boxes0, level, self.read_size)  # (B, 1, C, h, w)
        local = theta_in_box(theta, to_normalised(boxes0, sizes)[:, 0])
        grid = F.affine_grid(local, [theta.shape[0], 1, *self.glimpse_size], align_corners=False)
        glimpse = F.grid_sample(patches[:, 0], grid, mode="bilinear", align_corners=False)
        logits = self.classifier(pooled(self.features(glimpse)))
        weights = torch.ones(boxes0.shape[:2])
        return ModelOutput(
            logits=logits, boxes=boxes0, weights=weights, extras={"theta": theta, "glimpse": glimpse}
        )


@register_model("stn")
def stn(**kwargs) -> STNGlimpse:
    """Spatial-transformer glimpse on the view; reads one patch per scene (keyword arguments of
    ``STNGlimpse``; ``num_classes`` 10, ``view_size`` (64, 64) and ``glimpse_size`` (32, 32)
    by default)."""
    return STNGlimpse(**{"num_classes": 10, "view_size": (64, 64), "glimpse_size": (32, 32), **kwargs})
