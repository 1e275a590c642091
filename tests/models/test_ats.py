"""ATS: view-position -> level-0 box tables, the patches it reads, top-k, entropy, sampling."""

import pytest
import torch

from models import sampling
from models.ats import (
    ATS,
    centred_boxes,
    entropy,
    position_centres,
    scene_seeds,
    view_boxes,
)
from models.memory import TensorPyramidSource, crop_padded
from models.protocol import drive
from models.registry import create_model
from tests.models.coded_scenes import Recording, coded_scene, decode

TINY = dict(
    attention_backbone="ats_attention",
    attention_backbone_kwargs={"widths": (4,)},
    feature_backbone="ats_feature",
    feature_backbone_kwargs={"widths": (8,), "kernels": (3,)},
)


def run(model, source, keys, seed=0):
    views = source.view(keys, model.view_size)
    sizes = source.level0_sizes(keys)
    return model(views, sizes, source, keys, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ geometry tables


def test_position_centres_are_receptive_field_centres():
    # a 4x5 map over a 100x100 view: stride 25 rows, 20 columns; centre at (i + 0.5) * stride
    c = position_centres((4, 5), (100, 100))
    assert c.shape == (20, 2)
    assert c[0].tolist() == [12.5, 10.0]
    assert c[7].tolist() == [37.5, 50.0]  # row 1, column 2
    assert c[19].tolist() == [87.5, 90.0]


@pytest.mark.parametrize(
    "centre, size, box",
    [
        ((25.0, 25.0), (50, 50), [0, 0, 50, 50]),
        ((2.5, 2.5), (50, 50), [-22, -22, 28, 28]),  # half-way centre rounds up, crosses border
        ((10.0, 7.0), (4, 6), [8, 4, 12, 10]),
        ((10.4, 11.0), (5, 5), [8, 9, 13, 14]),  # y0 = floor(c - s/2 + 0.5)
    ],
)
def test_centred_boxes_table(centre, size, box):
    assert centred_boxes(torch.tensor([centre], dtype=torch.float64), size)[0].tolist() == box


@pytest.mark.parametrize(
    "scene, grid, position, box",
    [
        # square 500 px scene, 100 px view, attention at view resolution: 5 level-0 px a position
        ((500, 500), (100, 100), (0, 0), [-22, -22, 28, 28]),
        ((500, 500), (100, 100), (0, 99), [-22, 473, 28, 523]),
        ((500, 500), (100, 100), (50, 50), [228, 228, 278, 278]),
        # non-square 300 x 700 scene: its own scale factors 3 (y) and 7 (x)
        ((300, 700), (50, 50), (10, 20), [38, 262, 88, 312]),
        ((300, 700), (50, 50), (49, 49), [272, 668, 322, 718]),  # crosses the bottom-right border
        ((300, 700), (50, 50), (0, 0), [-22, -18, 28, 32]),
    ],
)
def test_view_boxes_table(scene, grid, position, box):
    idx = torch.tensor([[position[0] * grid[1] + position[1]]])
    sizes = torch.tensor([scene])
    assert view_boxes(idx, grid, (100, 100), sizes, (50, 50))[0, 0].tolist() == box


@pytest.mark.parametrize(
    "centre, level, box",
    [
        ((25.0, 25.0), 1, [16, 16, 36, 36]),  # 10 px of level 1 = 20 level-0 px
        ((31.0, 33.0), 1, [22, 24, 42, 44]),  # starts on even level-0 pixels
        ((31.0, 33.0), 2, [12, 12, 52, 52]),  # multiples of 4
    ],
)
def test_centred_boxes_align_on_the_read_level(centre, level, box):
    c = torch.tensor([centre], dtype=torch.float64)
    assert centred_boxes(c, (10, 10), level)[0].tolist() == box


def test_view_boxes_use_each_scenes_own_scale():
    idx = torch.tensor([[0, 3], [0, 3]])
    sizes = torch.tensor([[100, 100], [400, 200]])
    boxes = view_boxes(idx, (2, 2), (10, 10), sizes, (10, 10))
    # scene 0: centres (25, 25), (75, 75); scene 1: (100, 50), (300, 150)
    assert boxes.tolist() == [
        [[20, 20, 30, 30], [70, 70, 80, 80]],
        [[95, 45, 105, 55], [295, 145, 305, 155]],
    ]


# ------------------------------------------------------------------ the patches it reads


@pytest.mark.parametrize("replace", [False, True])
def test_model_receives_the_pixels_under_its_boxes(replace):
    torch.manual_seed(0)
    shapes = {"a": (300, 700), "b": (512, 384)}
    source = Recording(
        TensorPyramidSource.from_images({k: coded_scene(*s) for k, s in shapes.items()})
    )
    model = ATS(
        in_channels=3, view_size=(32, 32), patch_size=(12, 10), n_patches=6, replace=replace, **TINY
    ).train()
    out = run(model, source, ["a", "b"])
    (request, patches), = source.log
    assert request.level == 0 and request.size == (12, 10)
    assert torch.equal(request.boxes, out.boxes)
    # the boxes are the chosen positions mapped by the table formula
    expected = view_boxes(out.extras["positions"], (32, 32), (32, 32), torch.tensor(list(shapes.values())), (12, 10))
    assert torch.equal(out.boxes, expected)
    for s, (key, (h, w)) in enumerate(shapes.items()):
        for k in range(6):
            y0, x0, y1, x1 = out.boxes[s, k].tolist()
            ys, xs = decode(patches[s, k])
            gy = torch.arange(y0, y1)[:, None].expand(y1 - y0, x1 - x0)
            gx = torch.arange(x0, x1)[None, :].expand(y1 - y0, x1 - x0)
            inside = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
            assert torch.equal(ys[inside], gy[inside]) and torch.equal(xs[inside], gx[inside]), key
            assert (patches[s, k][:, ~inside] == 0).all()  # outside the scene: zero padding


def test_patch_level_reads_the_coarser_level_with_the_scaled_box():
    source = Recording(TensorPyramidSource.from_images({"a": coded_scene(256, 320)}, coarsest=64))
    model = ATS(in_channels=3, view_size=(32, 32), patch_size=(8, 8), patch_level=1, n_patches=3, **TINY)
    out = run(model.eval(), source, ["a"])
    (request, patches), = source.log
    assert request.level == 1 and request.size == (8, 8)
    assert ((out.boxes[..., 2:] - out.boxes[..., :2]) == 16).all()  # 8 px at level 1 = 16 at 0
    assert (out.boxes % 2 == 0).all()  # on level 1's pixel grid: no resampling
    level1 = source.inner.pyramids["a"][1]
    for k in range(3):
        y0, x0, y1, x1 = (v // 2 for v in out.boxes[0, k].tolist())
        assert torch.equal(patches[0, k], crop_padded(level1, y0, x0, y1, x1).float() / 255)


# ------------------------------------------------------------------ inference, entropy, seeds


def small_source():
    g = torch.Generator().manual_seed(1)
    images = {f"s{i}": (torch.rand(1, 120 + 40 * i, 160, generator=g) * 255).to(torch.uint8) for i in range(3)}
    return TensorPyramidSource.from_images(images, coarsest=64), list(images)


def tiny_model(**kw):
    torch.manual_seed(0)
    base = dict(in_channels=1, view_size=(24, 24), patch_size=(8, 8), n_patches=4)
    return create_model("ats", **{**base, **TINY, **kw})


def test_topk_at_eval_is_deterministic_and_takes_the_most_attended():
    source, keys = small_source()
    model = tiny_model().eval()
    with torch.no_grad():
        a, b = run(model, source, keys, seed=1), run(model, source, keys, seed=2)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)
    flat = a.attention.flatten(1)
    top = flat.topk(4, dim=1).indices
    assert torch.equal(a.extras["positions"], top)


def test_sampling_at_eval_when_asked():
    source, keys = small_source()
    model = tiny_model(inference="sample").eval()
    with torch.no_grad():
        a, b = run(model, source, keys, seed=1), run(model, source, keys, seed=2)
    assert not torch.equal(a.boxes, b.boxes)


def test_entropy_term_is_minus_strength_times_entropy():
    source, keys = small_source()
    model = tiny_model(entropy_strength=0.5).train()
    out = run(model, source, keys)
    h = entropy(out.attention.flatten(1)).mean()
    assert torch.allclose(out.aux["entropy"], -0.5 * h)
    # minimising the loss raises the entropy: the term's gradient on the logits points towards
    # uniform attention (a gradient step lowers the term and increases H)
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    term = -0.5 * entropy(torch.softmax(logits, -1)).mean()
    term.backward()
    stepped = logits - 0.1 * logits.grad
    assert entropy(torch.softmax(stepped, -1)) > entropy(torch.softmax(logits.detach(), -1))
    assert model.eval() and "entropy" not in run(model, source, keys).aux


def test_weights_sum_to_one_and_every_parameter_learns():
    source, keys = small_source()
    for replace in (False, True):
        model = tiny_model(replace=replace).train()
        out = run(model, source, keys)
        assert torch.allclose(out.weights.sum(1), torch.ones(len(keys)))
        model.loss(out, torch.tensor([0, 1, 2])).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_training_draws_are_per_scene_whatever_the_batch():
    source, keys = small_source()
    model = tiny_model().train()
    batched = run(model, source, keys, seed=7)
    for i, key in enumerate(keys):
        alone = run(model, source, [key], seed=7)
        assert torch.equal(batched.boxes[i], alone.boxes[0])
        assert torch.allclose(batched.logits[i], alone.logits[0], atol=1e-5)
    other = run(model, source, keys, seed=8)
    assert not torch.equal(batched.boxes, other.boxes)


def test_scene_seeds_depend_on_the_scene_not_its_position():
    views = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = scene_seeds(views, torch.Generator().manual_seed(4))
    r = scene_seeds(views.flip(0), torch.Generator().manual_seed(4))
    assert s == r[::-1] and len(set(s)) == 3


def test_baseline_changes_the_attention_gradient_not_the_value():
    source, keys = small_source()
    labels = torch.tensor([0, 1, 2])
    grads, logits = [], []
    for baseline in (False, True):
        model = tiny_model(baseline=baseline).train()
        out = run(model, source, keys, seed=3)
        model.loss(out, labels).backward()
        logits.append(out.logits.detach())
        grads.append(
            (
                torch.cat([p.grad.flatten() for p in model.attention.parameters()]),
                torch.cat([p.grad.flatten() for p in model.features.parameters()]),
            )
        )
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)  # features: same gradient
    assert not torch.allclose(grads[0][0], grads[1][0])  # attention: the control variate


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="inference"):
        ATS(inference="argmax", **TINY)
    source, keys = small_source()
    model = tiny_model(n_patches=1000)
    with pytest.raises(ValueError, match="fewer positions"):
        run(model, source, keys)


