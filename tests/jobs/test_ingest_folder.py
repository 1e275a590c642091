"""jobs/ingest_folder.py: a plain folder of images + labels CSV -> pyramids + manifest."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from jobs.ingest_folder import main
from pipeline.ingest.folder import folder_class_list, parse_labels_csv, scene_id_for
from pipeline.store import storage
from pipeline.store.manifest import read_classes, read_manifest, read_rejects


def _image(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path, array, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_folder_with_mixed_formats_bad_rows_and_unlabelled_images(tmp_path, capsys):
    src, dst = tmp_path / "imgs", str(tmp_path / "pyr")
    rgb, grey = _image(1, (300, 200, 3)), _image(2, (120, 500))
    _save(src / "a.png", rgb, "PNG")
    _save(src / "sub/b.tif", grey, "TIFF")
    _save(src / "c.jpg", _image(3, (64, 64, 3)), "JPEG")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _save(src / "stray.png", rgb, "PNG")  # not in the CSV
    (src / "labels.csv").write_text(
        "path,label,split\n"
        "a.png,10,train\n"
        "sub/b.tif,2,val\n"
        "c.jpg,2,\n"
        "broken.jpg,10,train\n"
        "missing.png,2,train\n"
    )
    assert main(["--src", str(src), "--dst", dst, "--progress-s", "0"]) == 3
    err = capsys.readouterr().err
    assert "1 images not in" in err and "stray.png" in err
    manifest = f"{dst}/manifest.parquet"
    assert read_classes(manifest) == ("2", "10")  # integer labels in numeric order
    rows = {r["scene_id"]: r for r in read_manifest(manifest).to_pylist()}
    assert sorted(rows) == ["train/a", "train/c", "val/sub/b"]
    assert rows["train/a"]["label"] == 1 and rows["val/sub/b"]["label"] == 0
    assert rows["train/a"]["box"] is None and rows["train/a"]["gsd"] is None
    group = zarr.open_group(storage.open_store(rows["train/a"]["uri"], read_only=True),
                            mode="r", zarr_format=3)
    np.testing.assert_array_equal(group["0"][:], rgb.transpose(2, 0, 1))
    grey_group = zarr.open_group(storage.open_store(rows["val/sub/b"]["uri"], read_only=True),
                                 mode="r", zarr_format=3)
    assert grey_group["0"].shape == (3, 120, 500) and grey_group["1"].shape == (3, 60, 250)
    kinds = {r["scene_id"]: r["kind"] for r in read_rejects(manifest).to_pylist()}
    assert kinds == {"train/broken": "unreadable_image", "train/missing": "missing_image"}


def test_explicit_classes_reject_other_labels_and_missing_csv_is_fatal(tmp_path):
    src = tmp_path / "imgs"
    _save(src / "x.png", _image(4, (50, 60, 3)), "PNG")
    _save(src / "y.png", _image(5, (50, 60, 3)), "PNG")
    (src / "labels.csv").write_text("path,label\nx.png,cat\ny.png,dog\n")
    dst = str(tmp_path / "pyr")
    assert main(["--src", str(src), "--dst", dst, "--classes", "cat"]) == 3
    assert read_rejects(f"{dst}/manifest.parquet").column("kind").to_pylist() == [
        "unknown_category"
    ]
    (src / "labels.csv").unlink()
    assert main(["--src", str(src), "--dst", dst]) == 1


def test_csv_parsing_and_scene_ids():
    rows = parse_labels_csv(b"\xef\xbb\xbfpath,label\nA b/c d.PNG,x\n", "l.csv")
    assert scene_id_for(rows[0]) == "train/A_b/c_d"
    assert folder_class_list(["b", "a", "b"]) == ("a", "b")
    assert folder_class_list(["10", "9", "-1"]) == ("-1", "9", "10")
    for bad in (b"file,label\nx,y\n", b"path,label\nx,\n"):
        with pytest.raises(ValueError, match="l.csv"):
            parse_labels_csv(bad, "l.csv")
