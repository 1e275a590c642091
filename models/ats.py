"""One-stage attention sampling (ATS; Katharopoulos & Fleuret, ICML 2019).

An attention network looks at the low-resolution view of the whole scene and gives one logit per
position of its output map; a softmax over all positions (optionally smoothed towards uniform)
is the attention ``a``. ``n_patches`` positions are drawn from ``a`` (with or without
replacement), each is mapped to a box of the scene at ``patch_level`` (``patch_size`` pixels of
that level, centred on the position's receptive-field centre), the boxes are read through the
pixel protocol, a feature network turns each patch into an L2-normalised vector, the unbiased
estimator of ``sum_i a_i f_i`` aggregates them, and a linear layer classifies.

Randomness and batch invariance: every scene draws from its own ``torch.Generator`` seeded with
one number drawn from the caller's generator *and* a hash of the scene's view. A scene therefore
gets the same draws whether it is alone or anywhere in a batch, as long as the caller passes a
generator in the same state (for example ``torch.Generator().manual_seed(s)`` both times), and
different scenes of a batch still get different draws. In eval mode with ``inference="topk"``
(the default) or ``"spread"`` the model is deterministic and uses no randomness at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import sampling
from models.backbones import build_backbone
from models.layers import contrast_prior, patch_shift_setting, random_shift
from models.protocol import AttentionModel, ModelOutput, Proposal, ReadRequest, Steps
from models.registry import register_model

INFERENCE = ("topk", "spread", "sample")

_EPS = 1e-12


def scene_seeds(views: Tensor, generator: torch.Generator | None) -> list[int]:
    """One seed per scene from one draw of ``generator`` and a hash of the scene's view.

    Args:
        views: (B, C, h, w) views; each scene's bytes are hashed so that its seed depends on the
            scene and not on its position in the batch.
        generator: the caller's generator (None: torch's default); advanced by one draw.
    Returns B integers in [0, 2**63).
    """
    base = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    seeds = []
    for view in views.detach().to("cpu", torch.float32).contiguous():
        digest = hashlib.blake2b(view.numpy().tobytes(), digest_size=8).digest()
        seeds.append((base ^ int.from_bytes(digest, "little")) % 2**63)
    return seeds


def scene_generators(
    seeds: Sequence[int], stream: int = 0, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per scene seed on ``device``; ``stream`` picks an independent stream of
    each scene (so that a later stage's draws do not depend on how much an earlier one used)."""
    return [
        torch.Generator(device=device).manual_seed((s + 0x9E3779B97F4A7C15 * stream) % 2**63)
        for s in seeds
    ]


def smooth(probs: Tensor, smoothing: float) -> Tensor:
    """``probs * (1 - s) + s / P`` over the last dim of (..., P): keeps every position > 0."""
    if smoothing <= 0:
        return probs
    return probs * (1 - smoothing) + smoothing / probs.shape[-1]


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of the distributions on the last dim of (..., P) -> (...)."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(-1)


def position_centres(grid: tuple[int, int], view_size: tuple[int, int]) -> Tensor:
    """(h'*w', 2) centre in view pixels of each position of an (h', w') map over the view.

    A map of (h', w') over a view of (h, w) has a stride of h/h' view pixels; position i covers
    view pixels ``[i * h/h', (i+1) * h/h')`` and its receptive-field centre is at
    ``(i + 0.5) * h/h'`` (pixel i's centre is at i + 0.5), row-major order.
    """
    gh, gw = grid
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) * (view_size[0] / gh)
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) * (view_size[1] / gw)
    return torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)


def centred_boxes(centres: Tensor, box_size: tuple[int, int], level: int = 0) -> Tensor:
    """Integer level-0 boxes ``[y0, x0, y1, x1]`` centred on (..., 2) level-0 centres.

    ``box_size`` is in pixels of ``level``; boxes lie on that level's pixel grid (starts and
    ends are multiples of ``2**level``), so a read at ``level`` needs no resampling:
    ``y0 = floor(cy / f - bh / 2 + 0.5) * f`` (the centre rounded half up), ``y1 = y0 + bh * f``
    with ``f = 2**level``. Boxes may cross the scene border (the source zero-pads).
    Returns (..., 4) int64.
    """
    f = 2**level
    size = torch.tensor(box_size, dtype=centres.dtype, device=centres.device)
    start = torch.floor(centres / f - size / 2 + 0.5).to(torch.int64) * f
    end = start + torch.tensor(box_size, dtype=torch.int64, device=centres.device) * f
    return torch.cat([start, end], -1)


