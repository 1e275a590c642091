"""Region geometry shared by the glimpse models (TNet, RA-CNN, STN, two-level attention).

Those models reason in *normalised scene coordinates*: a box ``[y0, x0, y1, x1]`` where 0 and 1
are the scene's borders on each axis (y by the height, x by the width), so that the same numbers
describe a region of the view and of every pyramid level. These helpers turn such boxes into the
level-0 integer boxes of a ``ReadRequest`` and pick the pyramid level that serves them at the
resolution the model needs. Pure functions, no parameters, no I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ``models.memory.build_pyramid`` and the Zarr pyramids stop halving once the long side is at
# most this many pixels; a model never asks for a level beyond the coarsest one that exists.
DEFAULT_COARSEST = 256


def pyramid_depth(size0: tuple[int, int], coarsest: int = DEFAULT_COARSEST) -> int:
    """Number of levels of a pyramid of a level-0 (h, w) scene built down to ``coarsest`` px."""
    h, w = int(size0[0]), int(size0[1])
    depth = 1
    while max(h, w) > coarsest:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        depth += 1
    return depth


def grid_regions(grid: int, overlap: float) -> Tensor:
    """The ``grid x grid`` candidate regions of the unit square, each side ``s``, with overlap.

    Neighbours overlap by ``overlap`` of a region's side: ``s = 1 / (1 + (grid - 1)(1 - overlap))``
    (``grid=3, overlap=0.5`` gives half-size regions, i.e. twice the parent's resolution).
    Returns (grid*grid, 4) float ``[y0, x0, y1, x1]`` in row-major order.
    """
    if grid < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"grid must be >= 1 and overlap in [0, 1), got {grid}, {overlap}")
    side = 1.0 / (1.0 + (grid - 1) * (1.0 - overlap))
    starts = torch.arange(grid, dtype=torch.float64) * side * (1.0 - overlap)
    y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
    boxes = torch.stack([y0, x0, y0 + side, x0 + side], dim=-1).reshape(-1, 4)
    return boxes.clamp(0.0, 1.0).float()


def multiscale_windows(scales: tuple[float, ...], stride: float) -> Tensor:
    """Square windows of side ``s`` for each ``s`` in ``scales``, every ``stride * s``.

    Windows cover the unit square edge to edge (the last one of a row touches the border).
    Returns (K, 4) float ``[y0, x0, y1, x1]`` normalised boxes, scale by scale.
    """
    out = []
    for s in scales:
        if not 0.0 < s <= 1.0:
            raise ValueError(f"window scale must be in (0, 1], got {s}")
        n = max(1, math.ceil((1.0 - s) / (stride * s) - 1e-9) + 1)
        starts = torch.linspace(0.0, 1.0 - s, n, dtype=torch.float64) if n > 1 else torch.zeros(1)
        y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
        out.append(torch.stack([y0, x0, y0 + s, x0 + s], dim=-1).reshape(-1, 4))
    return torch.cat(out).float()


def sub_region(parent: Tensor, child: Tensor) -> Tensor:
    """Place ``child`` boxes (normalised to ``parent``) in the parent's frame.

    ``parent`` (..., 4) and ``child`` (..., 4) broadcast; returns (..., 4) normalised boxes.
    """
    py0, px0, py1, px1 = parent.unbind(-1)
    cy0, cx0, cy1, cx1 = child.unbind(-1)
    ph, pw = py1 - py0, px1 - px0
    return torch.stack([py0 + cy0 * ph, px0 + cx0 * pw, py0 + cy1 * ph, px0 + cx1 * pw], dim=-1)


def to_level0(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Normalised (B, K, 4) boxes -> int64 level-0 boxes of scenes of (B, 2) ``sizes``.

    Rounded outwards (floor of the start, ceil of the end) and at least one pixel on each side,
    so the integer box always contains the real one. Boxes may leave the scene (read as zeros).
    """
    scale = sizes.to(torch.float64)[:, None, :].repeat(1, 1, 2)  # (B, 1, 4): h, w, h, w
    px = boxes.to(torch.float64) * scale
    start = torch.floor(px[..., :2] + 1e-6)
    end = torch.maximum(torch.ceil(px[..., 2:] - 1e-6), start + 1)
    return torch.cat([start, end], dim=-1).to(torch.int64)


def to_normalised(boxes0: Tensor, sizes: Tensor) -> Tensor:
    """Level-0 int (B, K, 4) boxes -> float normalised boxes of scenes of (B, 2) ``sizes``."""
    scale = sizes.to(torch.float32)[:, None, :].repeat(1, 1, 2)
    return boxes0.to(torch.float32) / scale


def read_level(
    boxes0: Tensor,
    out_size: tuple[int, int],
    sizes: Tensor,
    coarsest: int = DEFAULT_COARSEST,
    max_level: int | None = None,
) -> int:
    """The coarsest pyramid level that still serves every box at ``out_size`` or finer.

    For each box the level is ``floor(log2(min(box_h / out_h, box_w / out_w)))`` (at that level
    the box spans at least ``out_size`` pixels, so the resize to ``out_size`` never upsamples),
    capped by the deepest level the scene's pyramid has (``pyramid_depth``) and ``max_level``.
    A ``ReadRequest`` has one level for the whole batch, so the finest of them is returned.

    Args:
        boxes0: (B, K, 4) int64 level-0 boxes. sizes: (B, 2) level-0 (h, w) of each scene.
    Returns: a level >= 0.
    """
    if boxes0.numel() == 0:
        return 0
    hw = (boxes0[..., 2:] - boxes0[..., :2]).to(torch.float64).clamp(min=1.0)
    ratio = torch.minimum(hw[..., 0] / out_size[0], hw[..., 1] / out_size[1])
    wanted = torch.floor(torch.log2(ratio.clamp(min=1.0)) + 1e-9).to(torch.int64)  # (B, K)
    depth = torch.tensor([pyramid_depth(tuple(s), coarsest) for s in sizes.tolist()])
    cap = depth - 1 if max_level is None else torch.clamp(depth - 1, max=max_level)
    level = torch.minimum(wanted, cap[:, None]).clamp(min=0)
    return int(level.min())


def crop_resize(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear crops of (B, C, H, W) ``images`` at normalised (B, K, 4) boxes -> (B, K, C, h, w).

    Differentiable in the images and in the boxes; pixels outside the image read as zero. Used to
    cut candidate windows out of the view (no I/O) and to zoom inside a patch that was read.
    """
    b, k = boxes.shape[:2]
    h, w = size
    theta = box_theta(boxes.reshape(b * k, 4))
    grid = torch.nn.functional.affine_grid(theta, [b * k, 1, h, w], align_corners=False)
    # one grid_sample per image: the K grids stacked along the height, no copies of the image
    grid = grid.reshape(b, k * h, w, 2)
    out = torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (B, C, K*h, w)
    return out.reshape(b, images.shape[1], k, h, w).transpose(1, 2)


def box_theta(boxes: Tensor) -> Tensor:
    """Affine ``theta`` (N, 2, 3) mapping ``affine_grid``'s output square onto normalised boxes.

    ``affine_grid`` uses [-1, 1] coordinates (x first); a box ``[y0, x0, y1, x1]`` in [0, 1]
    becomes scale ``(x1 - x0)`` and translation ``x0 + x1 - 1`` on the x axis, likewise for y.
    """
    y0, x0, y1, x1 = boxes.unbind(-1)
    zero = torch.zeros_like(y0)
    row_x = torch.stack([x1 - x0, zero, x0 + x1 - 1.0], dim=-1)
    row_y = torch.stack([zero, y1 - y0, y0 + y1 - 1.0], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)
