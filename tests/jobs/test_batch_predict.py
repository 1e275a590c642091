"""``jobs/batch_predict.py``: a registered model over a whole manifest on a local Ray.

One private Ray instance serves the module (starting one costs 10-20 s here). The job's table
holds every manifest row once, in manifest order; its predictions equal ``jobs/predict.py``'s
for the same scenes and seed, also for a model that samples (so they do not depend on which
batch or actor a scene lands in); bytes per scene equal a direct ``Predictor`` read; a scene
whose shards are gone is an error row while the rest are predicted; the table can go to
``s3://`` (SeaweedFS) with the pyramids and manifest there too.
"""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import torch

from jobs import batch_predict, predict
from models.registry import create_model
from pipeline.infer.batch import PREDICTION_SCHEMA
from pipeline.read.reader import ZarrPixelSource
from pipeline.store import storage
from pipeline.store.manifest import read_manifest
from pipeline.track import tracking
from tests.pipeline.infer_fixtures import (
    CLASSES,
    delete_shards,
    write_brightness_manifest,
)
from tests.pipeline.tracking_fixtures import fresh_mlflow_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# a small ATS that samples its patches at inference (inference="sample")
ATS_KWARGS = {
    "num_classes": 2, "view_size": [16, 16], "patch_size": [8, 8], "patch_level": 0,
    "n_patches": 3, "inference": "sample", "attention_backbone": "small_cnn",
    "attention_backbone_kwargs": {"widths": [4, 4], "norm": "none"},
    "feature_backbone_kwargs": {"widths": [4, 4], "kernels": [3, 3]},
}


