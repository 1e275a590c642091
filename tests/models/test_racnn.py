"""RA-CNN: gradients through the boxcar crop, ranking loss, schedule, reads of only the crop."""

import pytest
import torch

from models.protocol import ModelOutput
from models.racnn import (
    RACNN,
    attend_and_zoom,
    boxcar_mask,
    ranking_loss,
    square_from_apn,
    strongest_response_targets,
)
from models.regions import read_level, to_level0
from tests.models.tiny_nets import (
    RecordingSource,
    TinyConv,
    random_scenes,
)


def _crop_loss(image, weights, t):
    tx, ty, tl = t
    box = torch.stack([ty - tl, tx - tl, ty + tl, tx + tl])[None]
    return (attend_and_zoom(image, box, (6, 6), k=10.0) * weights).sum()


def test_gradients_reach_tx_ty_tl_through_the_crop_and_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 12, 12, generator=g, dtype=torch.float64)
    weights = torch.rand(1, 2, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0.45, 0.55, 0.3], dtype=torch.float64, requires_grad=True)
    _crop_loss(image, weights, t).backward()
    assert (t.grad.abs() > 1e-3).all()
    eps = 1e-6
    for i in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[i] = eps
        numeric = (_crop_loss(image, weights, t.detach() + d) - _crop_loss(image, weights, t.detach() - d)) / (2 * eps)
        assert torch.isclose(t.grad[i], numeric, rtol=1e-4, atol=1e-7)


def test_boxcar_mask_is_one_inside_zero_outside_half_on_the_edge():
    mask = boxcar_mask(torch.tensor([[0.25, 0.25, 0.75, 0.75]]), (8, 8), k=10.0)[0]
    assert mask[3:5, 3:5].min() > 0.99
    assert mask[0, 0] < 1e-6 and mask[7, 7] < 1e-6
    edge = boxcar_mask(torch.tensor([[0.0, 0.0, 1.0, 0.5625]]), (1, 8), k=10.0)[0, 0]
    # pixel centre x = 4.5 sits on x1 * 8: the x factor is sigmoid(45) - sigmoid(0) = 1/2; the single
    # row (centre 0.5, edges 0 and 1) gives sigmoid(5) - sigmoid(-5)
    y_factor = torch.sigmoid(torch.tensor(5.0)) - torch.sigmoid(torch.tensor(-5.0))
    assert edge[4].item() == pytest.approx(0.5 * y_factor.item(), abs=1e-6)


def test_ranking_loss_is_zero_when_the_finer_scale_is_more_confident_by_the_margin():
    probs = [torch.tensor([0.30, 0.10]), torch.tensor([0.36, 0.20]), torch.tensor([0.50, 0.26])]
    assert ranking_loss(probs, margin=0.05).item() == 0.0
    worse = [torch.tensor([0.50]), torch.tensor([0.40])]
    assert ranking_loss(worse, margin=0.05).item() == pytest.approx(0.15)
    within = [torch.tensor([0.30]), torch.tensor([0.33])]  # more confident, but not by the margin
    assert ranking_loss(within, margin=0.05).item() == pytest.approx(0.02)


def test_model_ranking_term_on_constructed_scale_logits():
    model = RACNN(3, (16, 16), scales=3, backbone=TinyConv(), margin=0.05)
    confident = [torch.log(torch.tensor([[p, (1 - p) / 2, (1 - p) / 2]])) for p in (0.4, 0.5, 0.6)]
    out = ModelOutput(logits=confident[-1], extras={"scale_logits": confident})
    assert model.ranking_term(out, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    reverse = list(reversed(confident))
    out = ModelOutput(logits=reverse[-1], extras={"scale_logits": reverse})
    assert model.ranking_term(out, torch.tensor([0])).item() == pytest.approx(2 * 0.15, abs=1e-5)


def test_apn_square_is_at_least_a_third_and_inside_the_image():
    raw = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.2, 0.5]])
    t, box = square_from_apn(raw)
    assert torch.allclose(t[0], torch.tensor([1 / 6, 1 / 6, 1 / 6]))
    assert torch.allclose(t[1], torch.tensor([0.5, 0.5, 0.5]))
    assert (box >= -1e-7).all() and (box <= 1 + 1e-7).all()
    assert ((box[:, 2] - box[:, 0]) >= 1 / 3 - 1e-6).all()