# ------------------------------------------------------------------ proposals (read ahead)


def _inputs(model, source, keys):
    return source.view(keys, model.view_size), source.level0_sizes(keys)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("replace", [False, True])
def test_proposal_with_unchanged_weights_reproduces_the_plain_step(replace):
    """propose + steps(proposal) consumes the generator as steps does and, with the same
    weights, gives the same draws, value, weights and gradients."""
    source, keys = small_source()
    labels = torch.tensor([0, 1, 2])
    model = tiny_model(replace=replace, baseline=True).train()
    views, sizes = _inputs(model, source, keys)
    plain = drive(model.steps(views, sizes, torch.Generator().manual_seed(3)), source, keys)
    model.loss(plain, labels).backward()
    plain_grads = _grads(model)
    model.zero_grad()
    proposal = model.propose(views, sizes, torch.Generator().manual_seed(3))
    assert not proposal.probs.requires_grad
    ahead = drive(model.steps(views, sizes, None, proposal=proposal), source, keys)
    model.loss(ahead, labels).backward()
    assert torch.equal(ahead.boxes, plain.boxes)
    assert torch.equal(ahead.extras["positions"], plain.extras["positions"])
    torch.testing.assert_close(ahead.weights, plain.weights)
    torch.testing.assert_close(ahead.logits, plain.logits)
    torch.testing.assert_close(_grads(model), plain_grads)


