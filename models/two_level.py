"""Two-level attention (Xiao et al., CVPR 2015), registered as ``two_level``.

1. Bottom-up candidates: square windows of several scales on a grid over the scene
   (``models.regions.multiscale_windows``), cut out of the *view* (no reads).
2. Object level: a small filter net classifies every candidate; the ``keep`` candidates on which
   it is most confident (max softmax probability) are kept, and only those are read from the
   pyramid at full patch resolution. A domain net embeds them; their average is classified
   (object-level prediction).
3. Part level: the domain net's channels are clustered into ``parts`` groups by k-means on their
   response patterns over patches (channels that fire on the same patches detect the same part).
   A part's score on a patch is the mean response of its channels; each part selects its
   best-scoring kept patch, and the selected patches' features, in part order, are classified
   (part-level prediction).
The prediction is the sum of the object and part logits (the part logits weighted by
``part_mix``, 1 by default as the paper). Loss: cross-entropy of the sum, plus
weighted cross-entropies of each level and of the filter net on every candidate (each candidate
labelled with its scene's class, as the paper trains its FilterNet).

Clustering: ``fit_parts(features)`` at any time (e.g. on a few batches after initialisation);
during training ``end_step`` keeps a bank of recent patch features and re-clusters every
``recluster_every`` optimiser steps. Assignments and the bank are buffers (in checkpoints).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone
from models.layers import contrast_prior, pooled, scaled_unit
from models.layers.pool import POOLS
from models.protocol import AttentionModel, ModelOutput, ReadRequest, Steps
from models.regions import DEFAULT_COARSEST, crop_resize, multiscale_windows, read_level, to_level0
from models.registry import register_model


def kmeans(
    x: Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd) of (n, d) rows with k-means++ seeding. Returns labels (n,) int64 and
    centres (k, d). An emptied cluster is re-seeded with the row farthest from its centre."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values.pow(2)
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        centres.append(x[int(torch.multinomial(probs, 1, generator=generator))])
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.int64)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        labels = dist.argmin(dim=1)
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:
                far = int(dist.min(dim=1).values.argmax())
                c[j], labels[far] = x[far], j
    return labels, c


def cluster_channels(features: Tensor, parts: int, generator: torch.Generator | None = None) -> Tensor:
    """Group the D channels of (N, D) patch features into ``parts`` clusters by their response
    pattern over the N patches (each pattern centred and L2-normalised, so the distance is a
    function of the correlation). Returns (D,) int64 cluster of each channel."""
    patterns = features.t().to(torch.float64)  # (D, N)
    patterns = patterns - patterns.mean(dim=1, keepdim=True)
    patterns = F.normalize(patterns, dim=1)
    labels, _ = kmeans(patterns, parts, generator=generator)
    return labels


def part_scores(features: Tensor, assignment: Tensor, parts: int) -> Tensor:
    """Mean response of each part's channels: (B, T, D) features -> (B, T, parts)."""
    onehot = F.one_hot(assignment, parts).to(features.dtype)  # (D, P)
    onehot = onehot / onehot.sum(0, keepdim=True).clamp(min=1.0)
    return features @ onehot


