"""TNet: REINFORCE term and baseline exactly, Plackett-Luce log-probabilities, reads of only the
chosen regions at every level."""

import itertools
import math

import pytest
import torch

from models.protocol import ModelOutput
from models.regions import sub_region, to_level0
from models.tnet import TNet, plackett_luce_log_prob, region_pooling_weights
from tests.models.tiny_nets import (
    RecordingSource,
    TinyConv,
    random_scenes,
)


def _model(**kw) -> TNet:
    torch.manual_seed(0)
    return TNet(5, (32, 32), backbone=TinyConv(), **kw)


def test_plackett_luce_log_prob_of_an_ordered_draw():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    got = plackett_luce_log_prob(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(got, torch.log(torch.tensor([0.3 * 0.5 / 0.7])))


def test_plackett_luce_probabilities_of_all_ordered_draws_sum_to_one():
    logits = torch.randn(1, 4)
    draws = torch.tensor(list(itertools.permutations(range(4), 2)))
    total = sum(plackett_luce_log_prob(logits, d[None]).exp() for d in draws)
    assert torch.allclose(total, torch.ones(1))


def test_region_pooling_weights_share_cells_by_overlap_area():
    w = region_pooling_weights(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 1.0]]), 2, 2)
    assert torch.allclose(w[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(w[1], torch.full((2, 2), 0.25))


def test_reinforce_term_sign_and_magnitude():
    model = _model(reinforce_weight=0.5)
    model.baseline.fill_(0.25)
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    logits = torch.tensor([[2.0, 0.0, 0, 0, 0], [2.0, 0.0, 0, 0, 0]])  # both predict class 0
    out = ModelOutput(logits=logits, extras={"log_prob": log_prob})
    term = model.reinforce_term(out, torch.tensor([0, 1]))  # rewards R = [1, 0]
    # -lambda * mean((R - b) log p) = -0.5 * mean([0.75 * -1, -0.25 * -2]) = 0.0625
    assert torch.isclose(term, torch.tensor(0.0625))
    term.backward()
    # correct scene: its log-probability is pushed up (negative gradient of the loss), wrong: down
    assert torch.allclose(log_prob.grad, torch.tensor([-0.1875, 0.0625]))


def test_baseline_update_is_exact_and_checkpointed():
    model = _model()
    model.baseline.fill_(0.25)
    out = ModelOutput(logits=torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]]))
    model.end_step(out, torch.tensor([0, 1]))  # mean reward 0.5
    assert model.baseline.item() == pytest.approx(0.9 * 0.25 + 0.1 * 0.5, abs=1e-7)
    model.end_step(out, torch.tensor([0, 0]))  # mean reward 1
    assert model.baseline.item() == pytest.approx(0.9 * 0.275 + 0.1, abs=1e-7)
    restored = _model()
    restored.load_state_dict(model.state_dict())
    assert restored.baseline.item() == pytest.approx(0.3475, abs=1e-7)


def _forward(model, shapes=((300, 300), (400, 260)), generator=None):
    source, keys = random_scenes(shapes, coarsest=64)
    rec = RecordingSource(source)
    sizes = rec.level0_sizes(keys)
    views = rec.view(keys, model.view_size)
    return model(views, sizes, rec, keys, generator), rec, views, sizes, keys


