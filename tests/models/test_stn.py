"""Spatial transformer: identity block, glimpse read exactly where the transform samples."""

import math

import torch
import torch.nn.functional as F

from models.memory import TensorPyramidSource
from models.regions import to_level0
from models.registry import create_model
from models.stn import STNBlock, STNGlimpse, grid_bbox
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


def _model(theta: torch.Tensor, glimpse=(32, 32)) -> STNGlimpse:
    model = STNGlimpse(3, (16, 16), glimpse, backbone=TinyConv(), max_level=0)
    with torch.no_grad():
        model.theta.bias.copy_(theta.reshape(6))
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
    theta = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    model = _model(theta)
    model.read_size = (32, 40)  # the box's own pixel size: no resampling in the read
    out, requests = _run(model, image)
    assert len(requests) == 1 and requests[0].level == 0
    assert out.boxes.tolist() == [[[16, 20, 48, 60]]]
    assert torch.equal(requests[0].boxes, out.boxes)
    expected = _direct_glimpse(image, theta, (32, 32))
    assert torch.allclose(out.extras["glimpse"], expected, atol=1e-5)


def test_rotated_glimpse_reads_the_bounding_box_of_the_rotated_grid():
    image = coordinate_scene(64, 64)
    a = math.radians(30)
    theta = torch.tensor([[0.4 * math.cos(a), -0.4 * math.sin(a), 0.1], [0.4 * math.sin(a), 0.4 * math.cos(a), -0.2]])
    model = _model(theta, glimpse=(24, 24))
    box = to_level0(grid_bbox(theta[None])[:, None], torch.tensor([[64, 64]]))
    side = (box[0, 0, 2:] - box[0, 0, :2]).tolist()
    model.read_size = tuple(side)
    out, requests = _run(model, image)
    assert torch.equal(out.boxes, box)
    half = 0.4 * (math.cos(a) + math.sin(a))  # half extent of the rotated square, in [-1, 1] units
    assert side[0] == side[1] and abs(side[0] - half * 64) <= 2
    expected = _direct_glimpse(image, theta, (24, 24))
    assert torch.allclose(out.extras["glimpse"], expected, atol=1e-4)


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
    assert model.theta.weight.grad.abs().sum() > 0
    assert model.theta.bias.grad.abs().sum() > 0
