"""Estimators of models.sampling against the exhaustive expectation and its autograd gradient.

For each small problem (P positions, n draws, D = 2 features) we draw R independent samples
in one vectorised batch, each row with its own copy of the logits and the feature table, so
that the per-row gradients give both the mean gradient and its standard error. Tolerance:
every component of the mean (value, d/dlogits, d/dfeatures) lies within 5 standard errors
of the exact value (autograd of ``sum_i a_i f_i``), and the standard errors themselves are
small (< 0.02), so the check is tight. Float64 throughout.
"""

import itertools

import pytest
import torch

from models.sampling import (
    expect_nested,
    expect_with_replacement,
    expect_without_replacement,
    nested_plan,
    nested_weights,
    per_draw,
    sample_subtiles,
    sample_with_replacement,
    sample_without_replacement,
    topk_indices,
    without_replacement_weights,
)

SE_TOL = 5.0
MAX_SE = 0.02
DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within_se(per_row: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """Mean over rows of ``per_row`` (R, ...) equals ``exact`` within SE_TOL standard errors."""
    mean = per_row.mean(0)
    se = per_row.std(0) / per_row.shape[0] ** 0.5
    assert se.max() < MAX_SE, f"{what}: standard error {se.max():.3g} too large for a tight check"
    z = (mean - exact).abs() / (se + 1e-9)
    assert z.max() < SE_TOL, (
        f"{what}: mean {mean.tolist()} vs exact {exact.tolist()} (max z {z.max():.2f})"
    )


def not_within_se(per_row: torch.Tensor, exact: torch.Tensor) -> bool:
    se = per_row.std(0) / per_row.shape[0] ** 0.5
    return bool(((per_row.mean(0) - exact).abs() / (se + 1e-9)).max() > 4 * SE_TOL)


def problem(p: int, d: int, seed: int):
    g = gen(seed)
    logits = torch.randn(p, generator=g, dtype=DT)
    table = torch.randn(p, d, generator=g, dtype=DT)
    upstream = torch.randn(d, generator=g, dtype=DT)
    return logits, table, upstream


def exhaustive(logits, table, upstream):
    """Exact value sum_i a_i f_i and the gradients of upstream . value."""
    lg = logits.clone().requires_grad_()
    tb = table.clone().requires_grad_()
    value = torch.softmax(lg, 0) @ tb
    grad_l, grad_t = torch.autograd.grad(value @ upstream, [lg, tb])
    return value.detach(), grad_l, grad_t


def run_single_stage(estimator, sampler, logits, table, upstream, n, rows, seed):
    """Per-row value (R, D), d/dlogits (R, P), d/dtable (R, P, D) of the estimator."""
    lg = logits.expand(rows, -1).clone().requires_grad_()
    tb = table.expand(rows, -1, -1).clone().requires_grad_()
    probs = torch.softmax(lg, 1)
    idx = sampler(probs.detach(), n, gen(seed))
    feats = tb.gather(1, idx[..., None].expand(-1, -1, table.shape[1]))
    value = estimator(probs, idx, feats)
    (value @ upstream).sum().backward()
    return value.detach(), lg.grad, tb.grad


CASES = [(3, 2), (4, 2), (5, 3), (6, 3), (6, 2)]
ESTIMATORS = {
    "with": (expect_with_replacement, sample_with_replacement),
    "without": (expect_without_replacement, sample_without_replacement),
}


@pytest.mark.parametrize("kind", list(ESTIMATORS))
@pytest.mark.parametrize("p,n", CASES)
def test_single_stage_estimator_is_unbiased_in_value_and_gradients(kind, p, n):
    estimator, sampler = ESTIMATORS[kind]
    logits, table, upstream = problem(p, 2, seed=10 * p + n)
    exact_v, exact_gl, exact_gt = exhaustive(logits, table, upstream)
    v, gl, gt = run_single_stage(estimator, sampler, logits, table, upstream, n, 40_000, seed=p)
    within_se(v, exact_v, f"{kind} value")
    within_se(gl, exact_gl, f"{kind} d/dlogits")
    within_se(gt, exact_gt, f"{kind} d/dfeatures")


# ------------------------------------------------------------------------------------------
# Off-policy draws: drawn from a proposal q (e.g. the weights before an optimiser step),
# used for the attention a
# ------------------------------------------------------------------------------------------


def sequences(p: int, n: int, replace: bool):
    """Every ordered sample of n of range(p), with its probability factors' rule."""
    return itertools.product(range(p), repeat=n) if replace else itertools.permutations(range(p), n)


def sequence_probability(q: torch.Tensor, seq, replace: bool) -> float:
    """Probability of the ordered sample ``seq`` under sequential draws from ``q`` (P,)."""
    prob, used = 1.0, 0.0
    for i in seq:
        prob *= float(q[i]) / (1.0 if replace else 1.0 - used)
        used += float(q[i])
    return prob


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("p,n", [(3, 2), (4, 2), (4, 3), (5, 3)])
def test_off_policy_estimators_are_exact_in_expectation_by_enumeration(replace, p, n):
    """Summing over every ordered sample drawn from q != a, weighted by its probability under
    q, gives sum_i a_i f_i and its exact gradients (to float64 rounding)."""
    logits, table, upstream = problem(p, 2, seed=100 + 10 * p + n)
    proposal = torch.softmax(torch.randn(p, generator=gen(p + n), dtype=DT), 0)
    exact_v, exact_gl, exact_gt = exhaustive(logits, table, upstream)
    estimator = expect_with_replacement if replace else expect_without_replacement
    mean_v, mean_gl, mean_gt, total = 0.0, 0.0, 0.0, 0.0
    for seq in sequences(p, n, replace):
        prob = sequence_probability(proposal, seq, replace)
        lg = logits[None].clone().requires_grad_()
        tb = table.clone().requires_grad_()
        idx = torch.tensor([seq])
        value = estimator(torch.softmax(lg, 1), idx, tb[idx], proposal=proposal[None])
        gl, gt = torch.autograd.grad((value @ upstream).sum(), [lg, tb])
        mean_v, mean_gl, mean_gt = mean_v + prob * value[0], mean_gl + prob * gl[0], mean_gt + prob * gt
        total += prob
    assert abs(total - 1.0) < 1e-12
    assert torch.allclose(mean_v, exact_v, atol=1e-12)
    assert torch.allclose(mean_gl, exact_gl, atol=1e-12)
    assert torch.allclose(mean_gt, exact_gt, atol=1e-12)


@pytest.mark.parametrize("replace", [True, False])
def test_off_policy_estimator_with_proposal_equal_to_attention_is_the_on_policy_one(replace):
    logits, table, _ = problem(6, 2, seed=3)
    probs = torch.softmax(logits, 0).expand(50, -1)
    sampler = sample_with_replacement if replace else sample_without_replacement
    idx = sampler(probs, 3, gen(4))
    feats = table[idx]
    estimator = expect_with_replacement if replace else expect_without_replacement
    on = estimator(probs, idx, feats)
    assert torch.equal(estimator(probs, idx, feats, proposal=probs.clone()), on)


def test_on_policy_estimator_on_off_policy_draws_is_biased():
    """The check above can fail: treating draws from q as draws from a is caught."""
    logits, table, upstream = problem(4, 2, seed=5)
    proposal = torch.softmax(torch.tensor([2.0, -1.0, 0.0, 1.0], dtype=DT), 0)
    exact_v, _, _ = exhaustive(logits, table, upstream)
    mean_v = 0.0
    for seq in sequences(4, 2, replace=False):
        idx = torch.tensor([seq])
        value = expect_without_replacement(torch.softmax(logits[None], 1), idx, table[idx])
        mean_v = mean_v + sequence_probability(proposal, seq, False) * value[0]
    assert (mean_v - exact_v).abs().max() > 0.05


def test_off_policy_weights_table():
    """w_k = [(n-1-k) a_k + (1 - Q_k) a_k / q_k] / n on a hand-computed case."""
    a = torch.tensor([[0.5, 0.3, 0.2]], dtype=DT)
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=DT)
    expected = torch.tensor(
        [[(2 * 0.5 + 1.25) / 3, (0.3 + 0.6 * 0.75) / 3, (0 + 0.2 * 1.0) / 3]], dtype=DT
    )
    assert torch.allclose(without_replacement_weights(a, q_sel=q), expected)


