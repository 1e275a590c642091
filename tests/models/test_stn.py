"""Spatial transformer: identity block, glimpse read exactly where the transform samples."""

import math

import torch
import torch.nn.functional as F

from models.memory import TensorPyramidSource
from models.regions import to_level0
from models.registry import create_model
from models.stn import STNBlock, STNGlimpse, glimpse_anchors, grid_bbox
from tests.models.tiny_nets import (
    RecordingSource,
    TinyConv,
    coordinate_scene,
)


def test_block_starts_as_identity_and_its_theta_head_learns():
    torch.manual_seed(0)
    block = STNBlock(4)
    x = torch.rand(2, 4, 9, 7, requires_grad=True)
    out, theta = block(x, return_theta=True)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3))
    assert torch.allclose(out, x, atol=1e-6)
    (out * torch.rand_like(out)).sum().backward()
    assert block.theta.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def _model(scale: float, shift=(0.0, 0.0), glimpse=(32, 32)) -> STNGlimpse:
    """One glimpse of side ``scale`` whose centre is moved by ``shift`` (tanh units) from the
    scene's centre (the head's last layer has zero weights: theta is its bias's)."""
    model = STNGlimpse(3, (16, 16), glimpse, glimpse_scale=scale, backbone=TinyConv(), max_level=0)
    with torch.no_grad():
        model.head.out.bias[1:] = torch.tensor(shift)
    return model.eval()


def _run(model, image):
    source = RecordingSource(TensorPyramidSource.from_images({"a": image}, coarsest=16))
    sizes = source.level0_sizes(["a"])
    out = model(source.view(["a"], model.view_size), sizes, source, ["a"])
    return out, source.requests


def _direct_glimpse(image, theta, size):
    full = image[None].float() / 255.0
    grid = F.affine_grid(theta[None], [1, 3, *size], align_corners=False)
    return F.grid_sample(full, grid, mode="bilinear", align_corners=False)


def test_glimpse_from_the_read_box_equals_sampling_the_whole_scene():
    image = coordinate_scene(64, 80)
    model = _model(0.5)
    model.read_size = (32, 40)  # the box's own pixel size: no resampling in the read
    out, requests = _run(model, image)
    theta = out.extras["theta"][0, 0]
    assert torch.allclose(theta, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]), atol=1e-6)
    assert len(requests) == 1 and requests[0].level == 0
    assert out.boxes.tolist() == [[[16, 20, 48, 60]]]
    assert torch.equal(requests[0].boxes, out.boxes)
    expected = _direct_glimpse(image, theta, (32, 32))
    assert torch.allclose(out.extras["glimpse"][:, 0], expected, atol=1e-5)


def test_off_centre_glimpse_reads_its_box_and_samples_the_scene_there():
    image = coordinate_scene(64, 64)
    model = _model(0.25, shift=(0.5, -1.0), glimpse=(16, 16))
    theta = model.head(torch.zeros(1, 3, 16, 16))[0, 0]
    cx, cy = 0.75 * math.tanh(0.5), 0.75 * math.tanh(-1.0)  # centre (1 - s) tanh(a + u), a = 0
    assert torch.allclose(theta, torch.tensor([[0.25, 0, cx], [0, 0.25, cy]]), atol=1e-6)
    box = to_level0(grid_bbox(theta[None])[:, None], torch.tensor([[64, 64]]))
    model.read_size = tuple((box[0, 0, 2:] - box[0, 0, :2]).tolist())
    out, requests = _run(model, image)
    assert torch.equal(out.boxes, box) and torch.equal(requests[0].boxes, box)
    expected = _direct_glimpse(image, theta, (16, 16))
    assert torch.allclose(out.extras["glimpse"][:, 0], expected, atol=1e-4)


def _boxes_of(model, views):
    theta = model.head(views)
    return grid_bbox(theta.detach().flatten(0, 1)).view(*theta.shape[:2], 4)


