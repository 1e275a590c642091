"""The pixel protocol's geometry and the in-memory source: exact tables and invariants."""

import pytest
import torch

from models.memory import TensorPyramidSource, build_pyramid, crop_padded, downsample2x
from models.protocol import (
    AttentionModel,
    ModelOutput,
    ReadRequest,
    box_at_level,
    level_shape,
)


def coded_image(h: int, w: int) -> torch.Tensor:
    """(3, h, w) uint8 whose channels encode y % 251, x % 251 and (y + x) % 251."""
    y = torch.arange(h)[:, None].expand(h, w)
    x = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([y % 251, x % 251, (y + x) % 251]).to(torch.uint8)


@pytest.mark.parametrize(
    "box, level, expected",
    [
        ((0, 0, 64, 64), 0, (0, 0, 64, 64)),
        ((0, 0, 64, 64), 1, (0, 0, 32, 32)),
        ((3, 5, 67, 69), 1, (1, 2, 34, 35)),  # floor start, ceil end
        ((-10, -3, 10, 3), 2, (-3, -1, 3, 1)),
    ],
)
def test_box_at_level_table(box, level, expected):
    assert box_at_level(box, level) == expected


def test_level_shape_rounds_up():
    assert level_shape((701, 500), 0) == (701, 500)
    assert level_shape((701, 500), 1) == (351, 250)
    assert level_shape((701, 500), 2) == (176, 125)


def test_downsample2x_is_rounded_mean_with_edge_replication():
    img = torch.tensor([[[0, 1, 10], [2, 3, 20], [4, 5, 30]]], dtype=torch.uint8)
    out = downsample2x(img)
    # blocks: (0,1,2,3) -> 1.5 -> 2 ; (10,10,20,20) -> 15 ; (4,5,4,5) -> 4.5 -> 5 ; (30,30,30,30)
    assert out.tolist() == [[[2, 15], [5, 30]]]


def test_build_pyramid_stops_at_coarsest():
    levels = build_pyramid(torch.zeros((3, 1000, 600), dtype=torch.uint8), coarsest=256)
    assert [tuple(lv.shape[-2:]) for lv in levels] == [(1000, 600), (500, 300), (250, 150)]


def test_crop_padded_zero_outside():
    level = torch.ones((1, 4, 4), dtype=torch.uint8)
    crop = crop_padded(level, -1, 2, 2, 6)
    assert crop.shape == (1, 3, 4)
    assert crop[0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_read_returns_the_pixels_under_the_box():
    img = coded_image(300, 200)
    source = TensorPyramidSource.from_images({"s": img})
    boxes = torch.tensor([[[10, 20, 42, 52], [100, 150, 132, 182]]])
    patches = source.read(["s"], ReadRequest(boxes, level=0, size=(32, 32)))
    assert patches.shape == (1, 2, 3, 32, 32)
    for k, (y0, x0, y1, x1) in enumerate(boxes[0].tolist()):
        assert torch.equal(patches[0, k], img[:, y0:y1, x0:x1].float() / 255)


def test_read_at_level_one_uses_the_halved_level():
    img = coded_image(256, 256)
    source = TensorPyramidSource.from_images({"s": img}, coarsest=64)
    patches = source.read(["s"], ReadRequest(torch.tensor([[[64, 64, 128, 128]]]), 1, (32, 32)))
    expected = downsample2x(img)[:, 32:64, 32:64].float() / 255
    assert torch.equal(patches[0, 0], expected)


def test_read_rejects_mismatched_batch():
    source = TensorPyramidSource.from_images({"s": coded_image(64, 64)})
    with pytest.raises(ValueError, match="keys"):
        source.read(["s", "s"], ReadRequest(torch.zeros((1, 1, 4), dtype=torch.long), 0, (8, 8)))


def test_unknown_scene_names_the_key():
    source = TensorPyramidSource.from_images({"s": coded_image(64, 64)})
    with pytest.raises(KeyError, match="nope"):
        source.level0_sizes(["nope"])


def test_read_request_validates_shapes():
    with pytest.raises(ValueError, match="B, K, 4"):
        ReadRequest(torch.zeros((2, 4)), 0, (8, 8))


class _TwoRoundModel(AttentionModel):
    """Reads one box, then a box whose position depends on the first patch: tests `drive`."""

    def steps(self, views, sizes, generator=None):
        first = yield ReadRequest(torch.tensor([[[0, 0, 1, 1]]]), 0, (1, 1))
        y = int(first[0, 0, 0, 0, 0] * 255)
        second = yield ReadRequest(torch.tensor([[[y, 0, y + 1, 1]]]), 0, (1, 1))
        return ModelOutput(logits=second[:, 0, :, 0, 0])


def test_drive_feeds_each_round_the_previous_answer():
    img = coded_image(64, 64)
    img[0, 0, 0] = 7  # first read sees y=7, second reads row 7
    source = TensorPyramidSource.from_images({"s": img})
    out = _TwoRoundModel()(torch.zeros(1, 3, 8, 8), source.level0_sizes(["s"]), source, ["s"])
    assert torch.equal(out.logits[0], img[:, 7, 0].float() / 255)
