"""TNet: multi-level hard attention (Papadopoulos et al., NeurIPS 2021), registered as ``tnet``.

Level 1 is the view (the whole scene at the backbone's input size). A location module scores a
grid of overlapping candidate regions of every processed region; ``locations`` of them are
chosen (sampled during training, top-k at inference, selectable) and read through the pixel
protocol at the same pixel size, i.e. at ``1 / region side`` times the parent's resolution
(``grid=3, overlap=0.5``: twice), and so on for ``levels`` levels. Every processed region's
pooled feature gets a positional encoding of (y, x, level), goes through a feature transform,
and all of them are averaged and classified; each level's average is also classified (per-level
terms). The location module is trained with REINFORCE: reward 1 for a correct prediction,
baseline ``b <- 0.9 b + 0.1 mean(R)`` (a buffer, so checkpoints keep it), loss term
``-lambda (R - b) log p(locations)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone
from models.layers import SEBlock, contrast_prior, pooled, scaled_unit
from models.layers.pool import POOLS
from models.protocol import AttentionModel, ModelOutput, ReadRequest, Steps
from models.regions import DEFAULT_COARSEST, grid_regions, read_level, sub_region, to_level0
from models.registry import register_model
from models.sampling import sample_without_replacement_from_logits


def plackett_luce_log_prob(logits: Tensor, chosen: Tensor) -> Tensor:
    """Log-probability of drawing ``chosen`` (N, k) in that order without replacement from
    ``softmax(logits)`` (N, K): ``sum_i [log a_{c_i} - log(1 - sum_{j<i} a_{c_j})]``. (N,)."""
    log_a = torch.log_softmax(logits, dim=-1)
    picked = log_a.gather(-1, chosen)  # (N, k)
    before = torch.cumsum(picked.exp(), dim=-1) - picked.exp()  # exclusive: mass drawn earlier
    return (picked - torch.log1p(-before.clamp(max=1.0 - 1e-6))).sum(-1)


def region_pooling_weights(boxes: Tensor, h: int, w: int) -> Tensor:
    """(K, h, w) weights that average an h x w map over each normalised box (K, 4).

    Each map cell covers ``[i/h, (i+1)/h)``; its weight is the area of its overlap with the box,
    normalised to sum to 1 per box, so overlapping candidates share cells exactly.
    """

    def cover(lo: Tensor, hi: Tensor, n: int) -> Tensor:
        edges = torch.arange(n + 1, dtype=boxes.dtype) / n
        left = torch.maximum(lo[:, None], edges[None, :-1])
        right = torch.minimum(hi[:, None], edges[None, 1:])
        return (right - left).clamp(min=0.0)  # (K, n)

    y0, x0, y1, x1 = boxes.unbind(-1)
    weights = cover(y0, y1, h)[:, :, None] * cover(x0, x1, w)[:, None, :]
    return weights / weights.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)


class LocationModule(nn.Module):
    """Scores candidate regions of a feature map: 1x1 conv, SE, coordinate channels, two 1x1
    convs to one score per cell, averaged over each candidate region. (N, D, h, w) -> (N, K)."""

    def __init__(self, channels: int, hidden: int, candidates: Tensor):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True))
        self.se = SEBlock(hidden, ratio=4)
        self.score = nn.Sequential(
            nn.Conv2d(hidden + 2, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1)
        )
        self.register_buffer("candidates", candidates, persistent=False)

    def forward(self, fmap: Tensor) -> Tensor:
        n, _, h, w = fmap.shape
        x = self.se(self.reduce(fmap))
        ys = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(n, 1, h, w)
        scores = self.score(torch.cat([x, ys.to(x), xs.to(x)], dim=1))[:, 0]  # (N, h, w)
        weights = region_pooling_weights(self.candidates, h, w).to(scores)  # (K, h, w)
        return torch.einsum("nhw,khw->nk", scores, weights)


def region_contrast(images: Tensor, candidates: Tensor) -> Tensor:
    """(N, C, h, w) images -> (N, K) mean local contrast of each normalised candidate region
    (K, 4), scaled so that each image's best region scores 1 (``contrast_prior`` averaged with
    ``region_pooling_weights``)."""
    contrast = contrast_prior(images, tuple(images.shape[-2:]))  # (N, h, w)
    weights = region_pooling_weights(candidates, *contrast.shape[-2:]).to(contrast)
    scores = torch.einsum("nhw,khw->nk", contrast, weights)
    return scores / scores.amax(-1, keepdim=True).clamp_min(1e-6)


class PositionalEncoding(nn.Module):
    """Learned projection of sinusoids of a region's centre (y, x) plus a one-hot of its level."""

    def __init__(self, dim: int, levels: int, frequencies: int = 4):
        super().__init__()
        self.levels = levels
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False
        )
        self.proj = nn.Linear(4 * frequencies + levels, dim)

    def forward(self, boxes: Tensor, level: int) -> Tensor:
        """(N, 4) normalised boxes at ``level`` (0-based) -> (N, dim) encodings."""
        centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
        angles = centre[:, :, None] * self.freqs  # (N, 2, F)
        sincos = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        onehot = F.one_hot(torch.full((boxes.shape[0],), level), self.levels).to(sincos)
        return self.proj(torch.cat([sincos, onehot], dim=-1))


