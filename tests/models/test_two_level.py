"""Two-level attention: only the kept candidates are read; part clustering and selection."""

import torch
import torch.nn.functional as F

from models.regions import crop_resize, to_level0
from models.two_level import (
    TwoLevelAttention,
    cluster_channels,
    kmeans,
    part_scores,
    select_parts,
    window_contrast,
)
from tests.models.tiny_nets import (
    RecordingSource,
    TinyConv,
    random_scenes,
)


def _same_partition(labels, groups):
    return all(len({int(labels[i]) for i in g}) == 1 for g in groups) and len(
        {int(labels[g[0]]) for g in groups}
    ) == len(groups)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres])
    labels, found = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert _same_partition(labels, [range(0, 5), range(5, 10), range(10, 15)])
    assert torch.cdist(found, centres).min(dim=1).values.max() < 0.2


def test_channels_that_fire_on_the_same_patches_form_one_part():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, generator=g), torch.rand(40, generator=g)
    noise = 0.01 * torch.randn(40, 6, generator=g)
    features = torch.stack([a, 2 * a, a + 1, b, 3 * b, b - 2], dim=1) + noise  # (N, D)
    labels = cluster_channels(features, 2, torch.Generator().manual_seed(0))
    assert _same_partition(labels, [[0, 1, 2], [3, 4, 5]])


def test_each_part_selects_the_patch_where_its_channels_respond_most():
    features = torch.tensor([[[1.0, 0.0, 5.0], [3.0, 1.0, 0.0]]])  # (B=1, T=2, D=3)
    assignment = torch.tensor([0, 0, 1])
    scores = part_scores(features, assignment, 2)
    assert torch.allclose(scores, torch.tensor([[[0.5, 5.0], [2.0, 0.0]]]))
    part_feats, choice = select_parts(features, scores)
    assert choice.tolist() == [[1, 0]]
    assert torch.equal(part_feats, features[:, [1, 0]])


def _model(**kw):
    torch.manual_seed(0)
    return TwoLevelAttention(
        4, (32, 32), patch_size=(16, 16), filter_size=(16, 16), keep=3,
        backbone=TinyConv(), filter_backbone=TinyConv(), **kw,
    )


def test_only_the_candidates_kept_by_the_filter_net_are_read():
    model = _model().eval()
    source, keys = random_scenes([(300, 300), (400, 260)], coarsest=64)
    rec = RecordingSource(source)
    sizes = rec.level0_sizes(keys)
    views = rec.view(keys, (32, 32))
    out = model(views, sizes, rec, keys)
    assert len(rec.requests) == 1 and rec.requests[0].boxes.shape == (2, 3, 4)
    with torch.no_grad():
        k = model.candidates.shape[0]
        crops = crop_resize(views, model.candidates.expand(2, k, 4), (16, 16)).flatten(0, 1)
        logits = model.filter_head(model.filter_net(crops).mean(dim=(-2, -1))).view(2, k, -1)
        kept = torch.topk(torch.softmax(logits, -1).max(-1).values, 3, dim=-1).indices
    assert torch.equal(rec.requests[0].boxes, to_level0(model.candidates[kept], sizes))
    assert rec.requests[0].size == (16, 16)
    assert torch.equal(out.boxes, rec.requests[0].boxes)
    assert torch.allclose(out.logits, out.extras["object_logits"] + out.extras["part_logits"])


def test_part_mix_weights_the_part_logits_in_the_prediction_and_its_loss():
    source, keys = random_scenes([(200, 200), (160, 240)], coarsest=64)
    views, sizes = source.view(keys, (32, 32)), source.level0_sizes(keys)
    labels = torch.tensor([1, 3])
    model = _model(part_mix=0.25)
    out = model(views, sizes, source, keys)
    ex = out.extras
    assert torch.allclose(out.logits, ex["object_logits"] + 0.25 * ex["part_logits"])
    assert not torch.allclose(out.logits, ex["object_logits"] + ex["part_logits"])
    filt = ex["filter_logits"]
    expected = (
        F.cross_entropy(out.logits, labels)
        + 0.5 * F.cross_entropy(ex["object_logits"], labels)
        + 0.5 * F.cross_entropy(ex["part_logits"], labels)
        + 0.5 * F.cross_entropy(filt.flatten(0, 1), labels.repeat_interleave(filt.shape[1]))
    )
    assert torch.allclose(model.loss(out, labels), expected)


