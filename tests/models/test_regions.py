"""Region geometry of the glimpse models: exact tables."""

import torch

from models.regions import (
    box_theta,
    crop_resize,
    grid_regions,
    multiscale_windows,
    pyramid_depth,
    read_level,
    sub_region,
    to_level0,
    to_normalised,
)


def test_grid_regions_half_overlap_gives_half_size_regions():
    boxes = grid_regions(3, 0.5)
    starts = [0.0, 0.25, 0.5]
    expected = torch.tensor([[y, x, y + 0.5, x + 0.5] for y in starts for x in starts])
    assert torch.allclose(boxes, expected)


def test_grid_regions_without_overlap_tile_the_square():
    boxes = grid_regions(2, 0.0)
    assert torch.allclose(boxes, torch.tensor([[0, 0, .5, .5], [0, .5, .5, 1], [.5, 0, 1, .5], [.5, .5, 1, 1]]))


def test_multiscale_windows_cover_edge_to_edge():
    boxes = multiscale_windows((0.5, 1.0), 0.5)
    starts = [0.0, 0.25, 0.5]
    expected = [[y, x, y + 0.5, x + 0.5] for y in starts for x in starts] + [[0, 0, 1, 1]]
    assert torch.allclose(boxes, torch.tensor(expected))


def test_sub_region_places_child_in_parent_frame():
    parent = torch.tensor([0.5, 0.0, 1.0, 0.5])
    child = torch.tensor([0.0, 0.5, 0.5, 1.0])
    assert torch.allclose(sub_region(parent, child), torch.tensor([0.5, 0.25, 0.75, 0.5]))


def test_to_level0_rounds_outwards_and_round_trips_on_integers():
    sizes = torch.tensor([[100, 50]])
    boxes = torch.tensor([[[0.105, 0.2, 0.555, 0.9], [0.1, 0.2, 0.5, 0.8]]])
    assert to_level0(boxes, sizes).tolist() == [[[10, 10, 56, 45], [10, 10, 50, 40]]]
    exact = torch.tensor([[[10, 10, 50, 40]]])
    assert torch.equal(to_level0(to_normalised(exact, sizes), sizes), exact)


def test_pyramid_depth_follows_the_build_pyramid_rule():
    assert pyramid_depth((256, 256)) == 1
    assert pyramid_depth((257, 10)) == 2
    assert pyramid_depth((2048, 1000)) == 4
    assert pyramid_depth((300, 300), coarsest=64) == 4


def test_read_level_is_the_coarsest_level_with_enough_pixels_capped_by_the_pyramid():
    box = torch.tensor([[[0, 0, 256, 256]]])
    assert read_level(box, (32, 32), torch.tensor([[2048, 2048]])) == 3
    assert read_level(box, (33, 32), torch.tensor([[2048, 2048]])) == 2  # 256/33 < 8
    assert read_level(box, (32, 32), torch.tensor([[512, 512]])) == 1  # only 2 levels
    assert read_level(box, (32, 32), torch.tensor([[2048, 2048]]), max_level=0) == 0
    two = torch.tensor([[[0, 0, 256, 256]], [[0, 0, 64, 64]]])
    assert read_level(two, (32, 32), torch.tensor([[2048, 2048], [2048, 2048]])) == 1  # finest wins


def test_crop_resize_of_pixel_aligned_box_is_exact_slicing():
    image = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.5]]).expand(2, 2, 4)
    out = crop_resize(image, boxes, (4, 4))
    assert out.shape == (2, 2, 3, 4, 4)
    assert torch.allclose(out[:, 0], image[:, :, 2:6, 4:8], atol=1e-6)
    assert torch.allclose(out[:, 1], image[:, :, 0:4, 0:4], atol=1e-6)


def test_box_theta_of_unit_box_is_identity():
    theta = box_theta(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert torch.allclose(theta, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))
