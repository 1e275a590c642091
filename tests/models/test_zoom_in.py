"""Zoom-In: tile and sub-tile geometry tables, its reads, counts, contrastive loss, memory."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models.memory import TensorPyramidSource
from models.registry import create_model
from models.zoom_in import ZoomIn, apportion, complement, subtile_boxes, tile_boxes
from tests.models.coded_scenes import Recording, coded_scene, decode

TINY = dict(
    attention_backbone="ats_attention",
    attention_backbone_kwargs={"widths": (4,)},
    tile_attention_backbone="ats_attention",
    tile_attention_backbone_kwargs={"widths": (4,)},
    feature_backbone="ats_feature",
    feature_backbone_kwargs={"widths": (8,), "kernels": (3,)},
)


def run(model, source, keys, seed=0):
    views = source.view(keys, model.view_size)
    return model(views, source.level0_sizes(keys), source, keys, torch.Generator().manual_seed(seed))


def small_source():
    g = torch.Generator().manual_seed(2)
    shapes = [(128, 160), (192, 128), (160, 160)]
    images = {
        f"s{i}": (torch.rand(1, h, w, generator=g) * 255).to(torch.uint8)
        for i, (h, w) in enumerate(shapes)
    }
    return TensorPyramidSource.from_images(images, coarsest=64), list(images)


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(
        in_channels=1, view_size=(32, 32), tile_grid=(4, 4), tile_level=0, tile_view=(16, 16),
        patch_size=(8, 8), n_patches=5,
    )
    return create_model("zoom_in", **{**base, **TINY, **kw})


# ------------------------------------------------------------------ geometry tables


@pytest.mark.parametrize(
    "size, grid, tile, box",
    [
        ((500, 500), (5, 5), 0, [0, 0, 100, 100]),
        ((500, 500), (5, 5), 24, [400, 400, 500, 500]),
        ((300, 700), (4, 4), 5, [75, 175, 150, 350]),
        ((301, 703), (2, 2), 3, [150, 351, 301, 703]),
    ],
)
def test_tile_boxes_table(size, grid, tile, box):
    assert tile_boxes(torch.tensor([[tile]]), grid, torch.tensor([size]))[0, 0].tolist() == box


def test_tiles_partition_the_scene():
    sizes = torch.tensor([[301, 703]])
    boxes = tile_boxes(torch.arange(12)[None], (3, 4), sizes)[0]
    cover = torch.zeros(301, 703, dtype=torch.int32)
    for y0, x0, y1, x1 in boxes.tolist():
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


@pytest.mark.parametrize(
    "position, level, size, box",
    [
        (0, 0, (8, 8), [101, 201, 109, 209]),  # centre (105, 205)
        (99, 0, (8, 8), [191, 291, 199, 299]),  # centre (195, 295)
        (0, 1, (4, 4), [102, 202, 110, 210]),  # on level 1's grid
        (45, 0, (50, 50), [120, 230, 170, 280]),  # larger than its cell: crosses the tile
    ],
)
def test_subtile_boxes_table(position, level, size, box):
    tile = torch.tensor([[[100, 200, 200, 300]]])
    got = subtile_boxes(tile, torch.tensor([[position]]), (10, 10), size, level)
    assert got[0, 0].tolist() == box


@pytest.mark.parametrize(
    "alpha, n, tiles",
    [
        ([0.5, 0.3, 0.2], 10, [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]),
        ([0.34, 0.33, 0.33], 4, [0, 0, 1, 2]),  # largest remainder gets the extra draw
        ([0.1, 0.6, 0.3], 3, [1, 1, 2]),
    ],
)
def test_apportion_table(alpha, n, tiles):
    assert apportion(torch.tensor([alpha]), n)[0].tolist() == tiles


def test_complement_is_the_normalised_inverse():
    got = complement(torch.tensor([[0.7, 0.2, 0.1]]))
    assert torch.allclose(got, torch.tensor([[0.3, 0.8, 0.9]]) / 2.0)


# ------------------------------------------------------------------ reads


def test_reads_tile_views_then_subtiles_with_fixed_k():
    shapes = {"a": (128, 128), "b": (128, 192)}
    source = Recording(
        TensorPyramidSource.from_images({k: coded_scene(*s) for k, s in shapes.items()}, coarsest=64)
    )
    torch.manual_seed(0)
    model = ZoomIn(
        in_channels=3, view_size=(32, 32), tile_grid=(4, 4), tile_level=0, tile_view=(32, 32),
        patch_size=(6, 6), n_patches=6, **TINY,
    ).train()
    out = run(model, source, list(shapes), seed=4)
    (tiles_req, tile_views), (sub_req, patches) = source.log
    counts, tiles = out.extras["counts"], out.extras["tiles"]
    m = tiles.shape[1]
    assert tiles_req.boxes.shape == (2, m, 4) and tiles_req.level == 0
    assert sub_req.boxes.shape == (2, 6, 4) and sub_req.size == (6, 6)
    assert (counts.sum(1) == 6).all()  # every scene draws n sub-tiles in total
    sizes = torch.tensor(list(shapes.values()))
    assert torch.equal(tiles_req.boxes, tile_boxes(tiles, (4, 4), sizes))
    for s, (h, w) in enumerate(shapes.values()):
        distinct = int((counts[s] > 0).sum())
        assert (counts[s, distinct:] == 0).all()  # padding comes last, with count 0
        assert (tiles[s, distinct:] == tiles[s, 0]).all()  # and repeats the first tile
        # a tile of scene a is 32 x 32 px (level 0), read at 32 x 32: the exact pixels
        if h == w == 128:
            for k in range(m):
                y0, x0, y1, x1 = tiles_req.boxes[s, k].tolist()
                ys, xs = decode(tile_views[s, k])
                assert ys[0, 0] == y0 and xs[0, 0] == x0 and ys[-1, -1] == y1 - 1
        # each sub-tile is centred inside one of the scene's drawn tiles
        centre = (out.boxes[s, :, :2] + out.boxes[s, :, 2:]) / 2
        inside = (
            (centre[:, None, :] >= tiles_req.boxes[s, None, :, :2] - 1)
            & (centre[:, None, :] <= tiles_req.boxes[s, None, :, 2:] + 1)
        ).all(-1)
        assert inside.any(1).all()
        for k in range(6):
            y0, x0, y1, x1 = out.boxes[s, k].tolist()
            ys, xs = decode(patches[s, k])
            ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w) & (patches[s, k].sum(0) > 0)
            gy = torch.arange(y0, y1)[:, None].expand(6, 6)
            gx = torch.arange(x0, x1)[None, :].expand(6, 6)
            assert torch.equal(ys[ok], gy[ok]) and torch.equal(xs[ok], gx[ok])
    assert torch.allclose(out.weights.sum(1), torch.ones(2))


def test_eval_topk_is_deterministic_and_apportions_the_draws():
    source, keys = small_source()
    model = tiny().eval()
    with torch.no_grad():
        a, b = run(model, source, keys, seed=1), run(model, source, keys, seed=9)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)
    alpha = a.extras["alpha"]
    expected = apportion(alpha, 5)
    for s in range(len(keys)):
        counts = torch.bincount(expected[s], minlength=16)
        got = torch.zeros(16, dtype=torch.int64)
        got[a.extras["tiles"][s]] = a.extras["counts"][s]
        assert torch.equal(got, counts)


def test_training_is_per_scene_whatever_the_batch_and_every_parameter_learns():
    source, keys = small_source()
    model = tiny().train()
    batched = run(model, source, keys, seed=11)
    for i, key in enumerate(keys):
        alone = run(model, source, [key], seed=11)
        assert torch.equal(batched.boxes[i], alone.boxes[0])
        assert torch.allclose(batched.logits[i], alone.logits[0], atol=1e-5)
    model.loss(batched, torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ contrastive loss


def test_contrastive_pass_switches_on_at_its_epoch():
    source, keys = small_source()
    model = tiny(contrastive="multiclass", contrastive_epoch=2).train()
    recorder = Recording(source)
    labels = torch.tensor([0, 1, 2])
    out = run(model, recorder, keys)
    assert len(recorder.log) == 2 and "contrastive_logits" not in out.extras
    base = model.loss(out, labels, epoch=1)
    assert not model.contrastive_live
    model.loss(out, labels, epoch=2)
    assert model.contrastive_live
    out = run(model, recorder, keys)
    assert len(recorder.log) == 2 + 4  # two more reads: inverted tiles and their sub-tiles
    con = out.extras["contrastive_logits"]
    total = model.loss(out, labels, epoch=2)
    assert torch.allclose(total - model.loss(out, labels, epoch=1), model.contrastive_loss(con, labels))
    assert torch.isfinite(base)
    total.backward()
    assert model.tile_attention.body[0].weight.grad.abs().sum() > 0


def test_contrastive_loss_forms():
    model = tiny(contrastive="binary", positive_class=1)
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]))
    labels = torch.tensor([1, 0, 1])
    # binary: only scenes of the positive class, -log(1 - p_positive)
    expected = (-torch.log(torch.tensor(0.7)) - torch.log(torch.tensor(0.5))) / 3
    assert torch.allclose(model.contrastive_loss(logits, labels), expected)
    multi = tiny(contrastive="multiclass", reference_class=0)
    # multiclass: every scene not of the reference class, -log(1 - p_label)
    assert torch.allclose(multi.contrastive_loss(logits, labels), expected)
    every = tiny(contrastive="multiclass")
    expected_all = expected + (-torch.log(torch.tensor(0.8))) / 3
    assert torch.allclose(every.contrastive_loss(logits, labels), expected_all)


# ------------------------------------------------------------------ memory


def inference_peak_bytes(model, source, key) -> tuple[int, int]:
    """(peak bytes allocated, bytes of pixels received) during one eval forward."""
    received = []

    class Counting:
        def read(self, keys, request):
            out = source.read(keys, request)
            received.append(out.numel() * out.element_size())
            return out

    view = source.view([key], model.view_size)
    sizes = source.level0_sizes([key])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(view, sizes, Counting(), [key])
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, sum(received) + view.numel() * view.element_size()


@pytest.mark.parametrize(
    "sizes, level",
    [
        ([[1024, 1024]], (2,)),  # tiles of 256 px: level 3 would fit 32 px, the pyramid stops at 2
        ([[4096, 4096]], (4,)),
        ([[512, 512]], (1,)),  # tiles of 128 px: 32 px at level 2, the pyramid stops at 1
        ([[4096, 4096], [1024, 1024]], (4, 2)),  # one level per scene
    ],
)
def test_auto_tile_level(sizes, level):
    model = tiny(tile_level=None, tile_view=(32, 32))
    assert model.read_level(torch.tensor(sizes)) == level


def test_mnist_variants_build_with_their_setting():
    ats, zoom = create_model("ats_mnist"), create_model("zoom_in_mnist", view_size=(50, 50))
    assert ats.patch_level == zoom.patch_level == 1 and ats.view_size == (100, 100)
    assert zoom.tile_grid == (5, 5) and zoom.view_size == (50, 50)


def test_inference_memory_does_not_grow_with_the_scene():
    torch.manual_seed(0)
    model = ZoomIn(
        in_channels=1, view_size=(64, 64), tile_grid=(4, 4), tile_level=None, tile_view=(32, 32),
        patch_size=(32, 32), patch_level=0, n_patches=4, **TINY,
    ).eval()
    peaks = {}
    for side in (1024, 4096):
        g = torch.Generator().manual_seed(side)
        image = (torch.rand(1, side, side, generator=g) * 255).to(torch.uint8)
        source = TensorPyramidSource.from_images({"x": image})
        peaks[side] = inference_peak_bytes(model, source, "x")
    (peak_1k, pixels_1k), (peak_4k, pixels_4k) = peaks[1024], peaks[4096]
    assert pixels_1k == pixels_4k  # view + K tile views + N patches: fixed sizes
    assert peak_1k > pixels_1k  # the measurement sees the activations, not just the inputs
    # a 16x larger scene: peak within 10 % (allocator noise), far from the 16x of a full read
    assert peak_4k <= 1.1 * peak_1k
    assert peak_4k < 4096 * 4096 * 4 / 16