def _assert_inside_and_not_empty(boxes, min_side):
    assert float(boxes[..., :2].min()) >= -1e-6 and float(boxes[..., 2:].max()) <= 1 + 1e-6
    sides = boxes[..., 2:] - boxes[..., :2]
    assert float(sides.min()) >= min_side - 1e-6


def test_glimpses_never_leave_the_scene_nor_collapse_whatever_the_weights():
    torch.manual_seed(0)
    model = create_model("stn_mnist")
    views = torch.rand(8, 1, 50, 50)
    for scale in (1.0, 100.0, 1e4):
        with torch.no_grad():
            for p in model.head.parameters():
                p.copy_(torch.randn_like(p) * scale)
        _assert_inside_and_not_empty(_boxes_of(model, views), model.head.min_scale)


def test_glimpses_stay_in_the_scene_when_training_pushes_them_out_and_shrinks_them():
    """Gradient descent on "move right, shrink" with a huge step: the bounds hold (an unbounded
    affine head leaves the scene within a few steps)."""
    torch.manual_seed(0)
    model = create_model("stn_mnist", max_shift=0.0, max_scale=0.5)  # free to go anywhere
    views = torch.rand(4, 1, 50, 50)
    opt = torch.optim.SGD(model.head.parameters(), lr=10.0)
    for _ in range(50):
        theta = model.head(views)
        loss = (theta[..., 0, 0] - theta[..., 0, 2]).mean()  # smaller scale, larger x centre
        opt.zero_grad()
        loss.backward()
        opt.step()
    boxes = _boxes_of(model, views)
    _assert_inside_and_not_empty(boxes, model.head.min_scale)
    assert float(boxes[..., 3].min()) > 0.9  # it did move to the right border


def test_max_shift_keeps_each_glimpse_near_its_anchor_and_inside_the_scene():
    torch.manual_seed(0)
    model = create_model("stn", view_size=(50, 50), in_channels=1, glimpses=4, glimpse_scale=0.2,
                         anchors="contrast", max_shift=0.1)
    views = torch.rand(6, 1, 50, 50)
    anchors = glimpse_anchors(views, 4, "contrast", 10)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn_like(p) * 100)
        theta = model.head(views)
    shift = theta[..., :, 2] - anchors  # (B, K, 2) centre minus anchor, as (x, y)
    inside = 1 - theta[..., 0, 0]
    assert float(shift.abs().max()) <= 0.1 + 1e-6
    assert (theta[..., :, 2].abs() <= inside[..., None] + 1e-6).all()
    _assert_inside_and_not_empty(_boxes_of(model, views), model.head.min_scale)


def test_contrast_anchors_start_the_glimpses_on_the_brightest_cells():
    views = torch.zeros(1, 1, 50, 50)
    views[0, 0, 5:10, 40:45] = 1.0  # cell (row 1, column 8) of a 10 x 10 grid
    model = create_model("stn_mnist", glimpses=1)
    box = _boxes_of(model, views)[0, 0]
    centre_y, centre_x = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    assert abs(centre_y - 0.15) < 0.01 and abs(centre_x - 0.85) < 0.01


def test_read_level_follows_the_glimpse_resolution():
    image = torch.randint(0, 256, (3, 1024, 1024), dtype=torch.uint8)
    model = STNGlimpse(3, (16, 16), (32, 32), glimpse_scale=0.5, backbone=TinyConv()).eval()
    _, requests = _run(model, image)
    # box 512 px for 32 px: level 4 would do, but the pyramid (long side down to 256) has 3 levels
    assert requests[0].level == 2 and requests[0].size == (32, 32)


def test_registered_model_trains_the_localisation_net_through_the_sampler():
    torch.manual_seed(0)
    model = create_model("stn", num_classes=3, view_size=(16, 16), glimpse_size=(8, 8))
    model.features = TinyConv()
    model.classifier = torch.nn.Linear(8, 3)
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)
    out, _ = _run(model.train(), image)
    model.loss(out, torch.tensor([1])).backward()
    assert model.head.out.weight.grad.abs().sum() > 0
    assert model.head.out.bias.grad.abs().sum() > 0
