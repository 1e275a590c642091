"""Two-stage hierarchical attention sampling (Zoom-In; Kong & Henao, CVPR 2022).

Stage I: an attention network on the view (scale s1) gives a probability per view position;
summed over the cells of a ``tile_grid`` they are the tile attention ``alpha``. ``n_patches``
tiles are drawn **with** replacement. Stage II: each *distinct* drawn tile is read at
``tile_level`` and resized to ``tile_view`` (scale s2 relative to level 0 is
``tile_view / tile side``); a second attention network gives ``beta`` over that tile view's
positions, and as many sub-tiles as the tile was drawn are drawn **without** replacement
(Gumbel-top-k). Each drawn sub-tile is a box of ``patch_size`` pixels at ``patch_level``
centred on its position (it may extend past its tile, so a digit cut by a tile border is still
seen whole); those boxes are read, featurised and aggregated by the nested estimator
(``models.sampling.expect_nested``), whose gradient reaches alpha and beta through the joint
probability ``alpha * beta``.

Reads through the pixel protocol, with a fixed K per request for the whole batch:
1. tile views: K = the largest number of distinct tiles of any scene of the batch; a scene
   with fewer pads its list by repeating its first tile; padded tiles get count 0 and weight 0
   and are ignored (they only cost a read);
2. sub-tiles: K = ``n_patches`` (every scene draws exactly n sub-tiles in total).
During training with the contrastive loss switched on, the same two reads happen once more for
tiles drawn from ``1 - alpha`` and sub-tiles from ``1 - beta`` (both renormalised).

Inference: ``inference="topk"`` (default, deterministic) gives each tile
``round(n * alpha)`` draws (largest-remainder rounding, so they sum to n) and takes each tile's
most attended sub-tiles; ``"sample"`` samples as in training. Randomness and batch invariance
work as in ``models.ats`` (one generator per scene from the caller's generator and the view).

Peak memory at inference is that of the view, the K tile views and the n patches with their
activations: it does not depend on the scene's size (``O(s1^2 HW + N' s1^2 s2^2 HW + N h w)`` in
the paper's notation, with fixed view sizes here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import sampling
from models.ats import (
    MNIST_SETTING,
    AttentionHead,
    FeatureNet,
    centred_boxes,
    entropy,
    position_centres,
    scene_generators,
    scene_seeds,
    smooth,
)
from models.layers import patch_shift_setting, random_shift
from models.protocol import AttentionModel, ModelOutput, ReadRequest, Steps
from models.registry import register_model

_CONTRASTIVE = ("none", "binary", "multiclass")


def tile_boxes(tiles: Tensor, grid: tuple[int, int], sizes: Tensor) -> Tensor:
    """Level-0 boxes (B, K, 4) of tile indices (B, K) of a ``grid`` over each scene.

    Tile (r, c) of a (gh, gw) grid over an (H, W) scene is
    ``[floor(r H / gh), floor(c W / gw), floor((r+1) H / gh), floor((c+1) W / gw)]``:
    the tiles partition the scene exactly, whatever its size.
    """
    gh, gw = grid
    r, c = tiles // gw, tiles % gw
    h, w = sizes[:, 0:1], sizes[:, 1:2]
    return torch.stack([r * h // gh, c * w // gw, (r + 1) * h // gh, (c + 1) * w // gw], -1)


def subtile_boxes(
    tiles: Tensor,
    positions: Tensor,
    grid2: tuple[int, int],
    box_size: tuple[int, int],
    level: int = 0,
) -> Tensor:
    """Level-0 boxes (B, n, 4) of ``box_size`` pixels of ``level`` centred on positions (B, n)
    of a (h2, w2) attention map over each tile (B, n, 4): centre = tile corner
    + (i + 0.5) * tile side / h2 (see ``models.ats.centred_boxes`` for the rounding)."""
    unit = position_centres(grid2, (1, 1)).to(positions.device)[positions]  # (B, n, 2) in [0, 1)
    start = tiles[..., :2].to(torch.float64)
    side = (tiles[..., 2:] - tiles[..., :2]).to(torch.float64)
    return centred_boxes(start + unit * side, box_size, level)


def apportion(alpha: Tensor, n: int) -> Tensor:
    """Deterministic stage-I "draws": tile t gets ``round(n * alpha_t)`` of n (largest
    remainder), listed in decreasing alpha. (B, P1) -> (B, n) int64 tile indices."""
    quota = alpha.detach() * n
    counts = quota.floor().to(torch.int64)
    short = n - counts.sum(1)
    remainder_rank = torch.argsort(torch.argsort(quota - counts, dim=1, descending=True), dim=1)
    counts = counts + (remainder_rank < short[:, None]).to(torch.int64)
    order = torch.argsort(alpha.detach(), dim=1, descending=True, stable=True)
    rows = [o.repeat_interleave(c[o]) for o, c in zip(order, counts, strict=True)]
    return torch.stack(rows)


def complement(probs: Tensor) -> Tensor:
    """``(1 - p) / sum(1 - p)`` over the last dim: where the attention does not look."""
    inv = (1 - probs).clamp_min(0)
    return inv / inv.sum(-1, keepdim=True).clamp_min(1e-12)


class ZoomIn(AttentionModel):
    """Two-stage hierarchical attention sampling. See the module docstring.

    Args:
        num_classes, in_channels, view_size: as ``ATS``.
        tile_grid: (gh, gw) stage-I tiles over the scene; the stage-I attention map's sides
            must be multiples of it.
        tile_level, tile_view: pyramid level a tile is read from and the (h, w) it is resized
            to for stage-II attention. ``tile_level=None`` picks, per scene, the coarsest level
            at which the scene's tiles are still at least ``tile_view`` (and that exists in a
            pyramid built down to ``coarsest`` px): the transient crop then stays about
            ``tile_view`` whatever the scene's size, also in a batch mixing 1k and 32k scenes
            (the request carries one level per scene). Neither setting couples scenes.
        coarsest: long side of the coarsest pyramid level (the pyramids' convention; training
            sets it from the pyramids, ``pipeline.train.driver.pyramids_coarsest``).
        patch_size, patch_level: the final sub-tile read (pixels of that level).
        n_patches: stage-I draws = sub-tiles read per scene (N).
        smoothing: smoothing of alpha and beta.
        entropy_strength: aux term ``-strength * (H(alpha) + mean H(beta))``.
        inference: "topk" or "sample" (see the module docstring).
        attention_pool, attention_prior, prior_strength, baseline, feature_scale: as
            ``models.ats.ATS`` (the pool applies to stage I, the prior to both stages).
        contrastive: "none", "binary" (scenes of ``positive_class``: push the prediction from
            inverted attention away from it, ``-log(1 - p_pos)``) or "multiclass" (every scene
            whose label is not ``reference_class``: ``-log(1 - p_label)``).
        contrastive_epoch: first epoch (``loss(..., epoch)``) at which the term counts.
        contrastive_weight: its strength.
        positive_class, reference_class: see ``contrastive``.
        attention_backbone, tile_attention_backbone, feature_backbone: names for
            ``models.backbones.build_backbone``; ``<that name>_kwargs``: its keyword arguments.
        patch_shift: as ``models.ats.ATS``: in training, each sub-tile moved by a random
            whole-pixel offset of at most this many pixels before the feature network (the
            boxes read are unchanged); 0 turns it off.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        view_size: Sequence[int] = (128, 128),
        tile_grid: Sequence[int] = (4, 4),
        tile_level: int | None = 1,
        coarsest: int = 256,
        tile_view: Sequence[int] = (64, 64),
        patch_size: Sequence[int] = (50, 50),
        patch_level: int = 0,
        n_patches: int = 10,
        smoothing: float = 0.0,
        entropy_strength: float = 1e-5,
        inference: str = "topk",
        attention_pool: int = 1,
        attention_prior: str = "none",
        prior_strength: float = 5.0,
        baseline: bool = False,
        feature_scale: float = 1.0,
        contrastive: str = "none",
        contrastive_epoch: int = 10,
        contrastive_weight: float = 1.0,
        positive_class: int = 1,
        reference_class: int | None = None,
        attention_backbone: str = "ats_attention",
        tile_attention_backbone: str = "ats_attention",
        feature_backbone: str = "ats_feature",
        attention_backbone_kwargs: dict | None = None,
        tile_attention_backbone_kwargs: dict | None = None,
        feature_backbone_kwargs: dict | None = None,
        patch_shift: int = 0,
    ):
        super().__init__()
        self.patch_shift = patch_shift_setting(patch_shift)
        if inference not in ("topk", "sample"):
            raise ValueError(f"inference must be 'topk' or 'sample', got {inference!r}")
        if contrastive not in _CONTRASTIVE:
            raise ValueError(f"contrastive must be one of {_CONTRASTIVE}, got {contrastive!r}")
        self._set_geometry(view_size, tile_grid, tile_level, coarsest, tile_view, patch_size, patch_level)
        self.n_patches = int(n_patches)
        self.smoothing = float(smoothing)
        self.entropy_strength = float(entropy_strength)
        self.inference = inference
        self._set_contrastive(
            contrastive, contrastive_epoch, contrastive_weight, positive_class, reference_class
        )
        self.baseline = bool(baseline)
        self.attention_pool = int(attention_pool)
        self.feature_scale = float(feature_scale)
        prior = (attention_prior, prior_strength)
        self.attention = AttentionHead(
            attention_backbone, in_channels, *prior, **(attention_backbone_kwargs or {})
        )
        self.tile_attention = AttentionHead(
            tile_attention_backbone, in_channels, *prior, **(tile_attention_backbone_kwargs or {})
        )
        self.features = FeatureNet(feature_backbone, in_channels, **(feature_backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def _set_geometry(
        self, view_size, tile_grid, tile_level, coarsest, tile_view, patch_size, patch_level
    ) -> None:
        """Store the sizes and levels of ``__init__`` (see the class docstring) as ints."""
        self.view_size = (int(view_size[0]), int(view_size[1]))
        self.tile_grid = (int(tile_grid[0]), int(tile_grid[1]))
        if self.tile_grid[0] * self.tile_grid[1] < 2:
            raise ValueError(f"tile_grid {self.tile_grid} needs at least 2 tiles")
        self.tile_level = None if tile_level is None else int(tile_level)
        self.coarsest = int(coarsest)
        self.tile_view = (int(tile_view[0]), int(tile_view[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.patch_level = int(patch_level)

    def _set_contrastive(
        self, contrastive, contrastive_epoch, contrastive_weight, positive_class, reference_class
    ) -> None:
        """Store the contrastive-loss settings of ``__init__`` (see the class docstring)."""
        self.contrastive = contrastive
        self.contrastive_epoch = int(contrastive_epoch)
        self.contrastive_weight = float(contrastive_weight)
        self.positive_class = int(positive_class)
        self.reference_class = reference_class
        # set by ``loss`` once ``contrastive_epoch`` is reached: until then ``steps`` skips the
        # contrastive reads (the term would be multiplied by 0 anyway)
        self.contrastive_live = False

    def read_level(self, sizes: Tensor) -> int | tuple[int, ...]:
        """Pyramid level of the tile-view read for scenes of level-0 ``sizes`` (B, 2): the fixed
        ``tile_level``, or (``tile_level=None``) one level per scene, the coarsest at which its
        tiles still span ``tile_view`` and that its pyramid (built down to ``coarsest`` px)
        has, so a tile read costs about ``tile_view`` pixels whatever the scene's size."""
        if self.tile_level is not None:
            return self.tile_level
        levels = []
        for h, w in sizes.tolist():
            th, tw = h // self.tile_grid[0], w // self.tile_grid[1]
            ratio = min(th / self.tile_view[0], tw / self.tile_view[1])
            fit = max(0, math.floor(math.log2(ratio))) if ratio >= 1 else 0
            depth, side = 0, max(h, w)
            while side > self.coarsest:  # levels that exist: halve until <= coarsest
                side, depth = math.ceil(side / 2), depth + 1
            levels.append(min(fit, depth))
        return tuple(levels)

    def attend_tiles(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """Views (B, C, h, w) -> position attention (B, h', w') and tile attention (B, gh*gw)."""
        if self.attention_pool > 1:
            views = F.avg_pool2d(views, self.attention_pool, ceil_mode=True)
        logits = self.attention(views)
        b, h, w = logits.shape
        gh, gw = self.tile_grid
        if h % gh or w % gw:
            raise ValueError(f"attention map {h}x{w} is not divisible into tile grid {gh}x{gw}")
        pos = torch.softmax(logits.reshape(b, -1), -1).reshape(b, h, w)
        alpha = pos.reshape(b, gh, h // gh, gw, w // gw).sum((2, 4)).reshape(b, -1)
        return pos, smooth(alpha, self.smoothing)

    def attend_subtiles(self, tile_views: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tile views (B, M, C, th, tw) -> beta (B, M, P2) and the (h2, w2) of its map."""
        b, m = tile_views.shape[:2]
        logits = self.tile_attention(tile_views.flatten(0, 1))
        h2, w2 = logits.shape[-2:]
        if h2 * w2 < self.n_patches:
            raise ValueError(f"stage-II map {h2}x{w2} has fewer positions than {self.n_patches}")
        beta = smooth(torch.softmax(logits.reshape(b, m, -1), -1), self.smoothing)
        return beta, (h2, w2)

    def _draw_tiles(self, alpha: Tensor, gens) -> Tensor:
        if gens is None:
            return apportion(alpha, self.n_patches)
        return sampling.sample_with_replacement(alpha.detach(), self.n_patches, gens)

    def _two_stage(self, views, sizes, alpha, gens_tiles, gens_sub, invert: bool) -> Steps:
        """Coroutine of one two-stage pass: yields the tile-view and sub-tile reads, returns
        (pooled (B, D), weights (B, n), sub-tile boxes (B, n, 4), stage-II attention (B, M, P2),
        plan). ``invert``: draw from ``1 - alpha`` and ``1 - beta`` (contrastive pass)."""
        dist1 = complement(alpha) if invert else alpha
        tile_idx = self._draw_tiles(dist1, gens_tiles)
        plan = sampling.nested_plan(tile_idx)
        boxes_m = tile_boxes(plan.tiles, self.tile_grid, sizes)
        tile_views = yield ReadRequest(boxes_m, self.read_level(sizes), self.tile_view)
        beta_m, grid2 = self.attend_subtiles(tile_views.to(views.device, views.dtype))
        dist2 = complement(beta_m) if invert else beta_m
        sub_idx = sampling.sample_subtiles(dist2, plan, gens_sub, deterministic=gens_sub is None)
        tiles_q = tile_boxes(tile_idx, self.tile_grid, sizes)
        boxes = subtile_boxes(tiles_q, sub_idx, grid2, self.patch_size, self.patch_level)
        patches = yield ReadRequest(boxes, self.patch_level, self.patch_size)
        patches = patches.to(views.device, views.dtype).flatten(0, 1)
        if self.training and self.patch_shift:
            patches = random_shift(patches, self.patch_shift)
        feats = self.features(patches).reshape(views.shape[0], self.n_patches, -1)
        beta_q = sampling.per_draw(dist2, plan)
        # control variate as in models.ats (the nested weights sum to 1 per scene)
        c = feats.detach().mean((0, 1)) if self.baseline else torch.zeros(())
        pooled = sampling.expect_nested(dist1, tile_idx, beta_q, sub_idx, feats - c, plan) + c
        beta_sel = beta_q.gather(2, sub_idx[..., None]).squeeze(2)
        weights = sampling.nested_weights(beta_sel, plan, beta_q.shape[2])
        return self.feature_scale * pooled, weights, boxes, beta_m, plan

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        pos, alpha = self.attend_tiles(views)
        sample = self.training or self.inference == "sample"
        seeds = scene_seeds(views, generator) if sample else None
        gens = [scene_generators(seeds, s, alpha.device) for s in range(4)] if sample else [None] * 4
        pooled, weights, boxes, beta_m, plan = yield from self._two_stage(
            views, sizes, alpha, gens[0], gens[1], invert=False
        )
        aux = {}
        if self.entropy_strength and self.training:
            h_beta = (entropy(beta_m) * plan.valid).sum() / plan.valid.sum()
            aux["entropy"] = -self.entropy_strength * (entropy(alpha).mean() + h_beta)
        extras: dict[str, object] = {"alpha": alpha, "tiles": plan.tiles, "counts": plan.counts}
        if self.training and self.contrastive != "none" and self.contrastive_live:
            con_pooled, *_ = yield from self._two_stage(
                views, sizes, alpha, gens[2], gens[3], invert=True
            )
            extras["contrastive_logits"] = self.classifier(con_pooled)
        return ModelOutput(
            logits=self.classifier(pooled),
            attention=pos,
            boxes=boxes,
            weights=weights,
            aux=aux,
            extras=extras,
        )

    def contrastive_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the batch of the contrastive term on the inverted-attention logits.

        binary: ``-log(1 - p_positive)`` on scenes of ``positive_class``; multiclass:
        ``-log(1 - p_label)`` on scenes whose label is not ``reference_class``. Scenes that do
        not qualify add 0.
        """
        p = torch.softmax(logits, -1)
        if self.contrastive == "binary":
            mask = labels == self.positive_class
            p_true = p[:, self.positive_class]
        else:
            mask = torch.ones_like(labels, dtype=torch.bool)
            if self.reference_class is not None:
                mask = labels != self.reference_class
            p_true = p.gather(1, labels[:, None])[:, 0]
        term = -torch.log1p(-p_true.clamp_max(1 - 1e-6))
        return (term * mask).sum() / labels.shape[0]

    def loss(self, output: ModelOutput, labels: Tensor, epoch: int = 0) -> Tensor:
        """Cross-entropy + aux terms + (from ``contrastive_epoch`` on) the contrastive term."""
        total = F.cross_entropy(output.logits, labels)
        for term in output.aux.values():
            total = total + term
        if self.contrastive != "none" and epoch >= self.contrastive_epoch:
            self.contrastive_live = True
            con = output.extras.get("contrastive_logits")
            if con is not None:
                total = total + self.contrastive_weight * self.contrastive_loss(con, labels)
        return total


@register_model("zoom_in")
def zoom_in(**kwargs) -> ZoomIn:
    """Zoom-In with the reference's small attention and feature networks (3-channel input)."""
    return ZoomIn(**kwargs)


@register_model("zoom_in_mnist")
def zoom_in_mnist(**kwargs) -> ZoomIn:
    """Zoom-In for Megapixel MNIST: ``models.ats.MNIST_SETTING`` for the view, stage-I
    attention and the sub-tiles, plus a 5 x 5 tile grid whose tiles are read at level 1 and
    resized to 25 px for stage II (s2 = 0.25 on a 500 px canvas)."""
    defaults = dict(MNIST_SETTING, tile_grid=(5, 5), tile_level=1, tile_view=(25, 25))
    return ZoomIn(**{**defaults, **kwargs})
