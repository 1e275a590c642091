"""``bench/many_scenes.py``'s pieces without Ray: the overhead arithmetic, the ingest lines it
reads (made by the ingest engine itself), and the small manifest."""

from __future__ import annotations

import io

import pytest

from bench import many_scenes
from pipeline.ingest.engine import IngestReport, Outcome, _Progress, summary
from pipeline.store.manifest import read_classes, read_manifest, write_manifest

TIMINGS = {"open_s": 0.5, "train_datasets_s": 9.5, "val_datasets_s": 1.0, "fit_s": 40.0}
METRICS = {
    "train/pass_s": 30.0,
    "train/step_s": 26.0,
    "train/storage_wait_s": 2.0,
    "train/batch_wait_s": 3.0,
    "train/steps": 12.0,
}


def test_overhead_is_setup_plus_epoch_minus_compute_per_scene():
    f = many_scenes.overhead(TIMINGS, METRICS, scenes=200)
    assert f["setup_s"] == 10.0 and f["compute_s"] == 24.0
    assert f["overhead_s"] == 10.0 + 30.0 - 24.0
    assert f["per_scene_s"] == 16.0 / 200
    # the parts add up: batch wait + reader wait + the loop's own time = epoch - compute
    assert (
        f["batch_wait_s"] + f["storage_wait_s"] + f["loop_other_s"] == f["epoch_s"] - f["compute_s"]
    )
    assert f["batch_wait_per_batch_s"] == 3.0 / 12 and f["fit_other_s"] == 10.0


def test_compare_takes_the_small_run_with_the_least_overhead():
    small = [
        {"scenes": 200, "overhead_s": 28.0, "per_scene_s": 0.14},
        {"scenes": 200, "overhead_s": 20.0, "per_scene_s": 0.1},
    ]
    large = {"scenes": 5000, "overhead_s": 504.0, "per_scene_s": 504.0 / 5000}
    c = many_scenes.compare(large, small)
    assert c["small_per_scene_s"] == 0.1 and c["small_mean_per_scene_s"] == pytest.approx(0.12)
    assert c["ratio"] == pytest.approx((504.0 / 5000) / 0.1)
    assert c["ratio_to_mean"] == pytest.approx((504.0 / 5000) / 0.12)
    assert c["marginal_per_scene_s"] == pytest.approx((504.0 - 20.0) / 4800)


def test_reads_the_ingest_engines_own_progress_and_summary_lines():
    progress = _Progress(total=10, every_s=0.0, out=io.StringIO())
    for i, status in enumerate(("written", "written", "skipped")):
        progress.add(Outcome(status, {}, pixels=100), now=progress.start + 1.0 + i / 2)
    now = progress.start + 2.0
    seen = many_scenes.parse_progress(progress.line(now))
    assert (seen["done"], seen["total"], seen["written"], seen["skipped"]) == (3, 10, 2, 1)
    assert seen["rate"] == 1.5 and seen["eta_s"] == pytest.approx(progress.eta(now), abs=0.5)
    assert many_scenes.parse_progress("[ingest] 3 scenes, 4 classes") is None
    report = IngestReport(
        rows=(),
        rejects=(),
        counts={"written": 7, "skipped": 3, "rejected": 0},
        reject_kinds={},
        seconds=12.5,
    )
    assert many_scenes.parse_summary(summary(report, "m.parquet")) == {
        "seconds": 12.5,
        "scenes": 10,
        "written": 7,
        "skipped": 3,
    }
    with pytest.raises(ValueError):
        many_scenes.parse_summary("[ingest] killed")


def _row(i: int, split: str) -> dict:
    return {
        "scene_id": f"s{i}",
        "split": split,
        "category": "a",
        "label": 0,
        "uri": f"/p/s{i}",
        "height": 200,
        "width": 250,
        "channels": 3,
        "num_levels": 3,
        "level_shapes": "[[200, 250], [100, 125], [50, 63]]",
        "box": None,
        "gsd": None,
        "timestamp": None,
        "source": f"/r/s{i}.jpg",
    }


def test_small_manifest_keeps_n_train_scenes_and_every_val_scene(tmp_path):
    full = str(tmp_path / "full.parquet")
    write_manifest(
        full,
        [_row(i, "train") for i in range(30)] + [_row(i, "val") for i in range(30, 33)],
        ["a", "b"],
    )
    out = many_scenes.small_manifest(full, str(tmp_path / "small.parquet"), 12, seed=1)
    rows = read_manifest(out).to_pylist()
    train = [r["scene_id"] for r in rows if r["split"] == "train"]
    assert len(train) == 12 and len(set(train)) == 12
    assert [r["scene_id"] for r in rows if r["split"] == "val"] == ["s30", "s31", "s32"]
    assert read_classes(out) == ("a", "b")
    again = many_scenes.small_manifest(full, str(tmp_path / "again.parquet"), 12, seed=1)
    assert read_manifest(again).equals(read_manifest(out))  # seeded
    with pytest.raises(ValueError):
        many_scenes.small_manifest(full, str(tmp_path / "x.parquet"), 31)


def test_an_unknown_eta_reads_as_none():
    line = "[ingest] 1/5008 scenes | 1 written, 0 skipped, 0 rejected | 0.04 scenes/s, 0.0 Mpx/s | elapsed 26 s, eta ? s"
    assert many_scenes.parse_progress(line)["eta_s"] is None