class TNet(AttentionModel):
    """Multi-level hard attention (see the module docstring).

    Args:
        num_classes, view_size: as every model; regions are read at ``view_size`` too.
        levels: processing levels (1 = the view only).
        locations: regions chosen inside each processed region, per level.
        grid, overlap: candidate regions (``models.regions.grid_regions``).
        backbone: feature network name or module. hidden: location module width.
        backbone_kwargs: keyword arguments of the backbone builder, e.g. ``{"se": true}``,
            ``{"norm": "group"}`` (``models.backbones.build_backbone``).
        reinforce_weight: lambda of the REINFORCE term. level_weight: weight of the
            per-level classification terms (averaged over levels).
        region_size: (h, w) pixels at which regions are read and processed (None: the view's
            size, as the paper; the backbone is fully convolutional, so a region can be smaller
            than the view when the view is not the backbone's cost-defining input).
        level_heads: the per-level terms use a linear head of their own per level (False: the
            final classifier, shared). With unit-scaled features, the shared classifier
            fitted to the view alone slowed learning (README).
        sample_in_eval: sample locations at inference too (default: top-k).
        max_level: deepest pyramid level to read from (None: whatever the scene has).
        coarsest: long side (px) of the pyramids' coarsest level (training sets it from
            the pyramids: ``pipeline.train.driver.pyramids_coarsest``), so that reads use
            only the levels each scene's pyramid has.
        pool: "avg" or "max": global pooling of each region's feature map (max keeps a small
            object's response whole; the average dilutes it over the empty rest).
        feature_scale: 0 keeps the transformed features as they are; > 0 L2-normalises each
            region's and multiplies it by this (``ats_mnist``'s cosine-classifier temperature).
        detach_location: the location module scores a detached copy of the feature map, so the
            REINFORCE term trains the location module only and its noise never reaches the
            backbone that the classifier shares (on the learning benchmark, REINFORCE through
            the shared backbone held test accuracy at 0.18-0.20 for 4 epochs where the same run
            without the term reached 0.36; README).
        location_prior: "none" or "contrast": add ``prior_strength`` times each candidate's
            mean local contrast (0..1, ``region_contrast``) to the location logits, so the first
            locations land on structure rather than uniformly (``models.layers.prior``).
        view_backbone: the view (level 0) gets a backbone of its own, same architecture
            (False: one backbone for every level, as the paper). With BatchNorm, a shared
            backbone keeps one set of running statistics for two different inputs (a whole
            canvas at 1/10 and crops of digits), so eval mode normalises both wrongly: on the
            learning benchmark training accuracy rose to 0.34 while test accuracy fell to 0.14.
    """

    def __init__(
        self,
        num_classes: int,
        view_size: tuple[int, int],
        levels: int = 2,
        locations: int = 2,
        grid: int = 3,
        overlap: float = 0.5,
        backbone: str | nn.Module = "small_cnn",
        in_channels: int = 3,
        backbone_kwargs: dict | None = None,
        hidden: int = 32,
        reinforce_weight: float = 0.1,
        level_weight: float = 0.3,
        sample_in_eval: bool = False,
        max_level: int | None = None,
        coarsest: int = DEFAULT_COARSEST,
        pool: str = "avg",
        feature_scale: float = 0.0,
        detach_location: bool = False,
        level_heads: bool = False,
        region_size: tuple[int, int] | None = None,
        location_prior: str = "none",
        prior_strength: float = 5.0,
        view_backbone: bool = False,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool, self.feature_scale = pool, float(feature_scale)
        self.detach_location = detach_location
        if location_prior not in ("none", "contrast"):
            raise ValueError(f"location_prior must be 'none' or 'contrast', got {location_prior!r}")
        self.prior_strength = float(prior_strength) if location_prior == "contrast" else 0.0
        if levels < 1 or not 1 <= locations <= grid * grid:
            raise ValueError(f"need levels >= 1 and 1 <= locations <= grid^2, got {levels}, {locations}")
        self.view_size = tuple(view_size)
        self.region_size = tuple(region_size or view_size)
        self.levels, self.locations = levels, locations
        self.reinforce_weight, self.level_weight = reinforce_weight, level_weight
        self.sample_in_eval, self.max_level = sample_in_eval, max_level
        self.coarsest = int(coarsest)
        self.features = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.view_features = (
            build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
            if view_backbone and isinstance(backbone, str) else None
        )
        if view_backbone and self.view_features is None:
            raise ValueError("view_backbone needs a backbone name, not a module")
        dim = self.features.out_channels
        self.grid = grid
        self.register_buffer("candidates", grid_regions(grid, overlap), persistent=False)
        self.location = LocationModule(dim, hidden, self.candidates)
        self.position = PositionalEncoding(dim, levels)
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(dim, num_classes)
        self.level_classifiers = (
            nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(levels)) if level_heads else None
        )
        self.register_buffer("baseline", torch.zeros(()))

    def _choose(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.training or self.sample_in_eval:
            return sample_without_replacement_from_logits(logits, self.locations, generator)
        return torch.topk(logits, self.locations, dim=-1).indices

    def _location_logits(self, fmap: Tensor, images: Tensor) -> Tensor:
        """(N, K) location logits of the regions ``images`` (N, C, h, w) with feature maps
        ``fmap``: the location module's scores plus the contrast prior, if any."""
        logits = self.location(fmap.detach() if self.detach_location else fmap)
        if self.prior_strength:
            logits = logits + self.prior_strength * region_contrast(images, self.candidates)
        return logits

    def _embed(self, images: Tensor, boxes: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """(N, C, h, w) crops of normalised (N, 4) boxes -> feature maps and transformed features."""
        net = self.view_features if level == 0 and self.view_features is not None else self.features
        fmap = net(images)
        feat = self.transform(pooled(fmap, self.pool) + self.position(boxes, level))
        return fmap, scaled_unit(feat, self.feature_scale)

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        b = views.shape[0]
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 1, 4)  # (B, R, 4) normalised
        fmap, feat = self._embed(views, boxes.reshape(-1, 4), 0)
        feats, read, log_prob, attention = [feat.view(b, 1, -1)], [], views.new_zeros(b), None
        images = views
        for level in range(1, self.levels):
            logits = self._location_logits(fmap, images)  # (B * R, K)
            if attention is None:
                attention = torch.softmax(logits, -1).view(b, self.grid, self.grid).detach()
            chosen = self._choose(logits, generator)  # (B * R, k)
            log_prob = log_prob + plackett_luce_log_prob(logits, chosen).view(b, -1).sum(-1)
            child = sub_region(boxes.reshape(-1, 1, 4), self.candidates[chosen])  # (B * R, k, 4)
            boxes = child.reshape(b, -1, 4)
            boxes0 = to_level0(boxes, sizes)
            lvl = read_level(boxes0, self.region_size, sizes, coarsest=self.coarsest,
                             max_level=self.max_level)
            patches = yield ReadRequest(boxes0, lvl, self.region_size)  # (B, R', C, h, w)
            images = patches.flatten(0, 1)
            fmap, feat = self._embed(images, boxes.reshape(-1, 4), level)
            feats.append(feat.view(b, boxes.shape[1], -1))
            read.append(boxes0)
        all_feats = torch.cat(feats, dim=1)  # (B, N, D)
        logits = self.classifier(all_feats.mean(1))
        heads = self.level_classifiers or [self.classifier] * len(feats)
        level_logits = [head(f.mean(1)) for head, f in zip(heads, feats, strict=True)]
        boxes_read = torch.cat(read, dim=1) if read else torch.zeros((b, 0, 4), dtype=torch.int64)
        weights = torch.full(boxes_read.shape[:2], 1.0 / all_feats.shape[1])
        return ModelOutput(
            logits=logits,
            attention=attention,
            boxes=boxes_read,
            weights=weights,
            extras={"log_prob": log_prob, "level_logits": level_logits},
        )

    def reinforce_term(self, output: ModelOutput, labels: Tensor) -> Tensor:
        """``-lambda * mean_b (R_b - baseline) * log p_b`` with ``R = 1[argmax == label]``."""
        reward = (output.logits.detach().argmax(-1) == labels).to(output.logits.dtype)
        advantage = reward - self.baseline
        return -self.reinforce_weight * (advantage * output.extras["log_prob"]).mean()

    def loss(self, output: ModelOutput, labels: Tensor, epoch: int = 0) -> Tensor:
        """Cross-entropy + ``level_weight`` x mean per-level cross-entropy + REINFORCE term."""
        total = F.cross_entropy(output.logits, labels)
        level_logits = output.extras["level_logits"]
        total = total + self.level_weight * sum(
            F.cross_entropy(lg, labels) for lg in level_logits
        ) / len(level_logits)
        if self.levels > 1:
            total = total + self.reinforce_term(output, labels)
        for term in output.aux.values():
            total = total + term
        return total

    @torch.no_grad()
    def end_step(self, output: ModelOutput, labels: Tensor) -> None:
        """Baseline update after the optimiser step: ``b <- 0.9 b + 0.1 mean(R)``."""
        reward = (output.logits.argmax(-1) == labels).to(self.baseline.dtype)
        self.baseline.mul_(0.9).add_(0.1 * reward.mean())


@register_model("tnet")
def tnet(**kwargs) -> TNet:
    """TNet with ``levels`` levels and ``locations`` regions per processed region (keyword
    arguments of ``TNet``; ``num_classes`` 10 and ``view_size`` (64, 64) by default)."""
    return TNet(**{"num_classes": 10, "view_size": (64, 64), **kwargs})


# The Megapixel MNIST setting of bench/learning.py: two levels as the paper's ImageNet recipe
# (the view, then 10 locations, as many as ATS's patches); candidates of a tenth of the scene
# every twentieth (a 500 px canvas: 50 px regions every 25 px, 361 of them) read as 24 px at
# level 1 (the digit at 13 px, ATS's patch), the contrast prior (strength 10: at 5, half the
# sampled regions were empty) on the location logits, the feature CNN of ``ats_mnist`` with its
# max pool and scaled unit features, REINFORCE on a detached feature map, per-level heads, and
# a backbone of its own for the view (with one shared BatchNorm backbone, test accuracy fell
# while training accuracy rose: README).
MNIST_SETTING = dict(
    in_channels=1,
    num_classes=10,
    view_size=(50, 50),
    levels=2,
    locations=10,
    grid=19,
    overlap=0.5,
    region_size=(24, 24),
    backbone="small_cnn",
    backbone_kwargs={"widths": (16, 32, 64)},
    pool="max",
    feature_scale=16.0,
    detach_location=True,
    level_heads=True,
    location_prior="contrast",
    prior_strength=10.0,
    view_backbone=True,
)


@register_model("tnet_mnist")
def tnet_mnist(**kwargs) -> TNet:
    """TNet set up for Megapixel MNIST (1 channel; ``MNIST_SETTING``, any of it overridable)."""
    return TNet(**{**MNIST_SETTING, **kwargs})
