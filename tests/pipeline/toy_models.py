"""Tiny attention models for the training-system tests (not registered: tests build them directly).

``ToyAttention`` has the shape of ATS: attention on the view, positions sampled with the given
generator, one read round (or two with ``rounds=2``, like Zoom-In), a score-function term so the
attention network gets gradients, and a running baseline buffer updated in ``end_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.protocol import AttentionModel, ModelOutput, ReadRequest


class ToyAttention(AttentionModel):
    """View (C, 16, 16) -> attention over 256 positions -> ``n`` patches of ``patch`` px at level 0."""

    view_size = (16, 16)

    def __init__(self, num_classes: int = 2, patch: int = 8, n: int = 2, rounds: int = 1):
        super().__init__()
        self.patch, self.n, self.rounds = patch, n, rounds
        self.attention = nn.Conv2d(3, 1, 3, padding=1)
        self.features = nn.Linear(3, 8)
        self.head = nn.Linear(8, num_classes)
        self.register_buffer("baseline", torch.zeros(()))
        self.spec = {"name": "toy", "kwargs": {"num_classes": num_classes, "patch": patch, "n": n,
                                               "rounds": rounds}}

    def _boxes(self, idx, sizes, side, offset=None):
        h, w = self.view_size
        cy = (idx // w).float().add(0.5) * sizes[:, :1].float() / h
        cx = (idx % w).float().add(0.5) * sizes[:, 1:].float() / w
        if offset is not None:
            cy, cx = cy + offset, cx + offset
        half = side / 2
        return torch.stack([cy - half, cx - half, cy + half, cx + half], -1).floor().long()

    def steps(self, views, sizes, generator=None):
        logits = self.attention(views).flatten(1)
        probs = logits.softmax(-1)
        idx = torch.multinomial(probs.detach(), self.n, replacement=True, generator=generator)
        boxes = self._boxes(idx, sizes, self.patch)
        patches = yield ReadRequest(boxes, 0, (self.patch, self.patch))
        if self.rounds == 2:  # a second, data-dependent round, like Zoom-In's stage II
            shift = (patches.mean((-1, -2, -3)) > 0.5).long() * self.patch
            boxes = self._boxes(idx, sizes, self.patch, offset=shift)
            patches = yield ReadRequest(boxes, 0, (self.patch, self.patch))
        f = torch.tanh(self.features(patches.mean((-1, -2))))  # (B, n, 8)
        logp = probs.gather(1, idx).clamp_min(1e-12).log()
        # score-function term: value equals the mean feature, gradient reaches the attention
        feature = (f + (logp - logp.detach())[..., None] * f.detach()).mean(1)
        return ModelOutput(
            logits=self.head(feature),
            attention=probs.view(-1, *self.view_size),
            boxes=boxes,
            weights=torch.full(idx.shape, 1.0 / self.n),
        )

    def end_step(self, output: ModelOutput, labels: torch.Tensor) -> None:
        correct = (output.logits.argmax(-1) == labels).float().mean()
        self.baseline.mul_(0.9).add_(0.1 * correct)


class ViewOnly(AttentionModel):
    """A model that reads nothing (like a low-resolution CNN): its coroutine returns at once."""

    view_size = (16, 16)

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        self.spec = {"name": "view_only", "kwargs": {"num_classes": num_classes}}

    def steps(self, views, sizes, generator=None):
        return ModelOutput(logits=self.head(views.mean((-1, -2))))
        yield  # pragma: no cover  (makes this a generator)


def toy_images(n: int, size: int = 64, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``n`` uint8 (3, size, size) scenes; label 1 scenes hold a bright 8 px square somewhere."""
    g = torch.Generator().manual_seed(seed)
    images, labels = {}, []
    for i in range(n):
        image = (torch.rand(3, size, size, generator=g) * 80).to(torch.uint8)
        label = i % 2
        if label:
            y, x = torch.randint(0, size - 8, (2,), generator=g).tolist()
            image[:, y : y + 8, x : x + 8] = 250
        images[f"scene-{i:03d}"] = image
        labels.append(label)
    return images, labels


def loss_of(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, labels)


class ToySourceFactory:
    """Picklable factory of an in-memory source over ``toy_images(n, size, seed)`` keyed
    ``mem://scene-NNN`` (the manifest of ``write_toy_manifest`` uses the same keys)."""

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __call__(self):
        from models.memory import TensorPyramidSource

        images, _ = toy_images(self.n, self.size, self.seed)
        return TensorPyramidSource.from_images({f"mem://{k}": v for k, v in images.items()}, coarsest=16)


def write_toy_manifest(uri: str, n: int, size: int = 64, seed: int = 0, n_val: int = 4) -> str:
    """A manifest of ``toy_images`` (the last ``n_val`` scenes are the val split)."""
    from pipeline.store.manifest import write_manifest

    _, labels = toy_images(n, size, seed)
    classes = ["plain", "square"]
    rows = []
    for i, label in enumerate(labels):
        rows.append({
            "scene_id": f"scene-{i:03d}", "split": "val" if i >= n - n_val else "train",
            "category": classes[label], "label": label, "uri": f"mem://scene-{i:03d}",
            "height": size, "width": size, "channels": 3, "num_levels": 3,
            "level_shapes": "[]", "box": [0, 0, 1, 1], "gsd": None, "timestamp": None, "source": "toy",
        })
    write_manifest(uri, rows, classes)
    return uri
