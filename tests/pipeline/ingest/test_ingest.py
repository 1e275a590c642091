"""The ingest engine: decoding, rejects, resume (skip complete, redo incomplete), progress."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.ingest import fmow
from pipeline.ingest.engine import (
    BadInput,
    IngestReport,
    LoadedScene,
    SceneTask,
    decode_image,
    ingest_scene,
    run_ingest,
    summary,
)
from pipeline.store import pyramid, storage
from pipeline.synth.fmow_sample import overwrite_middle
from tests.pipeline.fmow_fixtures import SMALL_CLASSES, make_sample, small_spec


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_gives_chw_rgb_for_every_mode():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_encode(rgb, "PNG"), "x.png"), rgb.transpose(2, 0, 1))
    grey = rgb[..., 0]
    out = decode_image(_encode(grey, "PNG"), "g.png")
    assert out.shape == (3, 20, 30) and (out == grey[None]).all()
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), "a.png"), rgb.transpose(2, 0, 1))
    wide = (grey.astype(np.uint16) << 8) | 0x7F
    out16 = decode_image(_encode(wide, "TIFF"), "w.tif")
    assert (out16 == grey[None]).all()  # 16-bit keeps the high byte


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty_image"),
        (b"not an image at all", "unreadable_image"),
        ("truncated", "unreadable_image"),
    ],
)
def test_decode_rejects_bad_bytes(data, kind):
    if data == "truncated":
        img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        full = _encode(img, "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(BadInput) as info:
        decode_image(data, "s3://b/x.jpg")
    assert info.value.kind == kind and "s3://b/x.jpg" in str(info.value)


def _fake_loader(task: SceneTask) -> LoadedScene:
    if task.source.endswith("bad"):
        raise BadInput("unreadable_image", f"cannot decode image {task.source}")
    if task.source.endswith("boom"):
        raise RuntimeError("disk on fire")
    seed = int(task.scene_id.rsplit("_", 1)[1])
    image = np.random.default_rng(seed).integers(0, 256, (3, 40, 70), dtype=np.uint8)
    return LoadedScene(image, box=(1, 2, 30, 40), gsd=0.3, timestamp="t", extra={"k": seed})


def test_run_ingest_writes_skips_and_rejects_without_stopping():
    dst = "memory://ingest-engine/pyr"
    tasks = [
        SceneTask("train/s_1", "train", "raw/s_1", "dam"),
        SceneTask("train/s_2", "train", "raw/s_2bad", "dam"),
        SceneTask("train/s_3", "train", "raw/s_3boom", "dam"),
        SceneTask("val/s_4", "val", "raw/s_4", "zoo"),
        SceneTask("val/s_5", "val", "raw/s_5", "port", reject=("missing_json", "no JSON")),
        SceneTask("train/s_1", "train", "raw/s_1again", "dam"),
        SceneTask("val/s_6", "val", "raw/s_6", "airport"),
    ]
    out = io.StringIO()
    report = run_ingest(tasks, _fake_loader, SMALL_CLASSES, dst, coarsest=40, workers=2,
                        progress_s=0.0, out=out)
    assert report.counts == {"written": 2, "skipped": 0, "rejected": 5}
    assert report.reject_kinds == {"duplicate": 1, "error": 1, "missing_json": 1,
                                   "unknown_category": 1, "unreadable_image": 1}
    assert not report.all_in
    errors = {r["scene_id"]: r for r in report.rejects}
    assert "disk on fire" in errors["train/s_3"]["reason"]
    assert errors["train/s_2"]["path"] == "raw/s_2bad"
    rows = {r["scene_id"]: r for r in report.rows}
    assert rows["train/s_1"]["level_shapes"] == json.dumps([[40, 70], [20, 35]])
    assert rows["val/s_6"]["label"] == SMALL_CLASSES.index("airport")
    assert rows["train/s_1"]["box"] == [1, 2, 30, 40]
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[ingest] 7/7 scenes | 2 written, 0 skipped, 5 rejected")
    assert "7 scenes, 2 written" in summary(report)
    # a second run skips both complete scenes and returns the same rows; verbose: a line each
    out = io.StringIO()
    again = run_ingest(tasks, _fake_loader, SMALL_CLASSES, dst, coarsest=40, progress_s=1e9,
                       out=out, verbose=True)
    assert again.counts == {"written": 0, "skipped": 2, "rejected": 5}
    assert sorted(again.rows, key=str) == sorted(report.rows, key=str)
    scenes = [line for line in out.getvalue().splitlines() if not line.startswith("[ingest] 7/7")]
    assert len(scenes) == 7, out.getvalue()
    assert f"[ingest] skipped train/s_1: {rows['train/s_1']['uri']}" in scenes
    assert "[ingest] rejected train/s_3: error: " in "\n".join(scenes)
    level1 = zarr.open_group(storage.open_store(rows["train/s_1"]["uri"], read_only=True),
                             mode="r", zarr_format=3)["1"]
    assert level1.shape == (3, 20, 35)


def test_incomplete_scene_is_rewritten_and_complete_one_is_not():
    dst = "memory://ingest-resume/pyr"
    task = SceneTask("train/s_7", "train", "raw/s_7", "dam")
    first = ingest_scene(task, _fake_loader, SMALL_CLASSES, dst, 32)
    assert first.status == "written"
    assert ingest_scene(task, _fake_loader, SMALL_CLASSES, dst, 32).status == "skipped"
    # simulate a crash before the completion marker: flip it back and damage level 0
    uri = storage.join_uri(dst, "train/s_7")
    meta = json.loads(storage.read_bytes(storage.join_uri(uri, "zarr.json")))
    meta["attributes"]["pipeline"]["complete"] = False
    storage.write_bytes(storage.join_uri(uri, "zarr.json"), json.dumps(meta).encode())
    group = zarr.open_group(storage.open_store(uri, read_only=False), mode="r+", zarr_format=3)
    group["0"][:] = 0
    assert not pyramid.pyramid_complete(dst, "train/s_7")
    redo = ingest_scene(task, _fake_loader, SMALL_CLASSES, dst, 32)
    assert redo.status == "written" and redo.row == first.row
    group = zarr.open_group(storage.open_store(uri, read_only=True), mode="r", zarr_format=3)
    np.testing.assert_array_equal(group["0"][:], _fake_loader(task).image)
    assert pyramid.open_pyramid(uri).attrs["k"] == 7


def test_fmow_sample_with_every_kind_of_bad_input(tmp_path):
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    scenes = make_sample(src, small_spec(train=3, val=2, bad=7))
    walk = fmow.walk_fmow(src)
    classes = fmow.class_list({f.category for f in walk.files})
    assert classes == SMALL_CLASSES
    tasks = fmow.fmow_tasks(src, walk)
    report = run_ingest(tasks, fmow.load_fmow_scene, classes, dst, out=None)
    assert report.counts == {"written": 5, "skipped": 0, "rejected": 7}
    assert report.reject_kinds == {"empty_image": 1, "malformed_json": 1, "missing_image": 1,
                                   "missing_json": 1, "unknown_category": 1,
                                   "unreadable_image": 2}
    by_id = {f"{s.split}/{s.stem}": s for s in scenes}
    for reject in report.rejects:
        assert by_id[reject["scene_id"]].bad is not None
        assert reject["path"].startswith(src) and storage.parse_uri(reject["path"]).scheme == "file"
    for row in report.rows:
        plan = by_id[row["scene_id"]]
        assert (row["height"], row["width"]) == (plan.height, plan.width)
        assert tuple(row["box"]) == plan.box and row["category"] == plan.category
        info = pyramid.open_pyramid(row["uri"])
        assert info.complete and info.attrs["source"] == row["source"]
        assert info.attrs["box_xywh"] == [plan.box[1], plan.box[0],
                                          plan.box[3] - plan.box[1], plan.box[2] - plan.box[0]]


def test_json_size_that_disagrees_with_the_image_is_rejected(tmp_path):
    src = str(tmp_path / "fmow")
    make_sample(src, small_spec(train=1, val=0))
    walk = fmow.walk_fmow(src)
    meta_uri = storage.join_uri(src, walk.files[0].meta)
    doc = json.loads(storage.read_bytes(meta_uri))
    doc["img_width"] += 1
    storage.write_bytes(meta_uri, json.dumps(doc).encode())
    report = run_ingest(fmow.fmow_tasks(src, walk), fmow.load_fmow_scene, SMALL_CLASSES,
                        str(tmp_path / "pyr"), out=None)
    assert report.reject_kinds == {"size_mismatch": 1}


def test_unreadable_scenes_are_rejected_named_and_listed_and_nothing_ingested_is_lost(tmp_path):
    """A 1 x 1 px image (smaller than ``MIN_SCENE_SIDE``) and a non-numeric gsd are rejected
    with the file named; the scenes already in the store stay, and the summary lists both."""
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    make_sample(src, small_spec(train=4, val=0))
    walk = fmow.walk_fmow(src)
    tasks = fmow.fmow_tasks(src, walk)
    first = run_ingest(tasks[:2], fmow.load_fmow_scene, SMALL_CLASSES, dst, out=None)
    assert first.counts == {"written": 2, "skipped": 0, "rejected": 0}
    tiny, stringy = walk.files[2], walk.files[3]
    storage.write_bytes(storage.join_uri(src, tiny.image),
                        _encode(np.full((1, 1, 3), 200, np.uint8), "JPEG"))
    _edit_json(storage.join_uri(src, tiny.meta), img_width=1, img_height=1,
               box=[0, 0, 1, 1])
    _edit_json(storage.join_uri(src, stringy.meta), gsd="not a number")
    report = run_ingest(tasks, fmow.load_fmow_scene, SMALL_CLASSES, dst, out=None)
    assert report.counts == {"written": 0, "skipped": 2, "rejected": 2}
    assert report.reject_kinds == {"malformed_json": 1, "too_small": 1}
    rejects = {r["kind"]: r for r in report.rejects}
    assert rejects["too_small"]["path"] == storage.join_uri(src, tiny.image)
    assert storage.join_uri(src, tiny.image) in rejects["too_small"]["reason"]
    assert "1x1 px" in rejects["too_small"]["reason"]
    assert f"{pyramid.MIN_SCENE_SIDE} px" in rejects["too_small"]["reason"]
    assert rejects["malformed_json"]["path"] == storage.join_uri(src, stringy.meta)
    assert storage.join_uri(src, stringy.meta) in rejects["malformed_json"]["reason"]
    assert "gsd is 'not a number'" in rejects["malformed_json"]["reason"]
    assert all(pyramid.pyramid_complete(dst, t.scene_id) for t in tasks[:2])
    assert not any(storage.exists(storage.join_uri(dst, t.scene_id)) for t in tasks[2:])
    text = summary(report)
    assert "2 rejected" in text
    for reject in report.rejects:
        assert f"[ingest] rejected {reject['path']} ({reject['kind']}): {reject['reason']}" in text


def test_the_summary_lists_at_most_a_screenful_of_rejects():
    rows = tuple({"scene_id": f"s{i}", "split": "train", "path": f"raw/{i}.jpg",
                  "kind": "unreadable_image", "reason": f"cannot decode raw/{i}.jpg"}
                 for i in range(25))
    report = IngestReport((), rows, {"written": 0, "skipped": 0, "rejected": 25},
                          {"unreadable_image": 25}, 1.0)
    text = summary(report, "pyr/manifest.parquet")
    assert text.count("[ingest] rejected raw/") == 20
    assert "5 more rejects: pyr/manifest.rejects.csv" in text


def _edit_json(uri: str, **changes) -> None:
    doc = json.loads(storage.read_bytes(uri))
    for key, value in changes.items():
        if key == "box":
            doc["bounding_boxes"][0]["box"] = value
        else:
            doc[key] = value
    storage.write_bytes(uri, json.dumps(doc).encode())


def test_a_jpeg_with_corrupt_middle_bytes_is_rejected_naming_the_file(tmp_path):
    """Pillow decodes a JPEG whose scan has garbage in the middle without an error (libjpeg
    only warns); the ingest rejects it (strict libjpeg decode) and the other scenes go in.
    Seed 6 is a corruption libjpeg warns about; seeds 0-5 on this scene are ones it does not
    see (the Huffman decoder resynchronises: see ``check_jpeg``)."""
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    make_sample(src, small_spec(train=3, val=0))
    walk = fmow.walk_fmow(src)
    bad = walk.files[1]
    uri = storage.join_uri(src, bad.image)
    broken = overwrite_middle(storage.read_bytes(uri), seed=6)
    with Image.open(io.BytesIO(broken)) as img:
        img.load()  # what the ingest relied on: no error, garbage pixels
    storage.write_bytes(uri, broken)
    report = run_ingest(fmow.fmow_tasks(src, walk), fmow.load_fmow_scene, SMALL_CLASSES, dst,
                        out=None)
    assert report.counts == {"written": 2, "skipped": 0, "rejected": 1}
    (reject,) = report.rejects
    assert reject["kind"] == "unreadable_image" and reject["path"] == uri
    assert f"corrupt JPEG {uri}" in reject["reason"] and "Corrupt JPEG data" in reject["reason"]
    assert not storage.exists(storage.join_uri(dst, bad.scene_id))


def test_the_jpeg_check_leaves_good_jpegs_pixel_identical():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for kw in ({"quality": 90}, {"quality": 75, "progressive": True}, {"subsampling": 0}):
        data = _encode(rgb, "JPEG", **kw)
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(decode_image(data, "x.jpg"), expected)
    grey = _encode(rgb[..., 0], "JPEG")
    assert decode_image(grey, "g.jpg").shape == (3, 40, 56)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    assert decode_image(cmyk.getvalue(), "c.jpg").shape == (3, 40, 56)
