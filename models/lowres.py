"""The low-resolution baseline: a CNN that classifies the view alone and reads nothing else.

It is the control of every attention model: same view, same protocol, no patches. If an
attention model does not beat it, its patches carry no information the view lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from models.backbones import build_backbone
from models.protocol import AttentionModel, ModelOutput, Steps
from models.registry import register_model


class LowResCNN(AttentionModel):
    """Backbone on the view -> global pool -> linear. ``steps`` yields no ``ReadRequest``.

    Args:
        num_classes: classes of the linear head.
        view_size: (h, w) of the view it classifies.
        in_channels: channels of the view.
        backbone: a ``models.backbones.build_backbone`` name.
        pool: "avg" or "max" global pooling of the feature map.
        backbone_kwargs: extra arguments of the backbone (``se``, ``cbam``, ``widths``, ...).
    """

    def __init__(
        self,
        num_classes: int = 10,
        view_size: Sequence[int] = (128, 128),
        in_channels: int = 3,
        backbone: str = "small_cnn",
        pool: str = "avg",
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"lowres_cnn: pool must be 'avg' or 'max', got {pool!r}")
        self.view_size = (int(view_size[0]), int(view_size[1]))
        self.pool = pool
        self.body = build_backbone(backbone, in_channels=in_channels, **(backbone_kwargs or {}))
        self.head = nn.Linear(self.body.out_channels, num_classes)

    def classify(self, views: Tensor) -> Tensor:
        """(B, C, h, w) views -> (B, num_classes) logits."""
        fmap = self.body(views)
        pooled = fmap.mean(dim=(-2, -1)) if self.pool == "avg" else fmap.amax(dim=(-2, -1))
        return self.head(pooled)

    def steps(
        self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None
    ) -> Steps:
        """Classify the view; no read (the coroutine returns at its first ``next``)."""
        if tuple(views.shape[-2:]) != self.view_size:
            raise ValueError(
                f"lowres_cnn expects views of {self.view_size}, got {tuple(views.shape[-2:])}"
            )
        yield from ()
        return ModelOutput(logits=self.classify(views))


@register_model("lowres_cnn")
def lowres_cnn(**kwargs: Any) -> LowResCNN:
    """The low-resolution-only CNN baseline (keyword arguments of ``LowResCNN``)."""
    return LowResCNN(**kwargs)