RAY_LOCAL_CPUS = 3  # the shared ray_local fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """``ats-sample@champion`` (a sampling ATS, randomly initialised: the actors build models
    by registry name, and a test-only model is unknown in their processes) in a fresh SQLite
    MLflow; its tracking URI."""
    uri = fresh_mlflow_uri(tmp_path_factory)
    torch.manual_seed(0)
    tracker = tracking.MlflowTracker("batch-predict", uri)
    tracker.start("k-ats-sample")
    model_uri = tracker.log_model(create_model("ats", **ATS_KWARGS).eval(), classes=CLASSES)
    tracker.register(model_uri, "ats-sample", alias="champion")
    tracker.end()
    return uri


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """9 brightness scenes as local pyramids (3 per split) and their manifest."""
    return write_brightness_manifest(str(tmp_path_factory.mktemp("batch_data")), n=9)


def _run(capsys, registry, *argv):
    code = batch_predict.main([*argv, "--tracking-uri", registry])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines, json.loads(lines[-1])


def _read(uri):
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _predict_py(capsys, registry, model, uris):
    """``jobs/predict.py`` on ``uris`` in one forward pass, seed 0: records by URI."""
    argv = ["--model", model, "--tracking-uri", registry, "--compact", "--seed", "0",
            "--batch-size", str(len(uris))]
    assert predict.main(argv + [x for u in uris for x in ("--uri", u)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {r["key"]: r for r in records}


MODEL = "models:/ats-sample@champion"


def test_every_row_once_predicted_as_predict_py_with_each_scenes_bytes(
    ray_local, registry, manifest, tmp_path, capsys
):
    model = MODEL
    out = str(tmp_path / "predictions.parquet")
    code, lines, summary = _run(capsys, registry, "--model", model, "--manifest", manifest,
                                "--out", out, "--batch-size", "2", "--concurrency", "2")
    assert code == 0, lines
    table = _read(out)
    assert table.schema.remove_metadata() == PREDICTION_SCHEMA
    manifest_table = read_manifest(manifest)
    assert table["scene_id"].to_pylist() == manifest_table["scene_id"].to_pylist()
    assert table["uri"].to_pylist() == manifest_table["uri"].to_pylist()
    assert table["label"].to_pylist() == manifest_table["label"].to_pylist()
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows)
    assert {r["model_version"] for r in rows} == {"1"}
    expected = _predict_py(capsys, registry, model, table["uri"].to_pylist())
    for row in rows:
        want = expected[row["uri"]]
        assert row["predicted"] == want["label"] and row["predicted_class"] == want["class"]
        assert row["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-7)
    bytes_read = table["bytes_read"].to_pylist()
    assert min(bytes_read) > 0
    assert summary["predicted_scenes"] == 9 and summary["failed_scenes"] == 0
    assert summary["bytes_per_scene"] == pytest.approx(sum(bytes_read) / 9)
    assert summary["predictions"] == out
    assert lines[-2].startswith("predicted 9 scenes, 0 failed")
    correct = [r["predicted"] == r["label"] for r in rows]
    assert [r["correct"] for r in rows] == correct
    assert summary["accuracy"] == pytest.approx(sum(correct) / 9)
    predictor = tracking.load_predictor(model, registry)
    for row in rows:  # what a Predictor reading the scene alone with a fresh reader counts
        source = ZarrPixelSource()
        predictor.predict_source(source, [row["uri"]], 1, 0)
        assert row["bytes_read"] == source.counters().bytes


def test_a_broken_scene_is_an_error_row_and_the_rest_are_predicted(
    ray_local, registry, tmp_path, capsys
):
    manifest = write_brightness_manifest(str(tmp_path / "data"), n=6)
    rows = read_manifest(manifest).to_pylist()
    broken = next(r for r in rows if r["label"] == 1 and r["split"] == "train")["uri"]
    assert delete_shards(broken) == 3
    out = str(tmp_path / "p.parquet")
    code, lines, summary = _run(capsys, registry, "--model", MODEL,
                                "--manifest", manifest, "--out", out, "--split", "train",
                                "--concurrency", "1")
    assert code == 0, lines
    table = _read(out).to_pylist()
    assert [r["split"] for r in table] == ["train", "train"]
    errors = {r["uri"]: r["error"] for r in table}
    assert broken in errors[broken] and "missing" in errors[broken]
    assert [e is None for u, e in errors.items() if u != broken] == [True]
    assert (summary["predicted_scenes"], summary["failed_scenes"]) == (1, 1)
    assert summary["accuracy"] == float(next(r["correct"] for r in table if r["uri"] != broken))

    for row in rows:  # every scene broken: the table is still written, the job fails
        delete_shards(row["uri"])
    code, lines, summary = _run(capsys, registry, "--model", MODEL,
                                "--manifest", manifest, "--out", out, "--concurrency", "1")
    assert code == 1
    assert (summary["predicted_scenes"], summary["failed_scenes"]) == (0, 6)
    assert summary["accuracy"] is None
    assert all(r["error"] for r in _read(out).to_pylist())


@pytest.mark.s3
def test_pyramids_manifest_and_predictions_on_s3(ray_local, registry, s3_server, capsys):
    bucket = s3_server.new_bucket("infer")
    manifest = write_brightness_manifest(f"{bucket}/data", n=4)
    out = f"{bucket}/out/predictions.parquet"
    code, lines, summary = _run(capsys, registry, "--model", MODEL,
                                "--manifest", manifest, "--out", out, "--concurrency", "1")
    assert code == 0, lines
    table = _read(out)
    assert table.num_rows == 4 and table["error"].null_count == 4
    assert table["uri"].to_pylist() == read_manifest(manifest)["uri"].to_pylist()
    assert all(u.startswith(f"{bucket}/data/pyramids/") for u in table["uri"].to_pylist())
    assert min(table["bytes_read"].to_pylist()) > 0
    correct = table["correct"].to_pylist()
    assert summary["accuracy"] == sum(correct) / 4 and summary["predictions"] == out
    assert table.schema.metadata[b"model_uri"] == b"models:/ats-sample/1"


def test_a_missing_model_or_split_fails_before_ray_with_its_name(registry, manifest, tmp_path,
                                                                  capsys):
    out = str(tmp_path / "p.parquet")
    argv = ["--manifest", manifest, "--out", out, "--tracking-uri", registry]
    assert batch_predict.main(["--model", "models:/nope@champion", *argv]) == 1
    assert "nope@champion" in capsys.readouterr().err
    assert batch_predict.main(["--model", MODEL, "--split", "dev",
                               *argv]) == 1
    assert "no rows in split 'dev'" in capsys.readouterr().err
    assert batch_predict.main(["--model", MODEL, "--batch-size", "0",
                               *argv]) == 2
