"""jobs/ingest_fmow.py end to end: local and S3, rejects and exit codes, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from jobs.ingest_fmow import main
from pipeline.store import pyramid, storage
from pipeline.store.manifest import read_classes, read_manifest, read_rejects
from tests.pipeline.fmow_fixtures import SMALL_CLASSES, make_sample, small_spec

ROOT = Path(__file__).resolve().parents[2]


def test_local_run_with_bad_inputs_exits_3_and_rerun_skips(tmp_path, capsys):
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    make_sample(src, small_spec(train=4, val=2, bad=7))
    assert main(["--src", src, "--dst", dst, "--workers", "2"]) == 3
    err = capsys.readouterr().err
    assert "13 scenes, 6 written, 0 skipped (already complete), 7 rejected" in err
    manifest = f"{dst}/manifest.parquet"
    table = read_manifest(manifest)
    assert table.num_rows == 6 and read_classes(manifest) == SMALL_CLASSES
    assert sorted(set(table.column("split").to_pylist())) == ["train", "val"]
    assert read_rejects(manifest).num_rows == 7
    assert json.loads(Path(f"{dst}/manifest.classes.json").read_text()) == list(SMALL_CLASSES)
    assert main(["--src", src, "--dst", dst]) == 3
    assert "0 written, 6 skipped" in capsys.readouterr().err
    assert read_manifest(manifest).equals(table)


def test_clean_sample_exits_0_and_split_filter_keeps_the_class_list(tmp_path, capsys):
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    make_sample(src, small_spec(train=3, val=1))  # val holds only 'airport'
    manifest = str(tmp_path / "val.parquet")
    assert main(["--src", src, "--dst", dst, "--splits", "val", "--manifest", manifest]) == 0
    table = read_manifest(manifest)
    assert table.column("split").to_pylist() == ["val"]
    assert read_classes(manifest) == SMALL_CLASSES  # counted over every split
    assert "1 written" in capsys.readouterr().err


def test_nothing_to_ingest_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "pyr")]) == 1
    with pytest.raises(SystemExit) as info:
        main(["--src", "x"])
    assert info.value.code == 2


@pytest.mark.s3
def test_s3_source_and_s3_destination(s3_server, tmp_path):  # noqa: F811
    src = s3_server.new_bucket("fmow") + "/fmow-rgb"
    dst = s3_server.new_bucket("pyr") + "/pyramids"
    scenes = make_sample(src, small_spec(train=2, val=1, bad=3))
    assert main(["--src", src, "--dst", dst, "--progress-s", "0"]) == 3
    table = read_manifest(f"{dst}/manifest.parquet")
    assert table.num_rows == 3 and read_rejects(f"{dst}/manifest.parquet").num_rows == 3
    row = table.to_pylist()[0]
    assert row["uri"].startswith(dst) and row["source"].startswith(src)
    group = zarr.open_group(storage.open_store(row["uri"], read_only=True), mode="r",
                            zarr_format=3)
    raw = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["source"]))))
    np.testing.assert_array_equal(group["0"][:], raw.transpose(2, 0, 1))
    assert group["1"].shape == (3, *json.loads(row["level_shapes"])[1])
    plan = next(s for s in scenes if f"{s.split}/{s.stem}" == row["scene_id"])
    assert tuple(row["box"]) == plan.box


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumed_ends_with_the_same_store(tmp_path):
    src = str(tmp_path / "fmow")
    spec = dataclasses.replace(small_spec(train=6, val=2, bad=7), size_range=(500, 800))
    make_sample(src, spec)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, str(ROOT / "jobs/ingest_fmow.py"), "--src", src, "--workers", "1",
           "--progress-s", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([*cmd, "--dst", str(killed)], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    written = 0
    for line in proc.stderr:  # kill it after it has written two scenes, in the middle of a run
        written = int(line.split(" written")[0].rsplit(" ", 1)[1]) if " written," in line else 0
        if written >= 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    complete = [p for p in killed.rglob("zarr.json") if p.parent.parent.parent == killed
                and pyramid.pyramid_complete(str(killed), str(p.parent.relative_to(killed)))]
    assert 2 <= len(complete) < 8 and not (killed / "manifest.parquet").exists()

    resumed = subprocess.run([*cmd, "--dst", str(killed)], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=300)
    assert resumed.returncode == 3, resumed.stderr
    assert f"{len(complete)} skipped" in resumed.stderr
    reference = subprocess.run([*cmd, "--dst", str(whole)], capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=300)
    assert reference.returncode == 3, reference.stderr

    a, b = _store_files(killed), _store_files(whole)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k] != b[k]]
    assert differing == ["manifest.parquet"]  # only because its uri column names the root
    ta, tb = read_manifest(str(killed / "manifest.parquet")), read_manifest(
        str(whole / "manifest.parquet"))
    rows_a = [{**r, "uri": r["uri"].replace(str(killed), "")} for r in ta.to_pylist()]
    rows_b = [{**r, "uri": r["uri"].replace(str(whole), "")} for r in tb.to_pylist()]
    assert rows_a == rows_b and len(rows_a) == 8
    for row in ta.to_pylist():  # and every array reads back equal through zarr
        ga = zarr.open_group(storage.open_store(row["uri"], read_only=True), mode="r")
        gb = zarr.open_group(storage.open_store(str(whole / row["scene_id"]), read_only=True),
                             mode="r")
        for level in range(row["num_levels"]):
            np.testing.assert_array_equal(ga[str(level)][:], gb[str(level)][:])


def test_sample_job_then_ingest_job(tmp_path, capsys):
    from jobs.make_fmow_sample import main as make_sample_main

    src = str(tmp_path / "fmow")
    assert make_sample_main(["--out", src, "--train", "2", "--val", "1", "--size", "300,400",
                             "--min-long-side", "0", "--bad", "2", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "wrote 5 scenes" in err and "(truncated_image)" in err and "(corrupt_image)" in err
    assert main(["--src", src, "--dst", str(tmp_path / "pyr")]) == 3
    assert "3 written, 0 skipped (already complete), 2 rejected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_sample_main(["--out", src, "--classes", "a,b,c,d,e,f"])  # more than 5 patterns