def test_without_replacement_weights_table():
    """w_k = [(n-1-k) a_k + 1 - sum_{j<k} a_j] / n on a hand-computed case."""
    a = torch.tensor([[0.5, 0.3, 0.2]], dtype=DT)
    expected = torch.tensor([[(2 * 0.5 + 1) / 3, (0.3 + 0.5) / 3, (0 + 0.2) / 3]], dtype=DT)
    assert torch.allclose(without_replacement_weights(a), expected)


class _InclusivePort(torch.autograd.Function):
    """The public ports' estimator: correct forward, backward with the inclusive cumsum."""

    @staticmethod
    def forward(ctx, a_sel, features):
        ctx.save_for_backward(a_sel, features)
        return (without_replacement_weights(a_sel)[..., None] * features).sum(1)

    @staticmethod
    def backward(ctx, grad):
        a_sel, features = ctx.saved_tensors
        w_ex = without_replacement_weights(a_sel)
        w_in = without_replacement_weights(a_sel, exclusive=False)
        h = (grad[:, None, :] * features).sum(-1)
        return w_ex * h / a_sel, w_in[..., None] * grad[:, None, :]


def test_inclusive_cumsum_port_fails_the_feature_gradient_check():
    logits, table, upstream = problem(5, 2, seed=7)
    exact_v, _, exact_gt = exhaustive(logits, table, upstream)

    def port(probs, idx, feats):
        return _InclusivePort.apply(probs.gather(1, idx), feats)

    v, _, gt = run_single_stage(
        port, sample_without_replacement, logits, table, upstream, 3, 40_000, seed=1
    )
    within_se(v, exact_v, "port value")  # the forward value is unchanged...
    assert not_within_se(gt, exact_gt)  # ...but the feature gradient is off by -a_k / n
    with pytest.raises(AssertionError, match="d/dfeatures"):
        within_se(gt, exact_gt, "port d/dfeatures")