def test_max_side_bounds_the_square_and_the_pretraining_target():
    raw = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    _, box = square_from_apn(raw, min_side=0.2, max_side=0.4)
    assert torch.allclose(box[:, 2] - box[:, 0], torch.tensor([0.4, 0.2]))
    assert torch.allclose(box[0], torch.tensor([0.6, 0.6, 1.0, 1.0]))
    fmap = torch.zeros(1, 3, 4, 4)
    fmap[0, :, 0, 0] = 5.0  # peak in the top-left cell
    _, box = square_from_apn(strongest_response_targets(fmap, 0.2, 0.4), 0.2, 0.4)
    assert torch.allclose(box, torch.tensor([[0.0, 0.0, 0.4, 0.4]]), atol=1e-6)
    with pytest.raises(ValueError, match="max_side"):
        RACNN(3, (16, 16), backbone=TinyConv(), min_side=0.5, max_side=0.4)


def test_apn_pretraining_target_is_half_the_image_around_the_strongest_response():
    fmap = torch.zeros(1, 3, 4, 4)
    fmap[0, :, 1, 2] = 5.0  # peak at cell (1, 2): centre (0.375, 0.625)
    _, box = square_from_apn(strongest_response_targets(fmap))
    assert torch.allclose(box, torch.tensor([[0.125, 0.375, 0.625, 0.875]]), atol=1e-6)


def test_each_zoom_reads_only_its_crop_from_the_level_that_matches_the_zoom():
    torch.manual_seed(0)
    model = RACNN(4, (32, 32), scales=3, backbone=TinyConv()).eval()
    source, keys = random_scenes([(1024, 1024), (900, 1100)], coarsest=64)
    rec = RecordingSource(source)
    sizes = rec.level0_sizes(keys)
    views = rec.view(keys, (32, 32))
    out = model(views, sizes, rec, keys)
    assert len(rec.requests) == 2
    with torch.no_grad():
        _, square = square_from_apn(model.apns[0](model.backbones[0](views)))
    expected = to_level0(square[:, None], sizes)
    assert torch.equal(rec.requests[0].boxes, expected)
    assert rec.requests[0].level == read_level(expected, (32, 32), sizes)
    assert rec.requests[0].level >= 1  # a crop of a third or more of ~1000 px: never level 0
    # the second zoom lies inside the first crop
    first, second = rec.requests[0].boxes, rec.requests[1].boxes
    assert (second[..., :2] >= first[..., :2] - 1).all() and (second[..., 2:] <= first[..., 2:] + 1).all()
    assert torch.equal(out.boxes, torch.cat([first, second], dim=1))


def test_alternating_schedule_trains_one_group_at_a_time():
    torch.manual_seed(0)
    model = RACNN(4, (32, 32), scales=2, backbone_kwargs=None, backbone=TinyConv())
    assert [model.phase_for_step(s, 2) for s in range(6)] == ["cls", "cls", "apn", "apn", "cls", "cls"]
    source, keys = random_scenes([(200, 200), (200, 240)], coarsest=64)
    labels = torch.tensor([0, 1])

    def grads(phase):
        model.zero_grad(set_to_none=True)
        model.set_phase(phase)
        out = model(source.view(keys, (32, 32)), source.level0_sizes(keys), source, keys)
        model.loss(out, labels).backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    apn = {n for n, _ in model.named_parameters() if n.startswith("apns.")}
    assert grads("apn") <= apn and grads("apn")
    assert set(model.no_grad_params()) == {n for n, _ in model.named_parameters()} - apn
    cls_grads = grads("cls")
    assert cls_grads and not (cls_grads & apn)
    assert set(model.no_grad_params()) == apn
    assert grads("joint") >= apn
    with pytest.raises(ValueError, match="phase"):
        model.set_phase("both")