def view_boxes(
    idx: Tensor,
    grid: tuple[int, int],
    view_size: tuple[int, int],
    sizes: Tensor,
    box_size: tuple[int, int],
    level: int = 0,
) -> Tensor:
    """Level-0 boxes of positions ``idx`` (B, K) of an attention map of ``grid`` over the view.

    Each scene has its own scale factors ``H / h`` and ``W / w`` (scenes need not be square or
    of one size). Returns (B, K, 4) int64: ``box_size`` pixels of ``level`` centred on the
    position (see ``centred_boxes``).
    """
    centres = position_centres(grid, view_size).to(idx.device)[idx]  # (B, K, 2) view pixels
    scale = sizes.to(torch.float64) / torch.tensor(view_size, dtype=torch.float64)
    return centred_boxes(centres * scale[:, None, :].to(idx.device), box_size, level)


class AttentionHead(nn.Module):
    """Backbone (+ a 1x1 conv when it has more than one channel): (N, C, h, w) -> (N, h', w')
    attention logits, plus ``prior_strength * contrast_prior`` when ``prior == "contrast"``.

    The prior is a fixed (not learned) starting point: at initialisation the learned logits are
    nearly constant, so the attention is uniform over thousands of positions and almost every
    patch is background; the prior makes the first patches land on structure and the learned
    part, added to it, can then move away from it (see bench/learning.py's README section).
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        prior: str = "none",
        prior_strength: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        if prior not in ("none", "contrast"):
            raise ValueError(f"attention prior must be 'none' or 'contrast', got {prior!r}")
        self.prior = prior
        self.prior_strength = float(prior_strength)
        self.body = build_backbone(backbone, in_channels=in_channels, **kwargs)
        channels = self.body.out_channels
        self.logit = nn.Identity() if channels == 1 else nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.logit(self.body(x))[:, 0]
        if self.prior == "contrast" and self.prior_strength:
            logits = logits + self.prior_strength * contrast_prior(x, tuple(logits.shape[-2:]))
        return logits


class FeatureNet(nn.Module):
    """Backbone + global max pool + L2 normalisation: (N, C, h, w) -> (N, D), unit norm."""

    def __init__(self, backbone: str, in_channels: int, **kwargs):
        super().__init__()
        self.body = build_backbone(backbone, in_channels=in_channels, **kwargs)
        self.out_channels = self.body.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.body(x).amax(dim=(-2, -1)), dim=-1)


class ATS(AttentionModel):
    """One-stage attention sampling. See the module docstring.

    Args:
        num_classes: classes of the linear classifier.
        in_channels: channels of the views and patches.
        view_size: (h, w) of the low-resolution view.
        patch_size: (h, w) of a patch in pixels of ``patch_level`` (the level-0 box is
            ``patch_size * 2**patch_level``, aligned on that level's pixel grid).
        patch_level: pyramid level the patches are read from.
        n_patches: patches drawn per scene (N).
        replace: draw with replacement (True) or without (Gumbel-top-k, False).
        smoothing: attention smoothing ``a (1 - s) + s / P``.
        entropy_strength: the aux term is ``-entropy_strength * H(a)`` (maximises entropy).
        inference: "topk" (deterministic, the N most attended positions), "spread"
            (deterministic, the N most attended with each pick suppressing the positions within
            ``spread_radius`` cells for later picks: ``sampling.spread_topk_indices``) or
            "sample".
        spread_radius: the suppression radius of "spread", in attention-map cells.
        attention_pool: average-pool the view by this factor before the attention network
            (fewer positions, cheaper attention; positions map to boxes all the same).
        attention_prior: "none" or "contrast": add ``prior_strength`` times the view's local
            contrast (0..1) to the attention logits (see ``AttentionHead``).
        baseline: subtract the batch's mean feature (detached) inside the estimator: the value
            and feature gradients are unchanged (the weights sum to 1), the score-function
            gradient to the attention becomes ``w_q g.(f_q - c) / a_q`` (a control variate).
        feature_scale: the classifier sees ``feature_scale`` times the (unit-norm) pooled
            feature: with 1 the logits of a fresh linear layer on unit vectors span about +-1
            and cross-entropy learns slowly; 10 to 30 behaves like a cosine classifier's scale.
        attention_backbone, feature_backbone: names for ``models.backbones.build_backbone``.
        attention_backbone_kwargs, feature_backbone_kwargs: extra keyword arguments for
            those builders.
        patch_shift: in training, move each patch by a random whole-pixel offset of at most
            this many pixels in y and x before the feature network (``random_shift``, zeros
            moved in), against the feature network memorising few distinct objects; the
            boxes read are unchanged. 0 (the reference) turns it off.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        view_size: Sequence[int] = (128, 128),
        patch_size: Sequence[int] = (50, 50),
        patch_level: int = 0,
        n_patches: int = 10,
        replace: bool = False,
        smoothing: float = 0.0,
        entropy_strength: float = 1e-4,
        inference: str = "topk",
        spread_radius: int = 1,
        attention_pool: int = 1,
        attention_prior: str = "none",
        prior_strength: float = 5.0,
        baseline: bool = False,
        feature_scale: float = 1.0,
        attention_backbone: str = "ats_attention",
        feature_backbone: str = "ats_feature",
        attention_backbone_kwargs: dict | None = None,
        feature_backbone_kwargs: dict | None = None,
        patch_shift: int = 0,
    ):
        super().__init__()
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {inference!r}")
        if spread_radius < 0:
            raise ValueError(f"spread_radius must be >= 0, got {spread_radius}")
        self.spread_radius = int(spread_radius)
        if n_patches < 1:
            raise ValueError(f"n_patches must be >= 1, got {n_patches}")
        self.view_size = (int(view_size[0]), int(view_size[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.patch_level = int(patch_level)
        self.n_patches = int(n_patches)
        self.replace = bool(replace)
        self.smoothing = float(smoothing)
        self.entropy_strength = float(entropy_strength)
        self.inference = inference
        self.attention_pool = int(attention_pool)
        self.baseline = bool(baseline)
        self.feature_scale = float(feature_scale)
        self.patch_shift = patch_shift_setting(patch_shift)
        self.attention = AttentionHead(
            attention_backbone,
            in_channels,
            attention_prior,
            prior_strength,
            **(attention_backbone_kwargs or {}),
        )
        self.features = FeatureNet(feature_backbone, in_channels, **(feature_backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def attend(self, views: Tensor) -> Tensor:
        """(B, C, h, w) views -> (B, h', w') attention probabilities (smoothed)."""
        if self.attention_pool > 1:
            views = F.avg_pool2d(views, self.attention_pool, ceil_mode=True)
        logits = self.attention(views)
        b, gh, gw = logits.shape
        if gh * gw < self.n_patches and not self.replace:
            raise ValueError(f"attention map {gh}x{gw} has fewer positions than {self.n_patches}")
        probs = smooth(torch.softmax(logits.reshape(b, -1), -1), self.smoothing)
        return probs.reshape(b, gh, gw)

    def choose(self, probs: Tensor, views: Tensor, generator: torch.Generator | None,
               grid: tuple[int, int]) -> Tensor:
        """(B, N) positions drawn from flat (B, P) ``probs`` on the (gh, gw) ``grid`` (at eval:
        the top N with "topk", the top N spread apart with "spread")."""
        if not self.training and self.inference == "topk":
            return sampling.topk_indices(probs.detach(), self.n_patches)
        if not self.training and self.inference == "spread":
            return sampling.spread_topk_indices(probs, grid, self.n_patches, self.spread_radius)
        draw = sampling.sample_with_replacement if self.replace else sampling.sample_without_replacement
        return draw(probs.detach(), self.n_patches, scene_generators(scene_seeds(views, generator), device=probs.device))

    def estimate(
        self, probs: Tensor, idx: Tensor, features: Tensor, proposal: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B, D) estimate of ``sum_i a_i f_i`` from features (B, N, D) at positions idx, and
        (B, N) the weight of each feature in it (the estimator is linear in the features).
        ``proposal`` (B, P): the distribution idx was drawn from when it is not ``probs``."""
        a_sel = probs.gather(1, idx)
        q_sel = None if proposal is None else proposal.gather(1, idx)
        if self.replace:
            ratio = sampling.importance_ratio(a_sel, q_sel)
            weights = sampling.with_replacement_weights(idx, probs.dtype, ratio)
        else:
            weights = sampling.without_replacement_weights(a_sel, q_sel=q_sel)
        if not self.baseline:
            return sampling.expect_weighted(a_sel, weights, features), weights
        # subtracting a constant c and adding back c * sum_q w_q keeps the value and the feature
        # gradient; only the score-function term becomes w_q g.(f_q - c) / a_q. On-policy the
        # weights sum to 1; off-policy their sum is 1 only in expectation.
        c = features.detach().mean((0, 1))
        total = 1.0 if proposal is None else weights.sum(1, keepdim=True)
        return sampling.expect_weighted(a_sel, weights, features - c) + c * total, weights

    def _request(self, idx: Tensor, grid: tuple[int, int], sizes: Tensor) -> ReadRequest:
        boxes = view_boxes(idx, grid, self.view_size, sizes, self.patch_size, self.patch_level)
        return ReadRequest(boxes, self.patch_level, self.patch_size)

    @torch.no_grad()
    def propose(
        self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None
    ) -> Proposal:
        """Draw the N positions now with the current weights; see ``Proposal``.

        Consumes ``generator`` as ``steps`` would. The attention network's buffers (batch-norm
        running statistics) are left as they were: the forward that counts is the one in
        ``steps``."""
        saved = [(b, b.clone()) for b in self.attention.buffers()]
        att = self.attend(views)
        for buffer, value in saved:
            buffer.copy_(value)
        b, gh, gw = att.shape
        probs = att.reshape(b, -1)
        idx = self.choose(probs, views, generator, (gh, gw))
        return Proposal(self._request(idx, (gh, gw), sizes), idx, probs)

    def steps(
        self,
        views: Tensor,
        sizes: Tensor,
        generator: torch.Generator | None = None,
        proposal: Proposal | None = None,
    ) -> Steps:
        """See ``AttentionModel.steps``; with ``proposal`` (from ``propose``, possibly with
        other weights) its positions are used, importance-weighted from its distribution to
        this attention (``models.sampling``: unbiased for any proposal)."""
        att = self.attend(views)
        b, gh, gw = att.shape
        probs = att.reshape(b, -1)
        if proposal is None:
            idx, drawn_from = self.choose(probs, views, generator, (gh, gw)), None
            request = self._request(idx, (gh, gw), sizes)
        else:
            idx, drawn_from, request = proposal.positions, proposal.probs, proposal.request
        boxes = request.boxes
        patches = yield request
        patches = patches.to(views.device, views.dtype)
        if self.training and self.patch_shift:
            patches = random_shift(patches.flatten(0, 1), self.patch_shift).reshape(patches.shape)
        feats = self.features(patches.flatten(0, 1)).reshape(b, self.n_patches, -1)
        pooled, weights = self.estimate(probs, idx, feats, drawn_from)
        extras = {"positions": idx, "probs": probs}
        if drawn_from is not None:
            extras["importance_ratio"] = sampling.importance_ratio(
                probs.gather(1, idx), drawn_from.gather(1, idx)
            )
        logits = self.classifier(self.feature_scale * pooled)
        aux = {}
        if self.entropy_strength and self.training:
            aux["entropy"] = -self.entropy_strength * entropy(probs).mean()
        return ModelOutput(
            logits=logits,
            attention=att,
            boxes=boxes,
            weights=weights,
            aux=aux,
            extras=extras,
        )


@register_model("ats")
def ats(**kwargs) -> ATS:
    """ATS with the reference's small attention and feature networks (3-channel input)."""
    return ATS(**kwargs)


# The Megapixel MNIST setting of bench/learning.py (measurements in the README, "It learns"):
# 24 px patches read at level 1 (a 28 px digit becomes 14 px, still readable, at a quarter of
# the pixels), attention on the view pooled 2x, a small strided feature CNN with BatchNorm,
# the contrast prior on the attention logits and a scale of 16 on the unit-norm feature.
MNIST_SETTING = dict(
    in_channels=1,
    num_classes=10,
    view_size=(100, 100),
    patch_size=(24, 24),
    patch_level=1,
    n_patches=10,
    attention_pool=2,
    attention_prior="contrast",
    prior_strength=5.0,
    feature_scale=16.0,
    feature_backbone="small_cnn",
    feature_backbone_kwargs={"widths": (16, 32, 64)},
)


@register_model("ats_mnist")
def ats_mnist(**kwargs) -> ATS:
    """ATS set up for Megapixel MNIST (1 channel; ``MNIST_SETTING``, any of it overridable)."""
    return ATS(**{**MNIST_SETTING, **kwargs})