def select_parts(features: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """For each part, the feature of the patch where it scores highest.

    features (B, T, D), scores (B, T, P) -> part features (B, P, D) and chosen patch (B, P).
    """
    choice = scores.argmax(dim=1)  # (B, P)
    idx = choice[:, :, None].expand(-1, -1, features.shape[-1])
    return features.gather(1, idx), choice


def window_contrast(views: Tensor, windows: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K) mean local contrast (``contrast_prior`` of the view) inside each normalised window
    (B, K, 4), sampled at ``size``, scaled so that each view's best window scores 1."""
    contrast = contrast_prior(views, tuple(views.shape[-2:]))[:, None]  # (B, 1, h, w)
    inside = crop_resize(contrast, windows, size).mean((2, 3, 4))  # (B, K)
    return inside / inside.amax(-1, keepdim=True).clamp_min(1e-6)


class Kept(NamedTuple):
    """The candidates chosen for reading: ``index`` (B, T) into the candidates, best first, and
    the filter net's logits (B, M, classes) on the M windows it scored."""

    index: Tensor
    filter_logits: Tensor


class TwoLevelAttention(AttentionModel):
    """Two-level attention (see the module docstring).

    Args:
        num_classes, view_size: as every model.
        patch_size: (h, w) at which kept candidates are read and embedded.
        window_scales, window_stride: candidate windows (sides as fractions of the scene).
        keep: candidates kept by the filter net (and read) per scene.
        filter_size: (h, w) of the candidate crops cut from the view for the filter net.
        backbone: domain (patch) network; filter_backbone: filter network (names or modules).
        backbone_kwargs: keyword arguments of the backbone builder for both networks, e.g.
            ``{"se": true}``, ``{"norm": "group"}`` (``models.backbones.build_backbone``).
        parts: number of part detectors. object_weight, part_weight, filter_weight: loss weights.
        memory: patch features kept for re-clustering; recluster_every: steps between them.
        max_level: deepest pyramid level to read from (None: whatever the scene has).
        coarsest: long side (px) of the pyramids' coarsest level (training sets it from
            the pyramids: ``pipeline.train.driver.pyramids_coarsest``), so that reads use
            only the levels each scene's pyramid has.
        proposal_prior: "none" or "contrast": the candidates are ranked by the filter net's
            confidence plus ``prior_strength`` times their mean local contrast in the view
            (0..1, the bottom-up objectness that the paper takes from selective search; see
            ``window_contrast``), so the first reads land on structure.
        proposals: 0 scores every candidate with the filter net; M > 0 (with the contrast
            prior) scores only the M windows with the most contrast, as the paper's filter net
            sees only selective search's proposals (M times fewer filter-net passes).
        part_mix: weight of the part logits in the prediction ``object + part_mix * part`` (and
            so in its cross-entropy). 1 is the paper's sum; when a part's single patch often
            shows a distractor (Megapixel MNIST: 2 of 5 digits are of other classes) the part
            logits add noise (README).
        pool: "avg" or "max": global pooling of the domain net's map of each kept patch.
        feature_scale: 0 keeps the pooled patch features as they are; > 0 L2-normalises each
            and multiplies it by this (``ats_mnist``'s cosine-classifier temperature: a fresh
            linear head on unit features gives logits of about +-1 and learns slowly).
    """

    def __init__(
        self,
        num_classes: int,
        view_size: tuple[int, int],
        patch_size: tuple[int, int] = (32, 32),
        window_scales: tuple[float, ...] = (0.25, 0.5),
        window_stride: float = 0.5,
        keep: int = 4,
        filter_size: tuple[int, int] = (24, 24),
        backbone: str | nn.Module = "small_cnn",
        filter_backbone: str | nn.Module = "small_cnn",
        in_channels: int = 3,
        backbone_kwargs: dict | None = None,
        parts: int = 2,
        object_weight: float = 0.5,
        part_weight: float = 0.5,
        filter_weight: float = 0.5,
        memory: int = 512,
        recluster_every: int = 100,
        max_level: int | None = None,
        coarsest: int = DEFAULT_COARSEST,
        proposal_prior: str = "none",
        prior_strength: float = 5.0,
        proposals: int = 0,
        pool: str = "avg",
        feature_scale: float = 0.0,
        part_mix: float = 1.0,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool, self.feature_scale = pool, float(feature_scale)
        if proposal_prior not in ("none", "contrast"):
            raise ValueError(f"proposal_prior must be 'none' or 'contrast', got {proposal_prior!r}")
        self.prior_strength = float(prior_strength) if proposal_prior == "contrast" else 0.0
        self.uses_contrast = proposal_prior == "contrast"
        self.proposals = int(proposals)
        if self.proposals and (not self.uses_contrast or self.proposals < keep):
            raise ValueError(f"proposals={proposals} need proposal_prior='contrast' and >= keep={keep}")
        self.view_size, self.patch_size = tuple(view_size), tuple(patch_size)
        self.filter_size, self.keep, self.parts = tuple(filter_size), keep, parts
        self.object_weight, self.part_weight, self.part_mix = object_weight, part_weight, part_mix
        self.filter_weight, self.recluster_every = filter_weight, recluster_every
        self.max_level, self.coarsest = max_level, int(coarsest)
        windows = multiscale_windows(tuple(window_scales), window_stride)
        self.register_buffer("candidates", windows, persistent=False)
        if not 1 <= keep <= self.candidates.shape[0]:
            raise ValueError(f"keep must be in [1, {self.candidates.shape[0]}], got {keep}")
        self.filter_net = build_backbone(filter_backbone, in_channels, **(backbone_kwargs or {}))
        self.filter_head = nn.Linear(self.filter_net.out_channels, num_classes)
        self.domain_net = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        dim = self.domain_net.out_channels  # channels of the patch features
        if not 1 <= parts <= dim:
            raise ValueError(f"parts must be in [1, {dim}] (the domain net's channels), got {parts}")
        self.object_head = nn.Linear(dim, num_classes)
        self.part_head = nn.Linear(dim * parts, num_classes)
        self.register_buffer("assignment", torch.arange(dim) % parts)
        self.register_buffer("bank", torch.zeros(memory, dim))
        for name in ("bank_count", "step_count"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))

    def _keep(self, views: Tensor) -> Kept:
        """The candidates to read, best first: with ``proposals`` the windows with the most
        contrast first (bottom-up), then the filter net's confidence on their crops of the
        view, plus the prior's share."""
        b, k = views.shape[0], self.candidates.shape[0]
        windows = self.candidates.expand(b, k, 4)
        index = torch.arange(k).expand(b, k)
        prior = window_contrast(views, windows, self.filter_size) if self.uses_contrast else None
        if self.proposals:
            index = prior.topk(self.proposals, dim=-1).indices  # (B, M)
            prior, windows = prior.gather(1, index), self.candidates[index]
        crops = crop_resize(views, windows, self.filter_size)  # (B, M, C, fh, fw)
        logits = self.filter_head(pooled(self.filter_net(crops.flatten(0, 1))))
        logits = logits.view(b, index.shape[1], -1)
        score = torch.softmax(logits.detach(), -1).max(-1).values  # confidence
        if self.prior_strength:
            score = score + self.prior_strength * prior
        return Kept(index.gather(1, torch.topk(score, self.keep, dim=-1).indices), logits)

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        kept = self._keep(views)
        boxes0 = to_level0(self.candidates[kept.index], sizes)
        level = read_level(boxes0, self.patch_size, sizes, coarsest=self.coarsest,
                           max_level=self.max_level)
        patches = yield ReadRequest(boxes0, level, self.patch_size)  # (B, T, C, h, w)
        b = views.shape[0]
        feats = pooled(self.domain_net(patches.flatten(0, 1)), self.pool)
        feats = scaled_unit(feats, self.feature_scale).view(b, self.keep, -1)
        object_logits = self.object_head(feats.mean(1))
        part_feats, choice = select_parts(feats, part_scores(feats, self.assignment, self.parts))
        part_logits = self.part_head(part_feats.flatten(1))
        return ModelOutput(
            logits=object_logits + self.part_mix * part_logits,
            boxes=boxes0,
            weights=torch.full(boxes0.shape[:2], 1.0 / self.keep),
            extras={
                "filter_logits": kept.filter_logits,
                "object_logits": object_logits,
                "part_logits": part_logits,
                "part_choice": choice,
                "kept": kept.index,
                "patch_features": feats.detach(),
            },
        )

    def loss(self, output: ModelOutput, labels: Tensor, epoch: int = 0) -> Tensor:
        """CE(object + part) + weighted CE of each level + weighted CE of the filter net."""
        ex = output.extras
        filt = ex["filter_logits"]
        total = F.cross_entropy(output.logits, labels)
        total = total + self.object_weight * F.cross_entropy(ex["object_logits"], labels)
        total = total + self.part_weight * F.cross_entropy(ex["part_logits"], labels)
        per_candidate = labels[:, None].expand(filt.shape[:2]).reshape(-1)
        total = total + self.filter_weight * F.cross_entropy(filt.flatten(0, 1), per_candidate)
        for term in output.aux.values():
            total = total + term
        return total

    @torch.no_grad()
    def fit_parts(self, features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Re-cluster the domain net's channels from (N, D) patch features; returns (D,) labels."""
        if features.shape[0] < 2:
            raise ValueError(f"need at least 2 patch features to cluster, got {features.shape[0]}")
        self.assignment.copy_(cluster_channels(features, self.parts, generator))
        return self.assignment

    @torch.no_grad()
    def end_step(self, output: ModelOutput, labels: Tensor) -> None:
        """Every ``recluster_every`` steps re-cluster from the bank, then add this step's
        patch features to the bank (clustering first: the bank was synchronised across
        workers after the previous step, so every worker gets the same assignment)."""
        self.step_count += 1
        filled = int(min(self.bank_count, self.bank.shape[0]))
        if self.recluster_every > 0 and int(self.step_count) % self.recluster_every == 0 and filled >= 2:
            seed = torch.Generator().manual_seed(int(self.step_count))
            self.fit_parts(self.bank[:filled], seed)
        feats = output.extras["patch_features"].flatten(0, 1)
        n, size = feats.shape[0], self.bank.shape[0]
        slots = (torch.arange(n) + int(self.bank_count)) % size
        self.bank[slots[-size:]] = feats[-size:].to(self.bank)
        self.bank_count += n


@register_model("two_level")
def two_level(**kwargs) -> TwoLevelAttention:
    """Two-level attention: filter-net object level and clustered part level (keyword arguments
    of ``TwoLevelAttention``; ``num_classes`` 10 and ``view_size`` (64, 64) by default)."""
    return TwoLevelAttention(**{"num_classes": 10, "view_size": (64, 64), **kwargs})


# The Megapixel MNIST setting of bench/learning.py: windows of an eighth of the canvas (62 px of
# 500, every 31 px: a 28 px digit lies whole in one); the filter net sees 10 px cuts of the view
# of the 20 with the most contrast and ranks them with the contrast prior; 10 kept and read as
# 24 px at level 1 (the digit at 11 px), the feature CNN of ``ats_mnist`` for both networks,
# and ``ats_mnist``'s max pool and scaled unit features on the domain net's patches (2 epochs on
# the bench's data: test accuracy 0.220, 0.315 against 0.120, 0.270 without; README); the part
# logits weighted 0.25 in the prediction (a part's one patch is often a distractor digit; seeds
# 0-2: 0.894 / 0.914 / 0.892 against 0.874 / 0.872 / 0.862 with the plain sum; README).
MNIST_SETTING = dict(
    in_channels=1,
    num_classes=10,
    view_size=(50, 50),
    patch_size=(24, 24),
    window_scales=(0.125,),
    window_stride=0.5,
    keep=10,
    proposals=20,
    filter_size=(10, 10),
    backbone_kwargs={"widths": (16, 32, 64)},
    proposal_prior="contrast",
    prior_strength=5.0,
    pool="max",
    feature_scale=16.0,
    part_mix=0.25,
)


@register_model("two_level_mnist")
def two_level_mnist(**kwargs) -> TwoLevelAttention:
    """Two-level attention set up for Megapixel MNIST (``MNIST_SETTING``, any of it overridable)."""
    return TwoLevelAttention(**{**MNIST_SETTING, **kwargs})