def test_loss_trains_filter_domain_and_both_heads():
    model = _model()
    source, keys = random_scenes([(200, 200), (160, 240)], coarsest=64)
    out = model(source.view(keys, (32, 32)), source.level0_sizes(keys), source, keys)
    model.loss(out, torch.tensor([1, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_end_step_banks_features_and_reclusters_periodically():
    model = _model(memory=8, recluster_every=2, parts=2)
    source, keys = random_scenes([(200, 200), (160, 240)], coarsest=64)
    out = model(source.view(keys, (32, 32)), source.level0_sizes(keys), source, keys)
    feats = out.extras["patch_features"].flatten(0, 1)  # 6 patch features
    before = model.assignment.clone()
    model.end_step(out, torch.tensor([0, 1]))  # step 1: bank the 6 features, no clustering
    assert torch.equal(model.assignment, before) and int(model.bank_count) == 6
    assert torch.equal(model.bank[:6], feats)
    model.end_step(out, torch.tensor([0, 1]))  # step 2: cluster the bank, then bank 6 more
    expected = cluster_channels(feats, 2, torch.Generator().manual_seed(2))
    assert torch.equal(model.assignment, expected)
    assert int(model.bank_count) == 12
    assert torch.equal(model.bank[6:8], feats[:2]) and torch.equal(model.bank[:4], feats[2:])
    state = model.state_dict()
    assert {"assignment", "bank", "bank_count", "step_count"} <= set(state)


def test_contrast_prior_keeps_the_windows_on_the_object_first():
    """With the prior, the kept windows are the ones that hold the only object; without it the
    filter net's confidence (untrained: arbitrary) decides."""
    views = torch.zeros(1, 3, 32, 32)
    views[0, :, 2:8, 24:30] = 1.0  # top right
    source, keys = random_scenes([(256, 256)], coarsest=64)
    sizes = source.level0_sizes(keys)
    model = _model(proposal_prior="contrast", prior_strength=5.0).eval()
    with torch.no_grad():
        out = model(views, sizes, source, keys)
    first = model.candidates[out.extras["kept"][0, 0]].tolist()  # normalised [y0, x0, y1, x1]
    assert first[0] <= 2 / 32 and first[2] >= 8 / 32 and first[1] <= 24 / 32 and first[3] >= 30 / 32
    scores = window_contrast(views, model.candidates.expand(1, -1, 4), (16, 16))
    assert float(scores.max()) == 1.0 and float(scores.min()) == 0.0


def test_proposals_limit_the_filter_net_to_the_windows_with_most_contrast():
    views = torch.zeros(2, 3, 32, 32)
    views[:, :, 2:8, 24:30] = 1.0
    views[1, :, 20:26, 4:10] = 1.0
    source, keys = random_scenes([(256, 256), (256, 256)], coarsest=64)
    model = _model(proposal_prior="contrast", proposals=5).eval()
    with torch.no_grad():
        out = model(views, source.level0_sizes(keys), source, keys)
        windows = model.candidates.expand(2, -1, 4)
        top5 = window_contrast(views, windows, (16, 16)).topk(5, dim=-1).indices
    assert out.extras["filter_logits"].shape[:2] == (2, 5)
    for b in range(2):
        assert set(out.extras["kept"][b].tolist()) <= set(top5[b].tolist())
    import pytest

    with pytest.raises(ValueError, match="proposals"):
        _model(proposals=5)  # needs the contrast prior


def test_max_pool_and_feature_scale_give_scaled_unit_patch_features():
    model = _model(pool="max", feature_scale=16.0)
    source, keys = random_scenes([(200, 200), (160, 240)], coarsest=64)
    out = model(source.view(keys, (32, 32)), source.level0_sizes(keys), source, keys)
    norms = out.extras["patch_features"].norm(dim=-1)  # (B, keep)
    assert torch.allclose(norms, torch.full_like(norms, 16.0), atol=1e-4)
    plain = _model()(source.view(keys, (32, 32)), source.level0_sizes(keys), source, keys)
    assert not torch.allclose(plain.extras["patch_features"].norm(dim=-1), norms)