def test_without_score_term_fails_the_attention_gradient_check():
    """Dropping the score-function term (weights as constants only) is caught."""
    logits, table, upstream = problem(4, 2, seed=8)
    _, exact_gl, _ = exhaustive(logits, table, upstream)

    def no_score(probs, idx, feats):
        a_sel = probs.gather(1, idx)
        w = (a_sel / a_sel.detach()) * 0 + without_replacement_weights(a_sel)
        return (w[..., None] * feats).sum(1)

    _, gl, _ = run_single_stage(
        no_score, sample_without_replacement, logits, table, upstream, 2, 40_000, seed=2
    )
    assert not_within_se(gl, exact_gl)


def test_estimators_are_exact_in_degenerate_cases_and_finite_at_zero_probability():
    table = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=DT)
    # weights sum to 1 for any draw: a constant feature is estimated exactly
    probs = torch.tensor([[0.2, 0.5, 0.3]], dtype=DT)
    for idx in ([[0, 1, 2]], [[2, 0, 1]], [[1, 2]]):
        idx = torch.tensor(idx)
        const = torch.full((1, idx.shape[1], 2), 3.5, dtype=DT)
        assert torch.allclose(expect_without_replacement(probs, idx, const), const[:, 0])
    # a one-hot attention: value is the certain feature, gradients finite
    lg = torch.tensor([[0.0, -torch.inf, -torch.inf]], dtype=DT, requires_grad=True)
    probs = torch.softmax(lg, 1)
    feats = table[None].clone().requires_grad_()
    idx = torch.tensor([[0, 2]])  # the second draw has probability 0
    v = expect_without_replacement(probs, idx, feats[:, [0, 2]])
    assert torch.allclose(v, table[0:1])
    v.sum().backward()
    assert torch.isfinite(lg.grad).all() and torch.isfinite(feats.grad).all()
    assert feats.grad[0, 2].abs().sum() == 0  # a zero-probability draw weighs nothing


def test_topk_draws_feed_the_without_replacement_estimator():
    probs = torch.tensor([[0.1, 0.6, 0.3]], dtype=DT)
    table = torch.tensor([[[1.0], [2.0], [4.0]]], dtype=DT)
    idx = topk_indices(probs, 2)  # [1, 2]
    v = expect_without_replacement(probs, idx, table[:, idx[0]])
    # F_0 = f_1 = 2; F_1 = 0.6*2 + 0.4*4 = 2.8; mean 2.4
    assert torch.allclose(v, torch.tensor([[2.4]], dtype=DT))


# ------------------------------------------------------------------------------------------
# Nested (Zoom-In)
# ------------------------------------------------------------------------------------------


def test_nested_plan_table():
    tiles = torch.tensor([[4, 1, 4, 4, 2], [3, 3, 3, 3, 3]])
    plan = nested_plan(tiles)
    assert plan.rank.tolist() == [[0, 0, 1, 2, 0], [0, 1, 2, 3, 4]]
    assert plan.count.tolist() == [[3, 1, 3, 3, 1], [5, 5, 5, 5, 5]]
    assert plan.slot.tolist() == [[0, 1, 0, 0, 2], [0, 0, 0, 0, 0]]
    assert plan.tiles.tolist() == [[4, 1, 2], [3, 3, 3]]
    assert plan.counts.tolist() == [[3, 1, 1], [5, 0, 0]]
    assert plan.first_draw.tolist() == [[0, 1, 4], [0, 0, 0]]
    assert plan.valid.tolist() == [[True, True, True], [True, False, False]]
    x = torch.tensor([[10, 11, 12], [20, 21, 22]])
    assert per_draw(x, plan).tolist() == [[10, 11, 10, 10, 12], [20] * 5]