def test_per_zoom_sides_and_zoom_sizes_set_each_scale_s_crop_and_input_size():
    torch.manual_seed(0)
    model = RACNN(
        4, (32, 32), scales=3, backbone=TinyConv(), min_side=(0.6, 0.25), max_side=(0.8, 0.5),
        zoom_sizes=(48, 16),
    ).eval()
    source, keys = random_scenes([(1024, 1024), (900, 1100)], coarsest=64)
    rec = RecordingSource(source)
    sizes = rec.level0_sizes(keys)
    model(rec.view(keys, (32, 32)), sizes, rec, keys)
    first, second = (r.boxes[:, 0].to(torch.float64) for r in rec.requests)
    side1 = (first[:, 2] - first[:, 0]) / sizes[:, 0]
    assert ((side1 >= 0.6 - 2e-3) & (side1 <= 0.8 + 2e-3)).all()
    side2 = (second[:, 2] - second[:, 0]) / (first[:, 2] - first[:, 0])
    assert ((side2 >= 0.25 - 1e-2) & (side2 <= 0.5 + 1e-2)).all()
    assert [r.size for r in rec.requests] == [(48, 48), (16, 16)]
    with pytest.raises(ValueError, match="zoom_sizes"):
        RACNN(4, (32, 32), scales=3, backbone=TinyConv(), zoom_sizes=(48,))
    with pytest.raises(ValueError, match="min_side"):
        RACNN(4, (32, 32), scales=3, backbone=TinyConv(), min_side=(0.5,))


def test_fused_logits_are_the_fusion_layer_on_scaled_unit_features():
    """fusion_scale multiplies every scale's L2-normalised features before the fused layer."""
    source, keys = random_scenes([(300, 300), (260, 320)], coarsest=64)
    views, sizes = source.view(keys, (32, 32)), source.level0_sizes(keys)
    fused = {}
    for scale in (1.0, 16.0):
        torch.manual_seed(0)
        model = RACNN(4, (32, 32), scales=2, backbone=TinyConv(), fusion_scale=scale).eval()
        with torch.no_grad():
            out = model(views, sizes, source, keys)
        fused[scale] = out.logits
        bias = model.fusion.bias
    # the fused layer is affine: its logits minus the bias scale with fusion_scale
    assert torch.allclose(fused[16.0] - bias, 16.0 * (fused[1.0] - bias), atol=1e-5)


def test_dropout_acts_in_training_only_and_rejects_bad_rates():
    """``dropout`` zeroes features before the classifiers in training; eval is unchanged."""
    source, keys = random_scenes([(300, 300), (260, 320)], coarsest=64)
    views, sizes = source.view(keys, (32, 32)), source.level0_sizes(keys)
    outs = {}
    for rate in (0.0, 0.5):
        torch.manual_seed(0)
        model = RACNN(4, (32, 32), scales=2, backbone=TinyConv(), dropout=rate)
        with torch.no_grad():
            outs[rate, "eval"] = model.eval()(views, sizes, source, keys).extras["scale_logits"][0]
            torch.manual_seed(1)
            outs[rate, "train"] = model.train()(views, sizes, source, keys).extras["scale_logits"][0]
    assert torch.equal(outs[0.0, "eval"], outs[0.5, "eval"])
    assert torch.equal(outs[0.0, "eval"], outs[0.0, "train"])
    assert not torch.allclose(outs[0.0, "train"], outs[0.5, "train"])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            RACNN(4, (32, 32), scales=2, backbone=TinyConv(), dropout=bad)


def test_attention_pool_starts_as_the_average_pool_and_bad_pools_are_rejected():
    """``pool="attention"`` gives one learned pool per scale that starts as the average, so a
    fresh model's outputs equal those of ``pool="avg"`` with the same weights."""
    source, keys = random_scenes([(300, 300), (260, 320)], coarsest=64)
    views, sizes = source.view(keys, (32, 32)), source.level0_sizes(keys)
    logits = {}
    for pool in ("avg", "attention"):
        torch.manual_seed(0)
        model = RACNN(4, (32, 32), scales=2, backbone="small_cnn", in_channels=3,
                      backbone_kwargs={"widths": (4, 8)}, pool=pool).eval()
        assert len(model.pools) == (2 if pool == "attention" else 0)
        with torch.no_grad():
            logits[pool] = model(views, sizes, source, keys).logits
    assert torch.allclose(logits["avg"], logits["attention"], atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        RACNN(4, (32, 32), scales=2, backbone=TinyConv(), pool="sum")
