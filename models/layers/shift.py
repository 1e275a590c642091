"""Random translation of image batches: a training-time augmentation of patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of (N, C, h, w) ``images`` moved by its own whole-pixel offset, drawn
    uniformly from ``[-max_shift, max_shift]`` in y and x; pixels moved in from outside are
    0. Returns (N, C, h, w). ``max_shift`` 0 returns ``images`` itself.

    Out pixel (y, x) of image n is in pixel (y - dy_n, x - dx_n), so a positive offset moves
    the content down and right; gradients flow to the kept pixels.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    n, _, h, w = images.shape
    s = max_shift
    offsets = torch.randint(-s, s + 1, (n, 2), generator=generator)
    padded = F.pad(images, (s, s, s, s))
    rows = torch.arange(h)[None, :] + s - offsets[:, :1]  # (N, h) rows of `padded`
    cols = torch.arange(w)[None, :] + s - offsets[:, 1:]  # (N, w)
    picked = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing put the channels last


def patch_shift_setting(patch_shift: int) -> int:
    """``patch_shift`` of a model's constructor as an int; a negative one is rejected."""
    if patch_shift < 0:
        raise ValueError(f"patch_shift must be >= 0, got {patch_shift}")
    return int(patch_shift)