def test_only_the_chosen_regions_are_read_at_each_level():
    model = _model(levels=3, locations=2).eval()
    out, rec, views, sizes, keys = _forward(model)
    assert [tuple(r.boxes.shape) for r in rec.requests] == [(2, 2, 4), (2, 4, 4)]
    assert all(r.size == (32, 32) for r in rec.requests)
    with torch.no_grad():
        # level 2: the top-2 candidates of the view's location scores
        idx = torch.topk(model.location(model.features(views)), 2, dim=-1).indices
        parents = model.candidates[idx]  # (B, 2, 4)
        assert torch.equal(rec.requests[0].boxes, to_level0(parents, sizes))
        # level 3: the top-2 candidates inside each level-2 region, from that region's pixels
        patches = rec.inner.read(keys, rec.requests[0]).flatten(0, 1)
        idx = torch.topk(model.location(model.features(patches)), 2, dim=-1).indices
        children = sub_region(parents.reshape(-1, 1, 4), model.candidates[idx]).reshape(2, 4, 4)
        assert torch.equal(rec.requests[1].boxes, to_level0(children, sizes))
    assert torch.equal(out.boxes, torch.cat([r.boxes for r in rec.requests], dim=1))
    # half-size regions: each level is read at twice the resolution of the one above
    side = (rec.requests[0].boxes[..., 2] - rec.requests[0].boxes[..., 0]).float()
    assert torch.allclose(side, sizes[:, :1].float() / 2, atol=1)
    assert len(out.extras["level_logits"]) == 3
    assert out.attention.shape == (2, 3, 3)
    assert torch.allclose(out.weights, torch.full((2, 6), 1 / 7))


def test_regions_are_read_at_region_size_from_the_level_that_serves_it():
    """Half-size regions of 2048 px scenes are 1024 px: 256 px regions come from level 2, 512 px
    ones from level 1 (the coarsest level that still has the region's resolution)."""
    levels = {}
    for side in (256, 512):
        model = _model(levels=2, locations=2, region_size=(side, side)).eval()
        _, rec, *_ = _forward(model, shapes=((2048, 2048), (2048, 2048)))
        assert len(rec.requests) == 1 and rec.requests[0].size == (side, side)
        levels[side] = rec.requests[0].level
    assert levels == {256: 2, 512: 1}


def test_sampling_in_training_is_seeded_and_topk_in_eval_is_deterministic():
    model = _model(levels=2, locations=1)
    a = _forward(model.train(), generator=torch.Generator().manual_seed(3))[1].requests[0].boxes
    b = _forward(model.train(), generator=torch.Generator().manual_seed(3))[1].requests[0].boxes
    assert torch.equal(a, b)
    draws = {
        tuple(_forward(model.train(), generator=torch.Generator().manual_seed(s))[1].requests[0].boxes.flatten().tolist())
        for s in range(8)
    }
    assert len(draws) > 1  # it does sample
    e1 = _forward(model.eval())[1].requests[0].boxes
    e2 = _forward(model.eval(), generator=torch.Generator().manual_seed(9))[1].requests[0].boxes
    assert torch.equal(e1, e2)


def test_loss_gives_the_location_module_a_policy_gradient():
    model = _model(levels=2, locations=2, reinforce_weight=1.0)
    out, *_ = _forward(model.train(), generator=torch.Generator().manual_seed(0))
    labels = out.logits.argmax(-1).clone()
    labels[1] = (labels[1] + 1) % 5  # one correct (advantage 1 - b = 1), one wrong (0)
    model.loss(out, labels).backward()
    grad = sum(p.grad.abs().sum() for p in model.location.parameters())
    assert math.isfinite(float(grad)) and float(grad) > 0


def test_detached_location_keeps_the_policy_gradient_out_of_the_backbone():
    """The REINFORCE term alone: with ``detach_location`` it reaches the location module and
    nothing of the backbone; without, it reaches the backbone too."""
    grads = {}
    for detach in (False, True):
        model = _model(levels=2, locations=2, reinforce_weight=1.0, detach_location=detach)
        out, *_ = _forward(model.train(), generator=torch.Generator().manual_seed(0))
        labels = out.logits.argmax(-1).clone()
        labels[1] = (labels[1] + 1) % 5
        model.reinforce_term(out, labels).backward()
        location = sum(float(p.grad.abs().sum()) for p in model.location.parameters())
        backbone = sum(float(p.grad.abs().sum()) for p in model.features.parameters()
                       if p.grad is not None)
        grads[detach] = (location, backbone)
    assert grads[True][0] > 0 and grads[True][1] == 0.0
    assert grads[False][0] > 0 and grads[False][1] > 0


def _one_bright_square(size=32, corner=(22, 4), side=6):
    views = torch.zeros(1, 3, size, size)
    y, x = corner
    views[0, :, y : y + side, x : x + side] = 1.0
    return views