@pytest.mark.parametrize("replace", [False, True])
def test_proposal_from_other_weights_is_importance_weighted(replace):
    """After the weights move, the proposal's draws are kept and weighted by a / q."""
    from models import sampling

    source, keys = small_source()
    model = tiny_model(replace=replace, baseline=True).train()
    views, sizes = _inputs(model, source, keys)
    proposal = model.propose(views, sizes, torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in model.attention.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = drive(model.steps(views, sizes, None, proposal=proposal), source, keys)
    idx = proposal.positions
    assert torch.equal(out.extras["positions"], idx) and torch.equal(out.boxes, proposal.request.boxes)
    a_sel = out.extras["probs"].detach().gather(1, idx)
    q_sel = proposal.probs.gather(1, idx)
    assert not torch.allclose(a_sel, q_sel)
    if replace:
        expected = sampling.with_replacement_weights(idx, ratio=a_sel / q_sel)
    else:
        expected = sampling.without_replacement_weights(a_sel, q_sel=q_sel)
    torch.testing.assert_close(out.weights, expected)
    assert not torch.allclose(out.weights.sum(1), torch.ones(3))  # 1 only in expectation
    # the baseline leaves the value alone off-policy too
    model.baseline = False
    plain = drive(model.steps(views, sizes, None, proposal=proposal), source, keys)
    torch.testing.assert_close(out.logits, plain.logits)


def test_propose_leaves_batch_norm_statistics_alone():
    source, keys = small_source()
    model = tiny_model(attention_backbone="small_cnn",
                       attention_backbone_kwargs={"widths": (4,), "norm": "batch"}).train()
    views, sizes = _inputs(model, source, keys)
    before = [b.clone() for b in model.attention.buffers()]
    assert len(before) >= 3
    model.propose(views, sizes, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.attention.buffers(), strict=True))
    run(model, source, keys)  # the forward in steps does update them
    assert not all(torch.equal(a, b) for a, b in zip(before, model.attention.buffers(), strict=True))


def test_spread_inference_picks_distinct_places_deterministically():
    source, keys = small_source()
    model = tiny_model(inference="spread", spread_radius=1).eval()
    with torch.no_grad():
        a, b = run(model, source, keys, seed=1), run(model, source, keys, seed=2)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)
    gh, gw = a.attention.shape[1:]
    want = sampling.spread_topk_indices(a.attention.flatten(1), (gh, gw), 4, radius=1)
    assert torch.equal(a.extras["positions"], want)
    with pytest.raises(ValueError, match="spread_radius"):
        tiny_model(spread_radius=-1)
    with pytest.raises(ValueError, match="inference"):
        tiny_model(inference="nms")
