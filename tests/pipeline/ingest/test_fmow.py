"""fMoW layout walking, class lists and JSON parsing: exact tables."""

from __future__ import annotations

import json

import pytest

from pipeline.ingest.engine import BadInput
from pipeline.ingest.fmow import (
    FMOW_CATEGORIES,
    FmowFile,
    class_list,
    fmow_tasks,
    group_layout,
    parse_fmow_json,
    relative_keys,
    walk_fmow,
)
from pipeline.store import storage


def test_categories_are_the_62_sorted_fmow_names():
    assert len(FMOW_CATEGORIES) == 62
    assert list(FMOW_CATEGORIES) == sorted(FMOW_CATEGORIES)
    assert {"airport", "impoverished_settlement", "zoo", "multi-unit_residential"} <= set(
        FMOW_CATEGORIES
    )
    assert "false_detection" not in FMOW_CATEGORIES


def test_group_layout_pairs_images_and_json_and_reports_strays():
    keys = [
        "train/airport/airport_1/airport_1_0_rgb.jpg",
        "train/airport/airport_1/airport_1_0_rgb.json",
        "train/airport/airport_1/airport_1_1_rgb.json",  # JSON without image
        "train/dam/dam_7/dam_7_0_rgb.jpg",  # image without JSON
        "val/dam/dam_3/dam_3_2_rgb.jpg",
        "val/dam/dam_3/dam_3_2_rgb.json",
        "train/airport/airport_1/airport_1_0_msrgb.jpg",  # other product: not ours
        "train/airport/airport_1/airport_1_0_rgb.jpeg",  # second image for one stem
        "train/airport/dam_2/dam_2_0_rgb.jpg",  # site folder of another category
        "README.txt",
    ]
    walk = group_layout(keys)
    assert walk.files == (
        FmowFile("train", "airport", "airport_1_0", keys[0], keys[1]),
        FmowFile("train", "airport", "airport_1_1", None, keys[2]),
        FmowFile("train", "dam", "dam_7_0", keys[3], None),
        FmowFile("val", "dam", "dam_3_2", keys[4], keys[5]),
    )
    assert walk.ignored == tuple(sorted([keys[6], keys[7], keys[8], keys[9]]))
    assert [f.scene_id for f in walk.files][0] == "train/airport_1_0"
    only_val = group_layout(keys, splits=["val"])
    assert [f.scene_id for f in only_val.files] == ["val/dam_3_2"]


def test_fmow_tasks_turn_half_pairs_into_rejects():
    walk = group_layout([
        "train/dam/dam_7/dam_7_0_rgb.jpg",
        "train/dam/dam_8/dam_8_0_rgb.json",
        "train/dam/dam_9/dam_9_0_rgb.jpg",
        "train/dam/dam_9/dam_9_0_rgb.json",
    ])
    tasks = fmow_tasks("s3://bucket/fmow", walk)
    assert [t.reject[0] if t.reject else None for t in tasks] == [
        "missing_json", "missing_image", None
    ]
    assert tasks[2].source == "s3://bucket/fmow/train/dam/dam_9/dam_9_0_rgb.jpg"
    assert tasks[2].meta == "s3://bucket/fmow/train/dam/dam_9/dam_9_0_rgb.json"
    assert tasks[1].source == tasks[1].meta  # the reject points at the file that exists


def test_walk_lists_local_and_memory_roots(tmp_path):
    for root in (str(tmp_path / "fmow"), "memory://walk-test/fmow"):
        for key in ("train/dam/dam_0/dam_0_0_rgb.jpg", "train/dam/dam_0/dam_0_0_rgb.json"):
            storage.write_bytes(storage.join_uri(root, key), b"x")
        walk = walk_fmow(root)
        assert [f.scene_id for f in walk.files] == ["train/dam_0_0"]
        assert walk.files[0].image == "train/dam/dam_0/dam_0_0_rgb.jpg"
    assert relative_keys("s3://b/p", ["s3://b/p/a/x", "s3://b/pq/y"]) == ["a/x"]


def test_class_list_present_fmow62_and_explicit():
    assert class_list(["port", "dam", "ufo", "dam"]) == ("dam", "port")
    assert class_list([], "fmow62") == FMOW_CATEGORIES
    assert class_list([], "port, airport") == ("airport", "port")
    with pytest.raises(ValueError, match="ufo"):
        class_list([], "port,ufo")


def _doc(boxes, **kw):
    doc = {"bounding_boxes": boxes, "img_width": 500, "img_height": 400, "gsd": 0.5,
           "timestamp": "2016-01-02T03:04:05Z", "utm": "31N"}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_parse_json_list_single_object_and_labelled_box():
    box = {"box": [10, 20, 30, 40], "category": "dam", "ID": 7}
    meta = parse_fmow_json(_doc([box]), "dam")
    assert meta.box == (20, 10, 60, 40)  # [x, y, w, h] -> (y0, x0, y1, x1)
    assert (meta.width, meta.height, meta.gsd, meta.box_id) == (500, 400, 0.5, 7)
    assert meta.timestamp == "2016-01-02T03:04:05Z" and meta.utm == "31N"
    assert parse_fmow_json(_doc(box), "dam").box == (20, 10, 60, 40)  # a single object
    false = {"box": [0, 0, 5, 5], "category": "false_detection", "ID": 1}
    assert parse_fmow_json(_doc([false, box]), "dam").box == (20, 10, 60, 40)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'{"bounding_boxes": [', "malformed_json"),
        (b"[1, 2]", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (_doc([]), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "port"}]), "no_labelled_box"),
        (_doc([{"box": [1, 2, 3], "category": "dam"}]), "malformed_json"),
        (_doc([{"box": [600, 2, 3, 4], "category": "dam"}]), "bad_box"),
        (_doc([{"box": [1, 2, 0, 4], "category": "dam"}]), "bad_box"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], img_width=0), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], img_height="400"), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd="abc"), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd="0.5"), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd=float("nan")), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd=-0.5), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd=True), "malformed_json"),
        (_doc([{"box": [1, 2, 3, 4], "category": "dam"}], gsd=[0.5]), "malformed_json"),
    ],
)
def test_parse_json_rejects_bad_documents_with_a_kind(data, kind):
    with pytest.raises(BadInput) as info:
        parse_fmow_json(data, "dam")
    assert info.value.kind == kind


def test_a_gsd_that_is_not_a_positive_number_is_named_and_an_absent_one_is_none():
    box = [{"box": [1, 2, 3, 4], "category": "dam"}]
    with pytest.raises(BadInput, match=r"gsd is 'abc', not a positive number of metres"):
        parse_fmow_json(_doc(box, gsd="abc"), "dam")
    assert parse_fmow_json(_doc(box, gsd=None), "dam").gsd is None
    doc = json.loads(_doc(box))
    del doc["gsd"]
    assert parse_fmow_json(json.dumps(doc).encode(), "dam").gsd is None
    assert parse_fmow_json(_doc(box, gsd=2), "dam").gsd == 2.0


def test_box_is_clipped_to_the_image():
    meta = parse_fmow_json(_doc([{"box": [-5, 390, 20, 30], "category": "dam"}]), "dam")
    assert meta.box == (390, 0, 400, 15)
