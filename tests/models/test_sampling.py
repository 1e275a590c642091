"""Samplers of models.sampling: frequencies against exact probabilities, safety at 0 and 1.

Statistical checks use fixed seeds and a tolerance of 5 standard errors per cell (the
chance that a correct sampler fails one cell is below 1e-6).
"""

import itertools

import pytest
import torch

from models import sampling
from models.sampling import (
    gumbel,
    sample_with_replacement,
    sample_with_replacement_from_logits,
    sample_without_replacement,
    sample_without_replacement_from_logits,
    spread_topk_indices,
    topk_indices,
)

SE_TOL = 5.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_frequencies(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> None:
    """Each empirical frequency within SE_TOL binomial standard errors of its probability."""
    freq = counts.double() / draws
    se = torch.sqrt(probs * (1 - probs) / draws).clamp_min(1e-12)
    z = (freq - probs).abs() / se
    assert z.max() < SE_TOL, (
        f"frequencies {freq.tolist()} vs {probs.tolist()} (max z {z.max():.2f})"
    )


def test_with_replacement_frequencies_match_probabilities():
    probs = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.3], dtype=torch.float64)
    rows, n = 40_000, 3
    idx = sample_with_replacement(probs.expand(rows, -1), n, gen(0))
    assert idx.shape == (rows, n) and idx.dtype == torch.int64
    counts = torch.bincount(idx.flatten(), minlength=5)
    assert counts[2] == 0  # the zero-probability position is never drawn
    assert_frequencies(counts, probs, rows * n)


def test_with_replacement_accepts_unnormalised_weights_and_logits():
    weights = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    a = sample_with_replacement(weights * 7.5, 5, gen(3))
    b = sample_with_replacement(weights / weights.sum(), 5, gen(3))
    assert torch.equal(a, b)
    logits = torch.log(weights)  # -inf masks position 2
    c = sample_with_replacement_from_logits(logits, 5, gen(3))
    assert torch.equal(a, c)


