"""Manifest and rejects tables: schema, sort order, class list stored twice, by URI."""

from __future__ import annotations

import json

import pytest

from pipeline.store import storage
from pipeline.store.manifest import (
    MANIFEST_SCHEMA,
    level_shapes,
    manifest_table,
    paths_for,
    read_classes,
    read_manifest,
    read_rejects,
    write_manifest,
)

CLASSES = ("airport", "dam")


def _row(scene_id, split="train", category="dam", box=(1, 2, 3, 4)):
    return {
        "scene_id": scene_id, "split": split, "category": category,
        "label": CLASSES.index(category), "uri": f"memory://x/{scene_id}", "height": 300,
        "width": 500, "channels": 3, "num_levels": 2,
        "level_shapes": json.dumps([[300, 500], [150, 250]]),
        "box": list(box) if box else None, "gsd": 0.5 if box else None,
        "timestamp": "2016-01-01T00:00:00Z" if box else None, "source": f"/raw/{scene_id}.jpg",
    }


def test_paths_beside_the_manifest():
    p = paths_for("s3://b/m/fmow.parquet")
    assert (p.classes, p.rejects, p.rejects_csv) == (
        "s3://b/m/fmow.classes.json", "s3://b/m/fmow.rejects.parquet", "s3://b/m/fmow.rejects.csv"
    )


@pytest.mark.parametrize("root", ["local", "memory://manifest-test/run"])
def test_write_and_read_back(root, tmp_path):
    root = str(tmp_path) if root == "local" else root
    uri = storage.join_uri(root, "manifest.parquet")
    rows = [_row("val/b", "val"), _row("train/z", category="airport", box=None), _row("train/a")]
    rejects = [{"scene_id": "train/q", "split": "train", "path": "/raw/q.jpg",
                "kind": "empty_image", "reason": "empty image file /raw/q.jpg (0 bytes)"}]
    paths = write_manifest(uri, rows, CLASSES, rejects)
    table = read_manifest(uri)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert table.column("scene_id").to_pylist() == ["train/a", "train/z", "val/b"]
    assert table.column("label").to_pylist() == [1, 0, 1]
    assert table.column("box").to_pylist() == [[1, 2, 3, 4], None, [1, 2, 3, 4]]
    assert read_classes(uri) == CLASSES
    assert json.loads(storage.read_bytes(paths.classes)) == list(CLASSES)
    assert level_shapes(table.to_pylist()[0]) == [(300, 500), (150, 250)]
    assert read_rejects(uri).to_pylist() == rejects
    assert b"empty_image" in storage.read_bytes(paths.rejects_csv)


def test_empty_rejects_table_is_still_written(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_manifest(uri, [_row("train/a")], CLASSES)
    assert read_rejects(uri).num_rows == 0


def test_label_must_match_the_class_index():
    row = _row("train/a")
    row["label"] = 0
    with pytest.raises(ValueError, match="train/a"):
        manifest_table([row], CLASSES)


def test_written_bytes_do_not_depend_on_row_order(tmp_path):
    rows = [_row("train/a"), _row("train/b"), _row("val/c", "val")]
    write_manifest(str(tmp_path / "1.parquet"), rows, CLASSES)
    write_manifest(str(tmp_path / "2.parquet"), rows[::-1], CLASSES)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
