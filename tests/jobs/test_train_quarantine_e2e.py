"""End to end: one unreadable scene among many does not end a training run (issue 13).

A tiny fMoW-layout sample ingested into local pyramids; one train scene loses every shard of
level 1 (the level the model's patches come from, its view still reads). ``jobs/train_fmow.py``
with two Ray Train workers then finishes: the MLflow run is FINISHED, ``quarantined_scenes`` is
1 and the run's ``quarantine.json`` names the scene and its ``MissingShardError``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from jobs import ingest_fmow, make_fmow_sample, train_fmow
from pipeline.store.manifest import read_manifest
from pipeline.track import tracking

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EXPERIMENT = "quarantine"
MODEL = (
    "model.overrides={view_size: [32, 32], patch_size: [16, 16], patch_level: 1, n_patches: 4,"
    " attention_backbone: small_cnn, attention_backbone_kwargs: {widths: [8, 8, 8], norm: none},"
    " feature_backbone_kwargs: {widths: [8, 8], kernels: [3, 3]}}"
)


@pytest.fixture
def broken_manifest(tmp_path):
    """8 train + 4 val scenes; the first train scene's level-1 shards deleted. (manifest, uri)."""
    raw, pyr = tmp_path / "raw", tmp_path / "pyr"
    assert make_fmow_sample.main([
        "--out", str(raw), "--train", "8", "--val", "4", "--classes", "airport,dam",
        "--size", "300,400", "--min-long-side", "300", "--large-fraction", "0", "--workers", "1",
    ]) == 0
    assert ingest_fmow.main(["--src", str(raw), "--dst", str(pyr), "--workers", "1",
                             "--coarsest", "64", "--progress-s", "60"]) == 0
    manifest = pyr / "manifest.parquet"
    table = read_manifest(str(manifest)).to_pandas()
    bad = sorted(table[table["split"] == "train"]["uri"])[0]
    shutil.rmtree(f"{bad}/1/c")
    return str(manifest), bad


def test_one_unreadable_scene_is_quarantined_and_the_run_finishes(broken_manifest, tmp_path,
                                                                   monkeypatch, capsys):
    manifest, bad = broken_manifest
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    storage = tmp_path / "runs"
    sets = [f"data.manifest={manifest}", "data.batch_size=2", "data.micro_batches=2",
            "optim.epochs=2", "scaling.num_workers=2", MODEL, f"run.storage_path={storage}",
            "run.name=q", f"run.mlflow_experiment={EXPERIMENT}", "run.max_failures=0"]
    assert train_fmow.main([x for s in sets for x in ("--set", s)]) == 0
    assert "1 scene(s) quarantined" in capsys.readouterr().out
    (run_id,) = tracking.runs_with_key(f"{storage}/q", EXPERIMENT, uri)
    assert tracking.run_info(run_id, uri)["status"] == "FINISHED"
    history = tracking.metric_history(run_id, "quarantined_scenes", uri)
    assert [v for _, v in history] == [1.0, 1.0]
    (record,) = json.loads(tracking.read_artifact_text(run_id, "quarantine.json", uri))
    assert record["scene"] == bad and record["error"] == "MissingShardError"
    assert f"scene {bad} level 1" in record["message"] and record["epoch"] == 0
