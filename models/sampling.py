"""Sampling math and the unbiased expectation estimators of attention sampling.

Pure functions of tensors and an explicit ``torch.Generator``: no parameters, no I/O.

Notation: ``a`` (B, P) is an attention distribution over P positions (rows sum to 1), ``f_i``
the feature of position i. Every estimator here estimates ``E_a[f] = sum_i a_i f_i`` from n
sampled positions and has the same form

    Phi = sum_q w_q f_q,        w_q a function of the sampled probabilities only,

with the gradient (derived in the docstrings below and checked against autograd of the
exhaustive expectation in ``tests/models/test_estimators.py``)

    dPhi/df_q = w_q,            dPhi/da_{i_q} = w_q (g . f_q) / a_{i_q}   (g: upstream gradient).

The second line is the score-function term of the sampling distribution with the
cross terms that have zero expectation removed; see ``expect_without_replacement``.
The gradient with respect to ``a`` is exact only up to a multiple of the all-ones vector,
which every parametrisation of the simplex (softmax, smoothing) annihilates: differentiate
through the logits, not through unnormalised probabilities.

Random generators: every sampler takes ``generator`` as ``None`` (torch's default), one
``torch.Generator`` (one draw for the whole batch), or a sequence of B generators (one per
row): per-row generators make a row's draw independent of the rest of the batch, so a batched
call equals per-scene calls made with the same per-scene generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def uniform(
    shape: Sequence[int], generator: Generators, *, dtype=torch.float32, device=None
) -> Tensor:
    """Uniform noise of ``shape`` (B, ...) in [0, 1) from ``generator`` (one or one per row)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
    return torch.stack(
        [torch.rand(tuple(shape[1:]), generator=g, dtype=dtype, device=device) for g in generator]
    )