def test_contrast_prior_puts_the_first_location_on_the_only_object():
    """Learned scores start nearly flat; the prior makes the object's region the top choice."""
    views = _one_bright_square()  # bottom-left
    plain = _model(levels=2, locations=1)
    primed = _model(levels=2, locations=1, location_prior="contrast", prior_strength=5.0)
    with torch.no_grad():
        fmap = primed.features(views)
        chosen = int(primed._location_logits(fmap, views).argmax())
        spread = primed.location(fmap).max() - primed.location(fmap).min()
    y0, x0, y1, x1 = primed.candidates[chosen].tolist()
    assert y1 * 32 >= 28 and x0 * 32 <= 4  # the chosen region contains the square
    assert float(spread) < 5.0  # the learned part alone would not decide it
    with pytest.raises(ValueError, match="location_prior"):
        _model(location_prior="salient")
    assert plain.prior_strength == 0.0


def test_max_pool_and_feature_scale_give_scaled_unit_features():
    model = _model(levels=1, pool="max", feature_scale=16.0)
    _, feat = model._embed(torch.rand(3, 3, 32, 32), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), 0)
    assert torch.allclose(feat.norm(dim=-1), torch.full((3,), 16.0), atol=1e-4)


def test_view_backbone_keeps_the_views_batchnorm_statistics_apart_from_the_regions():
    """With ``view_backbone`` the view goes through a backbone of its own, so each backbone's
    BatchNorm running statistics come from one kind of input only (a shared backbone's mix
    of views and crops normalised both wrongly in eval mode: README)."""
    model = TNet(5, (32, 32), backbone="small_cnn", backbone_kwargs={"widths": (8, 8, 8)},
                 view_backbone=True, region_size=(16, 16))
    seen = {"features": set(), "view_features": set()}
    for name in seen:
        getattr(model, name).register_forward_hook(
            lambda mod, args, out, name=name: seen[name].add(tuple(args[0].shape[-2:]))
        )
    _forward(model.train(), generator=torch.Generator().manual_seed(0))
    assert seen == {"features": {(16, 16)}, "view_features": {(32, 32)}}
    shared = TNet(5, (32, 32), backbone="small_cnn", backbone_kwargs={"widths": (8, 8, 8)})
    assert shared.view_features is None
    with pytest.raises(ValueError, match="view_backbone"):
        _model(view_backbone=True)  # a module cannot be built twice


def test_reinforce_with_the_ema_baseline_moves_the_policy_to_the_rewarded_region():
    """End to end on a bare policy (9 logits): reward 1 when region 4 is among the 2 drawn.
    ``reinforce_term`` + ``end_step`` must raise region 4's probability from 1/9 and the EMA
    baseline must follow the mean reward (a sign error would drive region 4 to zero)."""
    from models.sampling import sample_without_replacement_from_logits

    model = _model(reinforce_weight=1.0)
    theta = torch.zeros(1, 9, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    gen, labels = torch.Generator().manual_seed(0), torch.zeros(16, dtype=torch.int64)
    rewards = []
    for _ in range(60):
        logits = theta.expand(16, 9)
        chosen = sample_without_replacement_from_logits(logits.detach(), 2, gen)
        hit = (chosen == 4).any(-1)
        rewards.append(float(hit.float().mean()))
        predicted = torch.where(hit, 0, 1)  # correct (class 0) exactly when region 4 was read
        out = ModelOutput(logits=torch.nn.functional.one_hot(predicted, 5).float(),
                          extras={"log_prob": plackett_luce_log_prob(logits, chosen)})
        opt.zero_grad()
        model.reinforce_term(out, labels).backward()
        opt.step()
        model.end_step(out, labels)
    p4 = float(torch.softmax(theta.detach(), -1)[0, 4])
    assert p4 > 0.5 and rewards[-1] > 0.8 > rewards[0]
    assert abs(float(model.baseline) - sum(rewards[-10:]) / 10) < 0.2
