"""A tiny registered attention model and labelled scenes for the tracking/packaging tests.

``tiny_test_attention`` is a real ``AttentionModel`` (attention on the view, top-k or sampled
positions, one level-0 read, weighted pooling, linear head) with a few hundred parameters, so
logging, registering and loading it back takes well under a second of compute.
"""

from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F
from torch import nn

from models.memory import TensorPyramidSource
from models.protocol import AttentionModel, ModelOutput, ReadRequest
from models.registry import create_model, register_model

TINY = "tiny_test_attention"


class TinyAttention(AttentionModel):
    """Attention over the view's pixels -> ``k`` level-0 patches -> channel means -> linear."""

    def __init__(
        self, num_classes: int = 2, channels: int = 3, patch: int = 8, k: int = 2, view: int = 16
    ):
        super().__init__()
        self.view_size = (view, view)
        self.patch, self.k = patch, k
        self.attention_net = nn.Conv2d(channels, 1, 3, padding=1)
        self.head = nn.Linear(channels, num_classes)

    def steps(self, views, sizes, generator=None):
        b, _, h, w = views.shape
        att = F.softmax(self.attention_net(views)[:, 0].flatten(1), dim=1)  # (B, h*w)
        if self.training:
            idx = torch.multinomial(att, self.k, replacement=False, generator=generator)
        else:
            idx = att.topk(self.k, dim=1).indices
        cy = (idx // w).float() + 0.5
        cx = (idx % w).float() + 0.5
        # patches centred on the attended cells, kept inside the scene
        y0 = (cy * sizes[:, :1] / h).long() - self.patch // 2
        x0 = (cx * sizes[:, 1:] / w).long() - self.patch // 2
        y0 = torch.minimum(y0.clamp(min=0), sizes[:, :1] - self.patch)
        x0 = torch.minimum(x0.clamp(min=0), sizes[:, 1:] - self.patch)
        boxes = torch.stack([y0, x0, y0 + self.patch, x0 + self.patch], dim=-1)
        patches = yield ReadRequest(boxes, 0, (self.patch, self.patch))
        weights = att.gather(1, idx)
        feats = patches.mean(dim=(-1, -2))  # (B, K, C)
        pooled = (feats * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return ModelOutput(
            self.head(pooled), attention=att.view(b, h, w), boxes=boxes, weights=weights
        )


@register_model(TINY)
def tiny_test_attention(**kwargs) -> TinyAttention:
    return TinyAttention(**kwargs)


def brightness_scenes(n: int = 8, side: int = 48, seed: int = 0):
    """``n`` scenes (3, side, side) uint8, label 1 = bright (>= 160), 0 = dark (<= 90)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = {}, []
    for i in range(n):
        label = i % 2
        low, high = (160, 255) if label else (0, 90)
        images[f"scene_{i}"] = torch.randint(
            low, high + 1, (3, side, side), generator=g, dtype=torch.uint8
        )
        labels.append(label)
    return TensorPyramidSource.from_images(images, coarsest=16), list(images), labels


def brightness_model(sign: float = 1.0) -> TinyAttention:
    """A tiny model whose head thresholds the mean brightness of its patches at 0.5.

    sign=+1 is right on every ``brightness_scenes`` scene, sign=-1 wrong on every one.
    """
    model = create_model(TINY)
    g = torch.Generator().manual_seed(0)  # the same attention net on every call
    with torch.no_grad():
        model.attention_net.weight.copy_(torch.randn(model.attention_net.weight.shape, generator=g))
        model.attention_net.bias.zero_()
        model.head.weight.copy_(sign * torch.tensor([[-10.0] * 3, [10.0] * 3]))
        model.head.bias.copy_(sign * torch.tensor([15.0, -15.0]))
    model.eval()
    return model


def sqlite_uri(directory) -> str:
    """The SQLite tracking URI of ``directory/mlflow.db`` (artifacts go to ``directory/mlruns``)."""
    return f"sqlite:///{directory}/mlflow.db"


def fresh_mlflow_uri(tmp_path_factory, name: str = "mlflow") -> str:
    """A new, empty SQLite tracking URI in a new temporary directory.

    Creating MLflow's schema takes 5-15 s on this machine, so it is built once per test session
    (in pytest's base temp dir) and copied: an empty database file is the same wherever it
    is used.
    """
    from pipeline.track import tracking

    template = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not template.exists():
        template.parent.mkdir(exist_ok=True)
        tracking.mlflow_client(sqlite_uri(template.parent)).search_experiments()
    directory = tmp_path_factory.mktemp(name)
    shutil.copyfile(template, directory / "mlflow.db")
    return sqlite_uri(directory)


def constant_model(label: int, num_classes: int = 2) -> TinyAttention:
    """A tiny model that predicts ``label`` for every scene (its head ignores the pixels)."""
    model = create_model(TINY, num_classes=num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.where(torch.arange(num_classes) == label, 5.0, -5.0))
    model.eval()
    return model