def gumbel(
    shape: Sequence[int], generator: Generators, *, dtype=torch.float32, device=None
) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u))``, finite: u is clamped away from 0.

    With u in [tiny, 1 - 2**-24] the noise lies in about [-4.5, 16.6] (float32).
    """
    u = uniform(shape, generator, dtype=dtype, device=device)
    u = u.clamp_min(torch.finfo(u.dtype).tiny)
    return -torch.log(-torch.log(u))


def _finite_log(probs: Tensor) -> Tensor:
    """log of non-negative ``probs`` with log(0) -> the most negative finite float.

    Any positive probability (even subnormal, log >= -104) then stays far above a zero one,
    and ``key + gumbel`` never overflows to -inf.
    """
    return torch.log(probs).nan_to_num(neginf=torch.finfo(probs.dtype).min)


def _check_n(probs: Tensor, n: int) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (B, P), got {tuple(probs.shape)}")
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")


def sample_with_replacement(probs: Tensor, n: int, generator: Generators = None) -> Tensor:
    """n independent draws per row from ``probs`` (B, P) (non-negative, need not sum to 1).

    Inverse-CDF sampling on one uniform per draw, so the noise consumed is (B, n) whatever P.
    A zero-probability position is never returned when the row has a positive one.

    Returns:
        (B, n) int64 positions.
    """
    _check_n(probs, n)
    p = probs.detach()
    cdf = torch.cumsum(p, dim=1)
    u = uniform((p.shape[0], n), generator, dtype=p.dtype, device=p.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u * total can round up to total; never step past the last positive position.
    last_positive = p.shape[1] - 1 - torch.argmax(torch.flip(p > 0, dims=[1]).to(torch.int8), dim=1)
    return torch.minimum(idx, last_positive[:, None])


def sample_with_replacement_from_logits(
    logits: Tensor, n: int, generator: Generators = None
) -> Tensor:
    """``sample_with_replacement`` from (B, P) logits (``-inf`` masks a position)."""
    return sample_with_replacement(torch.softmax(logits.detach(), dim=1), n, generator)


def _gumbel_top_k(log_weights: Tensor, n: int, generator: Generators) -> Tensor:
    if n > log_weights.shape[1]:
        raise ValueError(
            f"cannot draw {n} positions without replacement from {log_weights.shape[1]}"
        )
    keys = log_weights + gumbel(
        log_weights.shape, generator, dtype=log_weights.dtype, device=log_weights.device
    )
    return torch.topk(keys, n, dim=1, sorted=True).indices


def sample_without_replacement(
    probs: Tensor, n: int, generator: Generators = None, *, logits: bool = False
) -> Tensor:
    """n distinct positions per row by Gumbel-top-k, **in draw order**.

    Taking the n largest of ``log p_i + Gumbel_i`` in decreasing order gives exactly the
    ordered sample of n sequential draws without replacement, each from ``p`` renormalised
    over the positions not yet drawn (Kool et al., 2019). The order matters to
    ``expect_without_replacement``.

    Args:
        probs: (B, P) non-negative probabilities (or logits with ``logits=True``).
        n: draws per row, at most P. Zero-probability positions come last, so they are
            returned only when a row has fewer than n positive ones.
        generator: see the module docstring.

    Returns:
        (B, n) int64 positions, no repeats within a row.
    """
    _check_n(probs, n)
    x = probs.detach()
    log_w = x.nan_to_num(neginf=torch.finfo(x.dtype).min) if logits else _finite_log(x)
    return _gumbel_top_k(log_w, n, generator)


def sample_without_replacement_from_logits(
    logits: Tensor, n: int, generator: Generators = None
) -> Tensor:
    """``sample_without_replacement`` from (B, P) logits (``-inf`` masks a position)."""
    return sample_without_replacement(logits, n, generator, logits=True)


def topk_indices(probs: Tensor, n: int) -> Tensor:
    """Deterministic inference-time choice: the n most probable positions, (B, n) int64,
    in decreasing probability (the draw order that ``expect_without_replacement`` expects)."""
    _check_n(probs, n)
    return torch.topk(probs.detach(), n, dim=1, sorted=True).indices


def spread_topk_indices(probs: Tensor, grid: tuple[int, int], n: int, radius: int = 1) -> Tensor:
    """Deterministic inference-time choice that spreads over the map: n positions of flat
    (B, P) ``probs`` on a ``grid`` (gh, gw) (P = gh * gw, row-major), taken greedily in
    decreasing probability, each suppressing the positions within ``radius`` cells of it
    (Chebyshev distance) from later picks; once every position left is suppressed, the
    most probable of those come next. Returns (B, n) int64, no position twice.

    Top-n piles its picks on the few neighbouring cells of one strong object when patches
    are wider than a cell; this picks n distinct places first (non-maximum suppression).
    """
    _check_n(probs, n)
    gh, gw = grid
    if gh * gw != probs.shape[1]:
        raise ValueError(f"grid {grid} has {gh * gw} cells, probs has {probs.shape[1]}")
    b = probs.shape[0]
    score = probs.detach().to(torch.float64).clone()
    ys, xs = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)  # (P,)
    rows = torch.arange(b)
    picks = []
    for _ in range(n):
        best = score.argmax(1)  # (B,)
        picks.append(best)
        near = ((ys[None] - ys[best][:, None]).abs() <= radius) & (
            (xs[None] - xs[best][:, None]).abs() <= radius)  # (B, P)
        # suppressed cells drop below every free cell (probs <= 1) but keep their order
        score = torch.where(near & (score >= 0), score - 2.0, score)
        score[rows, best] = -math.inf
    return torch.stack(picks, 1)


# --------------------------------------------------------------------------------------------
# The estimator core: value sum_q w_q f_q, score-function gradient w_q (g.f_q) / p_q
# --------------------------------------------------------------------------------------------


class _ScoreWeighted(torch.autograd.Function):
    """Phi = sum_q w_q f_q with dPhi/df_q = w_q and dPhi/dp_q = w_q (g . f_q) / p_q.

    ``weights`` are constants (no gradient): the derivative of the estimator's explicit
    dependence on the attention is folded into the p-gradient (see the module docstring).
    A draw with w_q = 0 or p_q = 0 contributes no p-gradient (0/0 is read as 0).
    """

    @staticmethod
    def forward(ctx, p_sel: Tensor, weights: Tensor, features: Tensor) -> Tensor:
        ctx.save_for_backward(p_sel, weights, features)
        w = weights.reshape(*weights.shape, *([1] * (features.ndim - 2)))
        return (w * features).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        p_sel, weights, features = ctx.saved_tensors
        extra = [1] * (features.ndim - 2)
        w = weights.reshape(*weights.shape, *extra)
        g = grad_out.unsqueeze(1)
        grad_features = w * g if ctx.needs_input_grad[2] else None
        grad_p = None
        if ctx.needs_input_grad[0]:
            h = (g * features).flatten(2).sum(-1)  # (B, n): g . f_q
            live = (weights != 0) & (p_sel > 0)
            grad_p = torch.where(live, weights * h / torch.where(live, p_sel, 1.0), 0.0)
        return grad_p, None, grad_features


def expect_weighted(p_sel: Tensor, weights: Tensor, features: Tensor) -> Tensor:
    """Core of every estimator: ``sum_q w_q f_q`` with the score-function gradient.

    Args:
        p_sel: (B, n) probability of each draw under the distribution it was drawn from
            (gathered from the attention, so its gradient reaches the attention; for nested
            draws the joint probability alpha * beta).
        weights: (B, n) estimator weights (treated as constants).
        features: (B, n, D...) feature of each draw.

    Returns:
        (B, D...) estimate; gradients ``w_q`` to ``f_q`` and ``w_q (g . f_q) / p_q`` to ``p_q``.
    """
    return _ScoreWeighted.apply(p_sel, weights.detach(), features)


def _check_draws(probs: Tensor, idx: Tensor, features: Tensor) -> None:
    if probs.ndim != 2 or idx.ndim != 2 or features.ndim < 3:
        raise ValueError(
            f"expected probs (B, P), idx (B, n), features (B, n, D); got {tuple(probs.shape)}, "
            f"{tuple(idx.shape)}, {tuple(features.shape)}"
        )
    if idx.shape[0] != probs.shape[0] or features.shape[:2] != idx.shape:
        raise ValueError(
            f"shapes disagree: probs {tuple(probs.shape)}, idx {tuple(idx.shape)}, "
            f"features {tuple(features.shape)}"
        )


# --------------------------------------------------------------------------------------------
# With replacement
# --------------------------------------------------------------------------------------------


def importance_ratio(a_sel: Tensor, q_sel: Tensor | None) -> Tensor | None:
    """(B, n) ``a / q`` at the draws, detached (0 where q = 0); None when ``q_sel`` is None.

    Args:
        a_sel: (B, n) probability of each draw under the attention ``a`` it is used for.
        q_sel: (B, n) its probability under the proposal ``q`` it was drawn from, or None.

    Off-policy draws: why they stay unbiased (written once, here; every estimator's
    ``proposal=`` argument and the training loop's read ahead rely on it). The draws come from
    a proposal q (for instance the attention of the weights before an optimiser step,
    ``models.protocol.Proposal``) and are used for the attention a (after the step), with q
    fixed before a is known and q > 0 wherever a > 0:

    - with replacement (``expect_with_replacement``), n independent draws from q weigh
      ``w = (1/n) a / q``: ``E_q[(a_i / q_i) f_i] = sum_i a_i f_i`` (importance sampling);
    - without replacement (``expect_without_replacement``), the sequence drawn from q in draw
      order weighs ``w_k = [(n-1-k) a_k + (1 - Q_k) a_k / q_k] / n``, ``Q_k = sum_{j<k} q_j``
      the q-mass of the earlier draws: given them, draw k comes from q renormalised over the
      rest, so ``(1 - Q_k)(a_k / q_k) f_k`` is unbiased for the rest's share
      ``sum_{i not drawn} a_i f_i`` and ``F_k = sum_{j<k} a_j f_j + (1 - Q_k)(a_k / q_k) f_k``
      for ``sum_i a_i f_i``; ``Phi = (1/n) sum_k F_k = sum_k w_k f_k``.

    Both are unbiased for ``sum_i a_i f_i`` for every a, so also their derivatives: the draws
    do not depend on a, so the plain derivative of ``Phi`` is an unbiased gradient, ``w_q`` to
    f_q and ``w_q (g . f_q) / a_q`` to a_q, the score-weighted form of ``expect_weighted``. For
    q = a they are the usual on-policy estimators exactly (ratio 1, ``Q_k = S_k``). A proposal
    holds no autograd graph, so a gradient never reaches the weights it was drawn with.
    ``tests/models/test_estimators.py`` checks value and gradient by exact enumeration."""
    if q_sel is None:
        return None
    a, q = a_sel.detach(), q_sel.detach()
    return torch.where(q > 0, a / torch.where(q > 0, q, 1.0), 0.0)


def with_replacement_weights(
    idx: Tensor, dtype=torch.float32, ratio: Tensor | None = None
) -> Tensor:
    """(B, n) weights 1/n of the with-replacement estimator (times ``ratio`` = a/q if given)."""
    w = torch.full(idx.shape, 1.0 / idx.shape[1], dtype=dtype, device=idx.device)
    return w if ratio is None else w * ratio


def expect_with_replacement(
    probs: Tensor, idx: Tensor, features: Tensor, proposal: Tensor | None = None
) -> Tensor:
    """Unbiased ``E_a[f]`` from n draws with replacement: ``Phi = (1/n) sum_q f_q``.

    Gradient: exact 1/n per feature; to the attention, the score-function term
    ``(1/n) (g . f_q) / a_{i_q}`` per draw (as the reference ATS code). Unbiased because
    ``E[(1/n) sum_q f_q d log a_{i_q}] = sum_i f_i da_i``; the cross terms
    ``f_q d log a_{i_r}`` (q != r) have zero mean since draws are independent, so they are left out.

    Off-policy draws (``proposal`` given): ``Phi = (1/n) sum_q (a_q / q_q) f_q``; why it is
    unbiased: ``importance_ratio``.

    Args:
        probs: (B, P) attention, rows summing to 1.
        idx: (B, n) positions drawn with ``sample_with_replacement`` (from ``proposal`` if given).
        features: (B, n, D) feature of each draw.
        proposal: (B, P) the distribution q the draws came from when it is not ``probs``
            (treated as a constant; see ``importance_ratio``), or None.

    Returns:
        (B, D).
    """
    _check_draws(probs, idx, features)
    p_sel = probs.gather(1, idx)
    ratio = importance_ratio(p_sel, None if proposal is None else proposal.gather(1, idx))
    return expect_weighted(p_sel, with_replacement_weights(idx, probs.dtype, ratio), features)


# --------------------------------------------------------------------------------------------
# Without replacement (sequential Gumbel-top-k estimator of ATS)
# --------------------------------------------------------------------------------------------


def _sequential_weights(
    a_sel: Tensor,
    prior_mass: Tensor,
    k: Tensor,
    m: Tensor,
    scale: Tensor,
    ratio: Tensor | None = None,
) -> Tensor:
    """``scale * [(m - 1 - k) a + (1 - S) r] / m`` for draws with k < m, else 0.

    a_sel: probability of the draw, prior_mass S: probability of the earlier draws of the same
    sequence (exclusive) under the distribution they were drawn from, k: position in the
    sequence, m: sequence length, scale: its share, ratio r: a / q for off-policy draws (1).
    """
    a = a_sel.detach()
    rest = (1 - prior_mass).clamp_min(0)
    if ratio is not None:
        rest = rest * ratio
    w = ((m - 1 - k) * a + rest) / m.clamp_min(1)
    return torch.where(k < m, scale * w, torch.zeros_like(w))


def without_replacement_weights(
    a_sel: Tensor, *, exclusive: bool = True, q_sel: Tensor | None = None
) -> Tensor:
    """(B, n) weights of the sequential estimator from the drawn probabilities in draw order.

    ``w_k = [(n - 1 - k) a_k + (1 - S_k)] / n`` with ``S_k = sum_{j<k} a_j`` (exclusive
    cumulative sum, k from 0). With ``q_sel``, the draws' probabilities under the proposal
    they came from: ``w_k = [(n - 1 - k) a_k + (1 - Q_k) a_k / q_k] / n``, ``Q_k = sum_{j<k} q_j``
    (why: ``importance_ratio``). ``exclusive=False`` uses the inclusive sum of the
    public ports' backward pass; it exists only so that a test can show the gradient check
    catches it.
    """
    a = a_sel.detach()
    drawn_from = a if q_sel is None else q_sel.detach()
    n = a.shape[1]
    prior = torch.cumsum(drawn_from, dim=1)
    if exclusive:
        prior = prior - drawn_from
    k = torch.arange(n, device=a.device, dtype=a.dtype).expand_as(a)
    m = torch.full_like(a, float(n))
    return _sequential_weights(a, prior, k, m, torch.ones_like(a), importance_ratio(a, q_sel))


def expect_without_replacement(
    probs: Tensor, idx: Tensor, features: Tensor, proposal: Tensor | None = None
) -> Tensor:
    """Unbiased ``E_a[f]`` from n draws without replacement, in draw order (ATS).

    Value: ``F_k = sum_{j<k} a_j f_j + (1 - sum_{j<k} a_j) f_k`` and ``Phi = (1/n) sum_k F_k``
    (sums over earlier draws: an **exclusive** cumulative sum), i.e. ``Phi = sum_k w_k f_k``
    with ``w_k`` from ``without_replacement_weights``. Each ``F_k`` is unbiased because, given
    the earlier draws, ``k`` is drawn from ``a`` renormalised over the rest.

    Gradient to the attention. The ordered sample has probability
    ``prod_k a_k / (1 - S_k)``. For each ``F_k`` only the first k+1 draws matter, and
    ``E[F_k | draws before k] = E_a[f]`` is constant, so the score of the earlier draws
    drops out; subtracting the baseline ``sum_{j<k} a_j f_j`` (known given the earlier draws)
    leaves the unbiased term ``d F_k + (1 - S_k) f_k d log(a_k / (1 - S_k))``. Its
    a-derivatives are ``f_j`` at each earlier draw j and ``(1 - S_k) f_k / a_k`` at draw k.
    Summed over k and divided by n, draw k receives ``[(n-1-k) + (1 - S_k)/a_k] f_k / n =
    w_k f_k / a_k``: the score-weighted form of ``expect_weighted``. (The identity holds up to
    the all-ones direction, which the softmax removes.)

    Off-policy draws (``proposal`` given): weights from ``without_replacement_weights(a_sel,
    q_sel=...)``; why they are unbiased: ``importance_ratio``.

    Args:
        probs: (B, P) attention, rows summing to 1.
        idx: (B, n) distinct positions in draw order (``sample_without_replacement`` or, at
            inference, ``topk_indices``), drawn from ``proposal`` if given.
        features: (B, n, D) feature of each draw.
        proposal: (B, P) the distribution q the sequence was drawn from when it is not
            ``probs`` (treated as a constant; see ``importance_ratio``), or None.

    Returns:
        (B, D).
    """
    _check_draws(probs, idx, features)
    a_sel = probs.gather(1, idx)
    q_sel = None if proposal is None else proposal.gather(1, idx)
    return expect_weighted(a_sel, without_replacement_weights(a_sel, q_sel=q_sel), features)


# --------------------------------------------------------------------------------------------
# Nested two-stage estimator (Zoom-In)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NestedPlan:
    """Bookkeeping of stage-I draws ``tile_idx`` (B, n) made with replacement.

    Per draw q (B, n), int64:
        rank: position of q among the draws of the same tile, counted left to right; draw q
            takes the sub-tile at this position of its tile's stage-II draw order.
        count: how many stage-I draws hit q's tile (= stage-II sample size of the tile).
        slot: index of q's tile in the distinct-tile table below.
    Per distinct tile, in order of first appearance, padded to M = max distinct tiles over
    the batch (B, M):
        tiles: tile position (padding repeats the row's first tile).
        counts: draws of the tile (0 on padding).
        first_draw: the first draw q of the tile (padding: 0).
        valid: bool, False on padding.
    """

    rank: Tensor
    count: Tensor
    slot: Tensor
    tiles: Tensor
    counts: Tensor
    first_draw: Tensor
    valid: Tensor


def nested_plan(tile_idx: Tensor) -> NestedPlan:
    """Group stage-I draws (B, n) by tile: ranks, counts and the distinct-tile table."""
    if tile_idx.ndim != 2:
        raise ValueError(f"tile_idx must be (B, n), got {tuple(tile_idx.shape)}")
    b, n = tile_idx.shape
    same = tile_idx[:, :, None] == tile_idx[:, None, :]  # (B, q, q')
    earlier = torch.ones(n, n, dtype=torch.bool, device=tile_idx.device).tril(-1)
    rank = (same & earlier).sum(-1)
    count = same.sum(-1)
    is_first = rank == 0
    first_of = torch.argmax(same.to(torch.int8), dim=-1)  # first q' with the same tile
    slot_of_first = torch.cumsum(is_first.to(torch.int64), dim=1) - 1
    slot = slot_of_first.gather(1, first_of)
    m = int(is_first.sum(1).max())
    valid = torch.arange(m, device=tile_idx.device)[None, :] < is_first.sum(1, keepdim=True)
    q = torch.arange(n, device=tile_idx.device).expand(b, n)
    target = torch.where(is_first, slot, m)  # non-first draws go to a dump column
    dump = torch.zeros(b, m + 1, dtype=torch.int64, device=tile_idx.device)
    first_draw = dump.scatter(1, target, q)[:, :m]
    tiles = torch.where(valid, tile_idx.gather(1, first_draw), tile_idx[:, :1])
    counts = torch.where(valid, count.gather(1, first_draw), 0)
    return NestedPlan(rank, count, slot, tiles, counts, first_draw, valid)


def per_draw(x: Tensor, plan: NestedPlan) -> Tensor:
    """Expand a per-distinct-tile tensor (B, M, ...) to per-draw (B, n, ...) via ``plan.slot``."""
    index = plan.slot.reshape(*plan.slot.shape, *([1] * (x.ndim - 2))).expand(
        *plan.slot.shape, *x.shape[2:]
    )
    return x.gather(1, index)


def sample_subtiles(
    beta: Tensor, plan: NestedPlan, generator: Generators = None, *, deterministic: bool = False
) -> Tensor:
    """Stage II: for each distinct tile, ``counts`` sub-tiles without replacement from its beta.

    Args:
        beta: (B, M, P2) sub-tile attention of each distinct tile (``plan.tiles`` order).
        plan: from ``nested_plan``.
        generator: see the module docstring (noise (B, M, P2)).
        deterministic: take each tile's most probable sub-tiles (inference) instead.

    Returns:
        (B, n) sub-tile position of each stage-I draw: draw q gets position ``plan.rank[q]``
        of its tile's draw order. A tile drawn more than P2 times has only P2 sub-tiles: its
        extra draws repeat one (``rank mod P2``) and get weight 0 in ``expect_nested``.
    """
    b, m, p2 = beta.shape
    if (b, m) != tuple(plan.tiles.shape):
        raise ValueError(f"beta {tuple(beta.shape)} does not match {tuple(plan.tiles.shape)} tiles")
    k = min(int(plan.count.max()), p2)
    flat = beta.reshape(b * m, p2)
    if deterministic:
        order = topk_indices(flat, k)
    else:
        # one generator per scene stays per scene: repeat it for the scene's M rows
        gens = generator
        if gens is not None and not isinstance(gens, torch.Generator):
            gens = [g for g in gens for _ in range(m)]
        order = sample_without_replacement(flat, k, gens)
    order = order.reshape(b, m, k)
    pos = (plan.rank % k)[..., None]
    return per_draw(order, plan).gather(2, pos).squeeze(2)


def nested_weights(beta_sel: Tensor, plan: NestedPlan, p2: int) -> Tensor:
    """(B, n) weights of the nested estimator from the drawn sub-tile probabilities.

    Draw q of a tile drawn c times at stage I, at position k in the tile's stage-II order:
    ``w_q = (c / n) * [(m - 1 - k) b_q + (1 - S_q)] / m`` with ``m = min(c, p2)`` stage-II
    draws (p2: sub-tiles per tile) and ``S_q`` the beta of the tile's earlier draws
    (exclusive). With ``m = c`` this is ``[(c - 1 - k) b_q + (1 - S_q)] / n``. Draws with
    k >= m weigh 0.
    """
    b = beta_sel.detach()
    n = b.shape[1]
    same = plan.slot[:, :, None] == plan.slot[:, None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=b.device).tril(-1)
    prior = ((same & earlier).to(b.dtype) * b[:, None, :]).sum(-1)
    c = plan.count.to(b.dtype)
    m = c.clamp_max(p2)
    return _sequential_weights(b, prior, plan.rank.to(b.dtype), m, c / n)


def expect_nested(
    alpha: Tensor,
    tile_idx: Tensor,
    beta: Tensor,
    sub_idx: Tensor,
    features: Tensor,
    plan: NestedPlan | None = None,
) -> Tensor:
    """Unbiased ``sum_t alpha_t sum_s beta_ts f_ts`` from two-stage draws (Zoom-In).

    Layout (one entry per stage-I draw q = 0..n-1):
        alpha: (B, P1) tile attention, rows summing to 1.
        tile_idx: (B, n) stage-I tiles drawn **with** replacement (``sample_with_replacement``).
        beta: (B, n, P2) sub-tile attention of draw q's tile (rows of draws of the same tile
            are equal; build it with ``per_draw(beta_distinct, plan)``), rows summing to 1.
        sub_idx: (B, n) sub-tile of draw q (``sample_subtiles``): the draws of a tile, read
            left to right, are its stage-II draws without replacement in draw order.
        features: (B, n, D) feature of the sub-tile of draw q.

    Value: ``Phi = sum_t (c_t / n) Psi_t`` with ``Psi_t`` the without-replacement estimator of
    ``expect_without_replacement`` over tile t's ``c_t`` sub-tiles; unbiased because
    ``E[Psi_t | c] = mu_t`` and ``E[c_t / n] = alpha_t``.

    Gradient: features get their weight; beta, given the counts, gets ATS's term
    ``w_q (g . f_q) / b_q``; alpha gets the score of the stage-I draws restricted to each
    draw's own tile, ``sum_{q in t} w_q (g . f_q) / alpha_t = (c_t/n)(g . Psi_t)/alpha_t``,
    unbiased because ``E[(c_t/n) Psi_t] = alpha_t mu_t``. Both are the score-weighted form
    of ``expect_weighted`` applied to the joint probability ``alpha_t * beta_ts``.

    Returns:
        (B, D).
    """
    if plan is None:
        plan = nested_plan(tile_idx)
    if beta.ndim != 3 or beta.shape[:2] != tile_idx.shape or sub_idx.shape != tile_idx.shape:
        raise ValueError(
            f"expected beta (B, n, P2) and sub_idx (B, n) for tile_idx {tuple(tile_idx.shape)}; "
            f"got {tuple(beta.shape)}, {tuple(sub_idx.shape)}"
        )
    _check_draws(alpha, tile_idx, features)
    alpha_sel = alpha.gather(1, tile_idx)
    beta_sel = beta.gather(2, sub_idx[..., None]).squeeze(2)
    weights = nested_weights(beta_sel, plan, beta.shape[2])
    return expect_weighted(alpha_sel * beta_sel, weights, features)
