"""The contrast prior: where in an image something differs from its background.

Hard attention over a large, mostly empty scene starts blind: at initialisation a learned score
is nearly constant, so the first locations are uniform and almost all background, and the
classifier has nothing to learn from (bench/learning.py's README section measures this for ATS).
Adding ``strength * contrast_prior`` to the learned scores puts the first reads on structure;
the learned part can move away from it. ATS, TNet, the STN glimpses and two-level attention use
this one function.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def contrast_prior(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, C, h, w) images -> (N, gh, gw) local contrast in [0, 1], 1 at each image's maximum.

    Contrast is ``|x - median of the image|`` averaged over channels and a 3x3 neighbourhood,
    then averaged onto the ``grid``: high where something differs from the background.
    """
    med = images.flatten(2).median(-1).values[..., None, None]
    dev = (images - med).abs().mean(1, keepdim=True)
    dev = F.avg_pool2d(dev, 3, stride=1, padding=1, count_include_pad=False)
    dev = F.adaptive_avg_pool2d(dev, grid)[:, 0]
    return dev / dev.flatten(1).amax(-1).clamp_min(1e-6)[:, None, None]
