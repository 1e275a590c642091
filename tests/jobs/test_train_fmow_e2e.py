"""End to end: a tiny fMoW-layout sample ingested into pyramids on the S3 server, trained by
``jobs/train_fmow.py`` with two CPU Ray Train workers, tracked and registered in MLflow.

One Ray instance serves the whole module (starting one costs 10-20 s here). The tests:
- a run in which rank 1 kills its own process mid-training finishes (``max_failures=1``) with
  ONE MLflow run holding the params, per-epoch metrics, artifacts, and a registered version
  with its alias; the model loaded back from the registry predicts what the checkpoint predicts;
- a run interrupted the same way with no restarts allowed fails, and re-running the same job
  resumes from its checkpoint (epoch 0 is not trained twice) into the same MLflow run;
- (no Ray) the S3 server's request count over one training epoch equals the reader's counters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.http_proxy import CountingProxy
from jobs import ingest_fmow, make_fmow_sample, train_fmow
from pipeline.store.manifest import read_classes, read_manifest
from pipeline.track import tracking
from pipeline.train.checkpoint import load_model, read_meta
from pipeline.train.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.ray]

EXPERIMENT = "e2e"
# a small, fast ATS: 32 px view, 4x4 attention grid, 4 patches of 16 px at level 1
MODEL = (
    "model.overrides={view_size: [32, 32], patch_size: [16, 16], patch_level: 1, n_patches: 4,"
    " attention_backbone: small_cnn, attention_backbone_kwargs: {widths: [8, 8, 8], norm: none},"
    " feature_backbone_kwargs: {widths: [8, 8], kernels: [3, 3]}}"
)


@pytest.fixture(scope="module")
def s3_manifest(s3_server, tmp_path_factory):
    """8 train + 4 val scenes of 300-400 px, ingested into a fresh bucket; the manifest URI."""
    raw = tmp_path_factory.mktemp("fmow_raw")
    assert make_fmow_sample.main([
        "--out", str(raw), "--train", "8", "--val", "4", "--classes", "airport,dam",
        "--size", "300,400", "--min-long-side", "300", "--large-fraction", "0", "--workers", "1",
    ]) == 0
    bucket = s3_server.new_bucket("e2e")
    assert ingest_fmow.main(["--src", str(raw), "--dst", f"{bucket}/pyr", "--workers", "2",
                             "--coarsest", "64", "--progress-s", "60"]) == 0
    return f"{bucket}/pyr/manifest.parquet"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _args(manifest, storage, name, *extra):
    sets = [
        f"data.manifest={manifest}", "data.batch_size=2", "data.micro_batches=2",
        "optim.epochs=2", "optim.lr=0.003", "scaling.num_workers=2", MODEL,
        f"run.storage_path={storage}", f"run.name={name}", f"run.mlflow_experiment={EXPERIMENT}",
        *extra,
    ]
    return [x for s in sets for x in ("--set", s)]


def _checkpoint_probs(checkpoint_dir, uris):
    from pipeline.read.reader import ZarrPixelSource

    model = load_model(checkpoint_dir)
    source = ZarrPixelSource()
    views = source.view(uris, model.view_size)
    with torch.no_grad():
        out = model(views, source.level0_sizes(uris), source, uris, torch.Generator().manual_seed(0))
    return out.logits.softmax(-1).numpy()


def test_killed_worker_run_finishes_with_one_mlflow_run_and_registered_model(
    s3_manifest, ray_local, mlflow_uri, tmp_path, capsys
):
    storage = tmp_path / "runs"
    # 4 train scenes per worker, batch 2: 2 steps per epoch; rank 1 dies after step 3 (epoch 1)
    argv = _args(s3_manifest, storage, "killed", "run.crash_at_step=3", "run.max_failures=1")
    assert train_fmow.main([*argv, "--register", "e2e-model", "--alias", "champion"]) == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "bytes read per sample" in out
    assert (storage / "killed" / "crash.marker").exists(), "the worker was never killed"

    run_key = f"{storage}/killed"
    runs = tracking.runs_with_key(run_key, EXPERIMENT, mlflow_uri)
    assert len(runs) == 1, f"expected one MLflow run, got {runs}"
    info = tracking.run_info(runs[0], mlflow_uri)
    assert info["status"] == "FINISHED"
    assert info["params"]["model.name"] == "ats"
    assert info["params"]["data.batch_size"] == "2"
    assert info["params"]["model.overrides.num_classes"] == "2"
    # epoch 0 was checkpointed before the kill: logged once, not trained again after the restart
    assert [s for s, _ in tracking.metric_history(runs[0], "train/loss", mlflow_uri)] == [0, 1]
    for key in ("train/loss", "val/accuracy", "train/bytes_per_sample", "train/data_wait_fraction",
                "train/samples_per_s", "train/requests_per_sample"):
        history = tracking.metric_history(runs[0], key, mlflow_uri)
        assert sorted({step for step, _ in history}) == [0, 1], (key, history)
    assert tracking.metric_history(runs[0], "train/bytes_per_sample", mlflow_uri)[-1][1] > 0
    artifacts = tracking.list_artifacts(runs[0], None, mlflow_uri)
    assert "config.yaml" in artifacts, artifacts
    assert any(a.startswith("val_scenes") for a in artifacts), artifacts

    version = tracking.alias_version(mlflow_uri, "e2e-model", "champion")
    assert version is not None
    uris = list(read_manifest(s3_manifest).to_pandas().query("split == 'val'")["uri"])
    records = tracking.load_pyfunc("models:/e2e-model@champion", mlflow_uri).predict(uris)
    registry_probs = np.array([r["probabilities"] for r in records])
    checkpoint = sorted(p for p in (storage / "killed").glob("checkpoint_*") if p.is_dir())[-1]
    assert read_meta(checkpoint)["step"] == 4
    np.testing.assert_allclose(registry_probs, _checkpoint_probs(checkpoint, uris), atol=1e-5)


def test_interrupted_run_resumes_from_its_checkpoint(s3_manifest, ray_local, mlflow_uri, tmp_path):
    from pipeline.train.driver import run_training

    storage = tmp_path / "runs"
    argv = _args(s3_manifest, storage, "resume", "run.crash_at_step=3", "run.max_failures=0")
    config = load_config(None, argv[1::2])
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death in its own types
        run_training(config)
    run_key = f"{storage}/resume"
    (run_id,) = tracking.runs_with_key(run_key, EXPERIMENT, mlflow_uri)
    assert tracking.run_info(run_id, mlflow_uri)["status"] == "FAILED"
    assert [s for s, _ in tracking.metric_history(run_id, "train/loss", mlflow_uri)] == [0]

    outcome = run_training(config)  # the marker exists: no second crash
    assert outcome.run_id == run_id
    assert tracking.runs_with_key(run_key, EXPERIMENT, mlflow_uri) == [run_id]
    assert tracking.run_info(run_id, mlflow_uri)["status"] == "FINISHED"
    # epoch 0 came from the checkpoint: it was logged once, by the first attempt
    assert [s for s, _ in tracking.metric_history(run_id, "train/loss", mlflow_uri)] == [0, 1]
    assert read_meta(outcome.checkpoint_dir)["step"] == 4
    assert outcome.metrics["epoch"] == 1.0


def test_s3_request_count_of_an_epoch_matches_the_reader_counters(s3_manifest, s3_server, monkeypatch):
    """No Ray: one training epoch through a counting proxy in front of the S3 server."""
    from models.registry import create_model
    from pipeline.read.reader import ZarrPixelSource
    from pipeline.train.data import split_rows
    from pipeline.train.loop import StepRunner, train_epoch

    config = load_config(None, [MODEL])
    model = create_model("ats", num_classes=len(read_classes(s3_manifest)), **config.model.overrides)
    rows = split_rows(read_manifest(s3_manifest), "train")
    with CountingProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        source = ZarrPixelSource(concurrency=8)
        views = source.view(list(rows["key"]), model.view_size).numpy()
        batches = [{**{k: v[i : i + 4] for k, v in rows.items()}, "view": views[i : i + 4]}
                   for i in range(0, len(views), 4)]
        runner = StepRunner(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                            source=source, micro_batches=2)
        before = proxy.counts()["total"]
        stats = train_epoch(runner, batches, epoch=0)
        served = proxy.counts()["total"] - before
    assert stats.requests > 0
    # exact unless the reader hedged (a batch's stragglers went a few round trips, or a batch
    # hedge_after_s, without an answer): then the hedges' other copies may reach the server
    # too (used answers are counted once)
    assert stats.requests <= served <= stats.requests + stats.hedges, (
        f"S3 served {served} requests, reader counted {stats.requests} (+{stats.hedges} hedges)")
    assert dataclasses.asdict(source.counters())["requests"] >= stats.requests


def test_same_seed_gives_the_same_run_on_two_workers(s3_manifest, ray_local, mlflow_uri, tmp_path):
    """Two runs with one seed and two workers log the same per-epoch metrics: which worker sees
    which scene, and in what order, does not depend on timing."""
    from pipeline.train.driver import run_training

    keys = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
    histories = []
    for name in ("seed-a", "seed-b"):
        argv = _args(s3_manifest, tmp_path / "runs", name, "run.seed=3")
        outcome = run_training(load_config(None, argv[1::2]))
        histories.append({k: [round(v, 3) for _, v in tracking.metric_history(outcome.run_id, k, mlflow_uri)]
                          for k in keys})
    assert all(len(histories[0][k]) == 2 for k in keys), histories[0]
    assert histories[0] == histories[1]