def test_sample_subtiles_follow_each_tiles_draw_order():
    tiles = torch.tensor([[0, 1, 0, 0]] * 500)
    plan = nested_plan(tiles)
    beta = torch.softmax(torch.randn(500, 2, 6, generator=gen(3)), -1)
    sub = sample_subtiles(beta, plan, gen(4))
    tile0 = sub[:, [0, 2, 3]]
    assert (tile0.sort(1).values[:, 1:] != tile0.sort(1).values[:, :-1]).all()  # distinct
    top = sample_subtiles(beta, plan, deterministic=True)
    assert torch.equal(top[:, [0, 2, 3]], topk_indices(beta[:, 0], 3))
    assert torch.equal(top[:, 1], beta[:, 1].argmax(1))
    # per-scene generators: batched equals per scene
    rows = [
        sample_subtiles(beta[i : i + 1], nested_plan(tiles[i : i + 1]), [gen(i)]) for i in range(4)
    ]
    assert torch.equal(
        sample_subtiles(beta[:4], nested_plan(tiles[:4]), [gen(i) for i in range(4)]),
        torch.cat(rows),
    )


def run_nested(la, lb, table, upstream, n, rows, seed):
    """Per-row value and gradients of the two-stage estimator, drawn as Zoom-In draws."""
    p1, p2, d = table.shape
    la_r = la.expand(rows, -1).clone().requires_grad_()
    lb_r = lb.expand(rows, -1, -1).clone().requires_grad_()
    tb_r = table.expand(rows, -1, -1, -1).clone().requires_grad_()
    g = gen(seed)
    alpha = torch.softmax(la_r, 1)
    tile_idx = sample_with_replacement(alpha.detach(), n, g)
    plan = nested_plan(tile_idx)
    beta_all = torch.softmax(lb_r, 2)  # (R, P1, P2)
    beta_distinct = beta_all.gather(1, plan.tiles[..., None].expand(-1, -1, p2))
    sub_idx = sample_subtiles(beta_distinct.detach(), plan, g)
    flat = tb_r.reshape(rows, p1 * p2, d)
    feats = flat.gather(1, (tile_idx * p2 + sub_idx)[..., None].expand(-1, -1, d))
    value = expect_nested(alpha, tile_idx, per_draw(beta_distinct, plan), sub_idx, feats, plan)
    (value @ upstream).sum().backward()
    return value.detach(), la_r.grad, lb_r.grad, tb_r.grad


@pytest.mark.parametrize("p1,p2,n", [(3, 4, 3), (4, 3, 2), (2, 2, 3)])
def test_nested_estimator_is_unbiased_in_value_and_gradients(p1, p2, n):
    """(2, 2, 3): a tile drawn 3 times has only 2 sub-tiles; its extra draw weighs 0."""
    g = gen(100 + p1 * 10 + p2)
    la = torch.randn(p1, generator=g, dtype=DT)
    lb = torch.randn(p1, p2, generator=g, dtype=DT)
    table = torch.randn(p1, p2, 2, generator=g, dtype=DT)
    upstream = torch.randn(2, generator=g, dtype=DT)
    la_e, lb_e, tb_e = (t.clone().requires_grad_() for t in (la, lb, table))
    joint = torch.softmax(la_e, 0)[:, None] * torch.softmax(lb_e, 1)
    exact = (joint[..., None] * tb_e).sum((0, 1))
    exact_grads = torch.autograd.grad(exact @ upstream, [la_e, lb_e, tb_e])
    v, gla, glb, gtb = run_nested(la, lb, table, upstream, n, 40_000, seed=p1 + p2 + n)
    within_se(v, exact.detach(), "nested value")
    within_se(gla, exact_grads[0], "nested d/dalpha-logits")
    within_se(glb, exact_grads[1], "nested d/dbeta-logits")
    within_se(gtb, exact_grads[2], "nested d/dfeatures")


def test_nested_weights_reduce_to_ats_within_one_tile():
    """All n draws on one tile: the nested weights are ATS's without-replacement weights."""
    beta_sel = torch.tensor([[0.4, 0.35, 0.1]], dtype=DT)
    plan = nested_plan(torch.tensor([[2, 2, 2]]))
    assert torch.allclose(nested_weights(beta_sel, plan, 5), without_replacement_weights(beta_sel))
    # distinct tiles: each draw is its tile's only draw, weight 1/n
    plan = nested_plan(torch.tensor([[0, 1, 2]]))
    assert torch.allclose(nested_weights(beta_sel, plan, 5), torch.full((1, 3), 1 / 3, dtype=DT))
