"""The generated fMoW-layout sample: layout, determinism, tiny objects, and the property the
demo rests on: the class pattern is plain at levels 0-1 and gone after 8x downsampling."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.fmow import group_layout, parse_fmow_json, relative_keys
from pipeline.store import storage
from pipeline.store.pyramid import downsample2x
from pipeline.synth.fmow_sample import (
    BAD_KINDS,
    GRAIN,
    PATTERNS,
    PERIOD,
    SampleObject,
    SampleScene,
    SampleSpec,
    distractor_mask,
    object_pixels,
    pattern_mask,
    plan_sample,
    render_scene,
    scene_files,
)
from tests.pipeline.fmow_fixtures import make_sample, small_spec


def _blocks(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // PERIOD, PERIOD, w // PERIOD, PERIOD).sum(axis=(1, 3))


@pytest.mark.parametrize("kind", PATTERNS)
def test_every_pattern_covers_half_of_each_8px_block(kind):
    assert (_blocks(pattern_mask(kind, 48, 32)) == PERIOD * PERIOD // 2).all()


def test_distractor_cells_cover_half_of_each_block_and_differ_by_seed():
    a = distractor_mask(np.random.default_rng(1), 40, 24)
    b = distractor_mask(np.random.default_rng(2), 40, 24)
    assert (_blocks(a) == PERIOD * PERIOD // 2).all() and not np.array_equal(a, b)


def _levels(image_hwc: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [np.ascontiguousarray(image_hwc.transpose(2, 0, 1))]
    for _ in range(n):
        levels.append(downsample2x(levels[-1]))
    return levels


def test_objects_of_all_kinds_are_identical_after_8x_downsampling():
    # On the 8 px grid, every class and the distractors average to the same flat colour.
    crops = [object_pixels(pattern_mask(k, 48, 40)) for k in PATTERNS]
    crops.append(object_pixels(distractor_mask(np.random.default_rng(0), 48, 40)))
    coarse = [_levels(c, 3)[3] for c in crops]
    for c in coarse[1:]:
        np.testing.assert_array_equal(c, coarse[0])
    assert np.ptp(coarse[0].reshape(3, -1), axis=1).max() == 0  # flat
    fine = [_levels(c, 1)[1] for c in crops]  # level 1: all still different
    assert len({f.tobytes() for f in fine}) == len(fine)


def _object_features(level: np.ndarray) -> np.ndarray:
    """Mean absolute difference of luminance along y, x and the two diagonals."""
    g = level.astype(np.float32).mean(axis=0)
    return np.array([
        np.abs(np.diff(g, axis=0)).mean(),
        np.abs(np.diff(g, axis=1)).mean(),
        np.abs(g[1:, 1:] - g[:-1, :-1]).mean(),
        np.abs(g[1:, :-1] - g[:-1, 1:]).mean(),
    ])


def test_class_is_readable_at_level_0_and_1_after_jpeg_but_not_at_level_3():
    classes = ("airport", "dam", "port", "stadium", "zoo")  # one per pattern
    spec = SampleSpec(splits=(("train", 10),), classes=classes, size_range=(400, 500),
                      min_long_side=0, large_fraction=0.0)
    feats: dict[int, list] = {0: [], 1: [], 3: []}
    labels = []
    for scene in plan_sample(spec):
        data = dict(scene_files(spec, scene))[scene.image_path]
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        levels = _levels(image, 3)
        for obj in scene.objects:
            if obj.kind == "distractor":
                continue
            labels.append(PATTERNS.index(obj.kind))
            for lv in feats:
                f, m = 2**lv, int(lv < 3)  # a 1 px margin keeps the edges out at levels 0-1
                crop = levels[lv][:, obj.y0 // f + m : obj.y1 // f - m, obj.x0 // f + m : obj.x1 // f - m]
                feats[lv].append(_object_features(crop))
    labels = np.array(labels)
    assert set(labels) == set(range(len(PATTERNS)))
    for lv in (0, 1):  # nearest class centroid on 4 gradient features: every object right
        x = np.stack(feats[lv])
        centroids = np.stack([x[labels == k].mean(0) for k in range(len(PATTERNS))])
        predicted = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        assert (predicted == labels).mean() == 1.0, lv
    # at level 3 the objects are flat: gradients inside are at the JPEG/grain noise level,
    # far below the pattern's contrast at level 0
    assert np.stack(feats[3]).max() < 0.1 * np.stack(feats[0]).min(axis=1).max()


def test_plan_is_deterministic_tiny_objects_apart_and_box_covers_class_objects():
    spec = SampleSpec(splits=(("train", 40), ("val", 10)))
    scenes = plan_sample(spec)
    assert scenes == plan_sample(spec)
    assert scenes != plan_sample(SampleSpec(splits=spec.splits, seed=1))
    large = [s for s in scenes if max(s.height, s.width) > spec.size_range[1]]
    assert len(large) == round(40 * spec.large_fraction) + round(10 * spec.large_fraction) > 0
    for s in scenes:
        lo, hi = spec.large_size_range if s in large else spec.size_range
        assert lo <= s.height <= hi and lo <= s.width <= hi
        assert max(s.height, s.width) >= spec.min_long_side
        cls = [o for o in s.objects if o.kind != "distractor"]
        assert spec.class_objects[0] <= len(cls) <= spec.class_objects[1]
        assert {o.kind for o in cls} == {PATTERNS[spec.classes.index(s.category)]}
        for o in s.objects:
            assert (o.y1 - o.y0) * (o.x1 - o.x0) < 0.01 * s.height * s.width
            assert o.y0 % PERIOD == 0 and o.x0 % PERIOD == 0
            assert 0 < o.y0 < o.y1 < s.height and 0 < o.x0 < o.x1 < s.width
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                assert a.y1 <= b.y0 or b.y1 <= a.y0 or a.x1 <= b.x0 or b.x1 <= a.x0
        y0, x0, y1, x1 = s.box
        assert all(y0 <= o.y0 and o.y1 <= y1 and x0 <= o.x0 and o.x1 <= x1 for o in cls)
    counts = {c: sum(s.category == c for s in scenes if s.split == "train") for c in spec.classes}
    assert set(counts.values()) == {10}  # balanced


def test_render_is_deterministic_and_paints_the_planned_objects():
    spec = small_spec()
    scene = plan_sample(spec)[0]
    image = render_scene(spec, scene)
    assert image.shape == (scene.height, scene.width, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, render_scene(spec, scene))
    obj = next(o for o in scene.objects if o.kind != "distractor")
    crop = image[obj.y0 : obj.y1, obj.x0 : obj.x1].astype(int)
    expected = object_pixels(pattern_mask(obj.kind, obj.y1 - obj.y0, obj.x1 - obj.x0))
    assert np.abs(crop - expected).max() <= GRAIN  # the objects plus grain


def test_written_sample_follows_the_layout_and_json_schema(tmp_path):
    root = str(tmp_path / "fmow")
    spec = small_spec(train=5, val=2)
    scenes = make_sample(root, spec)
    walk = group_layout(relative_keys(root, storage.list_prefix(root)))
    assert walk.ignored == ()
    assert [f.scene_id for f in walk.files] == sorted(f"{s.split}/{s.stem}" for s in scenes)
    single = 0
    for f, s in zip(walk.files, sorted(scenes, key=lambda s: f"{s.split}/{s.stem}"), strict=True):
        doc = json.loads(storage.read_bytes(storage.join_uri(root, f.meta)))
        single += isinstance(doc["bounding_boxes"], dict)
        meta = parse_fmow_json(json.dumps(doc).encode(), f.category)
        assert meta.box == s.box and (meta.height, meta.width) == (s.height, s.width)
        with Image.open(storage.join_uri(root, f.image)) as img:
            assert img.size == (s.width, s.height) and img.format == "JPEG"
    assert single >= 1  # some files hold bounding_boxes as a single object, like real fMoW


def test_second_run_and_parallel_run_write_identical_bytes(tmp_path):
    spec = small_spec(train=3, val=1, bad=2)
    from pipeline.synth.fmow_sample import generate_sample

    list(generate_sample(str(tmp_path / "a"), spec, workers=1))
    list(generate_sample(str(tmp_path / "b"), spec, workers=2))
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert a == b
    for rel in a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_bad_inputs_are_broken_as_named():
    spec = small_spec(train=2, val=0, bad=len(BAD_KINDS))
    bad = [s for s in plan_sample(spec) if s.bad]
    assert sorted(s.bad for s in bad) == sorted(BAD_KINDS)
    for s in bad:
        files = dict(scene_files(spec, s))
        if s.bad == "missing_json":
            assert s.json_path not in files
        elif s.bad == "missing_image":
            assert s.image_path not in files
        elif s.bad == "empty_image":
            assert files[s.image_path] == b""
        elif s.bad == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(files[s.json_path])
        elif s.bad in ("truncated_image", "corrupt_image"):
            with pytest.raises(OSError):
                Image.open(io.BytesIO(files[s.image_path])).load()
        elif s.bad == "unknown_category":
            assert s.category == "ufo_landing_site"


def test_spec_rejects_bad_parameters():
    with pytest.raises(ValueError):
        SampleSpec(classes=tuple(f"c{i}" for i in range(len(PATTERNS) + 1)))
    with pytest.raises(ValueError):
        SampleSpec(object_sides=(20,))
    with pytest.raises(ValueError):
        SampleSpec(size_range=(300, 400))  # long side cannot reach min_long_side
    assert SampleScene("train", 0, "dam", 3, 1, 10, 10, (SampleObject(0, 0, 8, 8, "x"),),
                       (0, 0, 8, 8)).image_path == "train/dam/dam_3/dam_3_1_rgb.jpg"