def test_without_replacement_ordered_pair_frequencies():
    """P(first = i, second = j) = a_i * a_j / (1 - a_i) for Gumbel-top-k in draw order."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    rows = 60_000
    idx = sample_without_replacement(probs.expand(rows, -1), 2, gen(1))
    cells = list(itertools.permutations(range(4), 2))
    exact = torch.tensor([probs[i] * probs[j] / (1 - probs[i]) for i, j in cells])
    code = idx[:, 0] * 4 + idx[:, 1]
    counts = torch.bincount(code, minlength=16)[[i * 4 + j for i, j in cells]]
    assert counts.sum() == rows  # every draw is one of the ordered pairs of distinct items
    assert_frequencies(counts, exact, rows)


def test_without_replacement_ordered_triple_frequencies():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    rows = 60_000
    idx = sample_without_replacement(probs.expand(rows, -1), 3, gen(2))
    cells = list(itertools.permutations(range(4), 3))
    exact = torch.tensor(
        [
            probs[i] * probs[j] / (1 - probs[i]) * probs[k] / (1 - probs[i] - probs[j])
            for i, j, k in cells
        ]
    )
    code = (idx[:, 0] * 4 + idx[:, 1]) * 4 + idx[:, 2]
    counts = torch.bincount(code, minlength=64)[[(i * 4 + j) * 4 + k for i, j, k in cells]]
    assert_frequencies(counts, exact, rows)


def test_without_replacement_has_no_repeats():
    probs = torch.softmax(torch.randn(500, 12, generator=gen(4)) * 3, dim=1)
    idx = sample_without_replacement(probs, 12, gen(5))
    assert torch.equal(idx.sort(dim=1).values, torch.arange(12).expand(500, -1))
    with pytest.raises(ValueError, match="without replacement"):
        sample_without_replacement(probs, 13, gen(5))


def test_from_logits_equals_from_probabilities():
    logits = torch.randn(64, 9, generator=gen(6))
    a = sample_without_replacement(torch.softmax(logits, 1), 4, gen(7))
    b = sample_without_replacement_from_logits(logits, 4, gen(7))
    c = sample_without_replacement(logits, 4, gen(7), logits=True)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_probabilities_zero_and_one_are_safe():
    """One-hot and sparse rows: no NaN/inf anywhere, zeros drawn only when unavoidable."""
    probs = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.5, 0.0, 0.5, 0.0],
            [1e-40, 0.0, 0.0, 0.0, 1.0 - 1e-7],  # a subnormal positive beats every zero
        ]
    )
    rows = probs.repeat(2000, 1)
    with_r = sample_with_replacement(rows, 4, gen(8))
    assert (rows.gather(1, with_r) > 0).all()
    idx = sample_without_replacement(rows, 2, gen(9))
    two_positive = torch.arange(len(rows)) % 3 != 0  # rows 1 and 2 have two positives
    assert (rows.gather(1, idx)[two_positive] > 0).all()
    assert torch.isfinite(rows.gather(1, idx)).all()
    assert (idx[0::3, 0] == 1).all()  # the certain position is always drawn first
    idx3 = sample_without_replacement(rows, 3, gen(10))
    assert (idx3[0::3, 0] == 1).all() and (rows[0::3].gather(1, idx3[0::3, 1:]) == 0).all()
    logits = torch.log(rows)  # -inf entries
    idx_l = sample_without_replacement_from_logits(logits, 2, gen(11))
    assert (rows.gather(1, idx_l)[two_positive] > 0).all()


def test_gumbel_is_finite_at_u_zero(monkeypatch):
    monkeypatch.setattr(
        sampling, "uniform", lambda shape, g, **kw: torch.tensor([0.0, 1.0 - 2**-24, 0.5])
    )
    g = gumbel((3,), None)
    assert torch.isfinite(g).all() and g[0] < -4 and g[1] > 16


def test_topk_indices_is_deterministic_and_ordered():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]])
    assert topk_indices(probs, 3).tolist()[0] == [1, 3, 2]
    assert topk_indices(probs, 1).tolist() == [[1], [0]]


def test_per_row_generators_make_draws_batch_invariant():
    probs = torch.softmax(torch.randn(3, 20, generator=gen(12)), 1)
    for sampler in (sample_with_replacement, sample_without_replacement):
        batched = sampler(probs, 4, [gen(100 + i) for i in range(3)])
        single = torch.cat([sampler(probs[i : i + 1], 4, [gen(100 + i)]) for i in range(3)])
        assert torch.equal(batched, single)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample_with_replacement(probs, 4, [gen(1), gen(2)])


def test_same_seed_same_draw_and_bad_shapes_rejected():
    probs = torch.softmax(torch.randn(4, 7, generator=gen(13)), 1)
    assert torch.equal(
        sample_without_replacement(probs, 3, gen(1)), sample_without_replacement(probs, 3, gen(1))
    )
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        sample_with_replacement(probs[0], 3, gen(1))
    with pytest.raises(ValueError, match=">= 1"):
        sample_with_replacement(probs, 0, gen(1))


# ------------------------------------------------------------------ spread top-k


def test_spread_topk_takes_the_best_then_skips_its_neighbours():
    # a 4 x 4 map; the best cell (1, 1) has strong neighbours that plain top-k would take next
    p = torch.zeros(4, 4, dtype=torch.float64)
    p[1, 1], p[1, 2], p[2, 1], p[3, 3], p[0, 3], p[3, 0] = 0.3, 0.2, 0.15, 0.12, 0.1, 0.08
    probs = (p + 0.001).flatten()[None]
    probs = probs / probs.sum()
    assert topk_indices(probs, 3)[0].tolist() == [5, 6, 9]
    got = spread_topk_indices(probs, (4, 4), 3, radius=1)[0].tolist()
    assert got == [5, 15, 3]  # (1, 1), then (3, 3) and (0, 3): outside each other's 3 x 3
    # once every cell left is suppressed, the most probable of them come next, none twice
    got = spread_topk_indices(probs, (4, 4), 6, radius=1)[0].tolist()
    assert got[:4] == [5, 15, 3, 12] and got[4:] == [6, 9] and len(set(got)) == 6
    # radius 0 suppresses nothing but the pick itself: plain top-k
    assert torch.equal(spread_topk_indices(probs, (4, 4), 5, radius=0), topk_indices(probs, 5))


def test_spread_topk_checks_the_grid():
    with pytest.raises(ValueError, match="grid"):
        spread_topk_indices(torch.full((1, 12), 1 / 12), (4, 4), 2)
