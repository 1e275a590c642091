"""The pixel protocol: how a model gets pixels without doing I/O.

Coordinate conventions (written once, here):
- level 0 is full resolution; level ``l`` halves both sides ``l`` times (factor ``2**l``);
  a level's side is ``ceil(side_{l-1} / 2)``.
- y before x everywhere; boxes are ``[y0, x0, y1, x1]`` half-open, in **level-0 pixels**.
- A box may cross the scene border: pixels outside the scene read as 0 (zero padding).
- Pixel tensors are float32 in [0, 1], channels first.

A model is written as a *coroutine* (``AttentionModel.steps``): it yields a ``ReadRequest``
whenever it needs pixels and receives the patches back. ``AttentionModel.forward`` drives the
coroutine against any ``PixelSource`` synchronously; the training loop in ``pipeline/`` drives
many coroutines at once so that reads overlap with compute. Models never see a store.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Boxes to read for every scene of a batch.

    Attributes:
        boxes: (B, K, 4) int64, ``[y0, x0, y1, x1]`` in level-0 pixels, half-open.
        level: pyramid level to read from (0 = full resolution): one for the whole batch, or a
            tuple of B, one per scene (scenes of different sizes read at the level that suits
            each, e.g. Zoom-In's automatic tile level); ``levels`` / ``scene_level`` give it
            per scene either way.
        size: (h, w) output size in pixels; the region ``box / 2**level`` is resized to it
            (see ``resize_patches``) when its shape differs.
    """

    boxes: Tensor
    level: int | tuple[int, ...]
    size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.boxes.ndim != 3 or self.boxes.shape[-1] != 4:
            raise ValueError(f"ReadRequest.boxes must be (B, K, 4), got {tuple(self.boxes.shape)}")
        if isinstance(self.level, tuple) and len(self.level) != self.boxes.shape[0]:
            raise ValueError(f"ReadRequest.level has {len(self.level)} levels for "
                             f"{self.boxes.shape[0]} scenes")
        if min(self.levels, default=0) < 0:
            raise ValueError(f"ReadRequest.level must be >= 0, got {self.level}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"ReadRequest.size must be (h, w) >= 1, got {self.size}")

    @property
    def levels(self) -> tuple[int, ...]:
        """The level of each of the B scenes."""
        if isinstance(self.level, tuple):
            return tuple(int(v) for v in self.level)
        return (int(self.level),) * self.boxes.shape[0]

    def scene_level(self, index: int) -> int:
        """The level of scene ``index`` of the batch."""
        return int(self.level[index]) if isinstance(self.level, tuple) else int(self.level)


@runtime_checkable
class PixelSource(Protocol):
    """Anything that can serve pixels of named scenes (in-memory tensors, Zarr pyramids)."""

    def view(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        """The whole scene of each key resized to ``size``: (B, C, h, w) float32 in [0, 1]."""
        ...

    def read(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        """Patches of each key: (B, K, C, h, w) float32 in [0, 1]; ``len(keys) == B``."""
        ...

    def level0_sizes(self, keys: Sequence[str]) -> Tensor:
        """(B, 2) int64 level-0 (height, width) of each scene."""
        ...


# Optional capabilities of a source. A training loop checks them with ``isinstance`` (the
# protocols are runtime-checkable), so what a source may offer is written down here, once,
# instead of being discovered with ``hasattr`` where it is used.


@runtime_checkable
class SubmittingSource(Protocol):
    """A source that can start a read in the background (reads overlap compute)."""

    def submit(self, keys: Sequence[str], request: ReadRequest) -> Future:
        """Start ``read(keys, request)``; the future gives its (B, K, C, h, w) tensor."""
        ...


@runtime_checkable
class CountingSource(Protocol):
    """A source that counts what it reads (requests, bytes, chunks; see ``ReadCounters``)."""

    def counters(self) -> Any:
        """Counters since the last reset; they add with ``+`` and have ``requests``/``nbytes``."""
        ...


@runtime_checkable
class ClosableSource(Protocol):
    """A source that holds a thread, a process or connections to release at the end."""

    def close(self) -> None:
        """Release what the source holds (a later read may start it again)."""
        ...


def box_at_level(box: Sequence[int], level: int) -> tuple[int, int, int, int]:
    """The pixel range of a level-0 box at ``level``: floor of the start, ceil of the end.

    Returns ``(y0, x0, y1, x1)`` half-open in that level's pixels (possibly outside the scene).
    """
    f = 2**level
    y0, x0, y1, x1 = (int(v) for v in box)
    return y0 // f, x0 // f, -((-y1) // f), -((-x1) // f)


def level_shape(shape0: Sequence[int], level: int) -> tuple[int, int]:
    """(h, w) of ``level`` for a level-0 (h, w): each step halves, rounding up."""
    h, w = int(shape0[0]), int(shape0[1])
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def resize_patches(patches: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (N, C, h, w) float patches to ``size``; identity when the shape already matches.

    Bilinear with antialiasing, so that downscaling averages like a pyramid level would.
    Every ``PixelSource`` must use this, so that all sources return identical tensors.
    """
    if tuple(patches.shape[-2:]) == tuple(size):
        return patches
    return F.interpolate(patches, size=size, mode="bilinear", align_corners=False, antialias=True)


@dataclass
class ModelOutput:
    """What every model returns.

    Attributes:
        logits: (B, num_classes) class scores.
        attention: (B, h, w) attention probabilities over the view's positions, or None.
        boxes: (B, K, 4) int64 level-0 boxes that were read for the final patches, or None.
        weights: (B, K) float weight of each box in the prediction, or None.
        aux: named loss terms that the model adds to the classification loss, already scaled
            by their strength (entropy regulariser, REINFORCE term, ...). Scalars.
        extras: anything model-specific a ``loss`` needs (log-probabilities, per-level logits).
    """

    logits: Tensor
    attention: Tensor | None = None
    boxes: Tensor | None = None
    weights: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)


Steps = Generator[ReadRequest, Tensor, ModelOutput]


@dataclass(frozen=True, slots=True)
class Proposal:
    """A model's first read, drawn ahead of time so that it can be read while the weights change.

    ``AttentionModel.propose`` makes it with the current weights; ``steps(..., proposal=p)``
    then yields this very ``p.request`` object as its first read (the reader of ``pipeline``
    recognises its prefetched patches by it) and weights the draws from ``probs`` to its own
    attention; why that stays unbiased: ``models.sampling.importance_ratio``.

    Attributes:
        request: the ``ReadRequest`` of the drawn locations.
        positions: (B, n) int64 drawn positions, in draw order.
        probs: (B, P) the distribution they were drawn from (no gradient).
    """

    request: ReadRequest
    positions: Tensor
    probs: Tensor


def drive(steps: Steps, source: PixelSource, keys: Sequence[str]) -> ModelOutput:
    """Run a model coroutine to the end, serving each ``ReadRequest`` from ``source``."""
    try:
        request = next(steps)
        while True:
            request = steps.send(source.read(keys, request))
    except StopIteration as stop:
        return stop.value


class AttentionModel(torch.nn.Module):
    """Base class of every registered model.

    Subclasses implement ``steps``; ``loss`` defaults to cross-entropy plus ``output.aux``.
    ``view_size`` is the (h, w) of the low-resolution view the model expects.
    """

    view_size: tuple[int, int] = (128, 128)

    def steps(
        self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None
    ) -> Steps:
        """Model coroutine.

        Args:
            views: (B, C, h, w) float32 views of whole scenes, ``(h, w) == self.view_size``.
            sizes: (B, 2) int64 level-0 (height, width) of each scene.
            generator: random generator for sampling (None: torch's default).
        Yields ``ReadRequest``; receives (B, K, C, h, w) patches; returns ``ModelOutput``.
        """
        raise NotImplementedError

    def propose(
        self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None
    ) -> Proposal | None:
        """Draw the first read's locations now, with the current weights (no gradient).

        Args and shapes as ``steps``. Models that can use draws made with other weights
        (``steps(..., proposal=...)``, unbiased by ``models.sampling.importance_ratio``)
        return a ``Proposal`` and consume ``generator`` exactly as ``steps`` would; the rest
        return None (the default) and the caller reads the usual way.
        """
        return None

    def forward(
        self,
        views: Tensor,
        sizes: Tensor,
        source: PixelSource,
        keys: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> ModelOutput:
        return drive(self.steps(views, sizes, generator), source, keys)

    def loss(self, output: ModelOutput, labels: Tensor, epoch: int = 0) -> Tensor:
        """Scalar training loss: cross-entropy + every aux term. ``epoch`` gates schedules."""
        total = F.cross_entropy(output.logits, labels)
        for term in output.aux.values():
            total = total + term
        return total

    def begin_epoch(self, epoch: int) -> None:
        """Hook before each training epoch (e.g. an alternating schedule). Default: nothing."""

    def end_step(self, output: ModelOutput, labels: Tensor) -> None:
        """Hook after the optimiser step (e.g. a running baseline update). Default: nothing."""
