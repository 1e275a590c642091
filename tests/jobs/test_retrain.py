"""Scheduled retraining promotes a new model only when it beats the current champion.

Two tiny registered models on labelled in-memory scenes: one right on every scene (accuracy 1),
one wrong on every scene (accuracy 0), in a SQLite MLflow in a temporary directory.
"""

import json
from types import SimpleNamespace

import pytest

from pipeline.track import promotion, tracking
from pipeline.train.config import TrainConfig
from tests.pipeline.tracking_fixtures import (
    brightness_model,
    brightness_scenes,
    constant_model,
    fresh_mlflow_uri,
)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return fresh_mlflow_uri(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluate(uri):
    source, keys, labels = brightness_scenes()
    return promotion.registered_evaluator(source, keys, labels, tracking_uri=uri, batch_size=4)


def _train_fn(uri, sign, experiment="retrain"):
    """What the trainer does: one MLflow run that logs the final model; returns its outcome."""

    def train():
        tracker = tracking.MlflowTracker(experiment, uri)
        run_id = tracker.start(f"runs/retrain-{sign}-{id(tracker)}")
        model_uri = tracker.log_model(brightness_model(sign), classes=["dark", "bright"])
        tracker.end()
        return SimpleNamespace(run_id=run_id, model_uri=model_uri, registered_version=None)

    return train


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "higher", "promoted"),
    [
        (0.5, None, 0.0, True, True),
        (0.81, 0.80, 0.0, True, True),
        (0.80, 0.80, 0.0, True, False),  # a tie keeps the champion
        (0.805, 0.80, 0.01, True, False),
        (0.82, 0.80, 0.01, True, True),
        (0.40, 0.50, 0.0, False, True),  # loss: lower wins
        (0.50, 0.40, 0.0, False, False),
        (float("nan"), None, 0.0, True, False),
    ],
)
def test_decide_rule(candidate, champion, margin, higher, promoted):
    assert promotion.decide(candidate, champion, margin, higher)[0] is promoted


def test_decide_rejects_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        promotion.decide(1.0, 0.0, -0.1)


def test_first_model_becomes_champion(uri, evaluate):
    decision = promotion.retrain(
        _train_fn(uri, -1.0), evaluate, "first", tracking_uri=uri, experiment="retrain"
    )
    assert decision.promoted and decision.champion_version is None
    assert decision.candidate_score == 0.0 and decision.reason == "no champion yet"
    assert tracking.alias_version(uri, "first", "champion") == "1"


def test_better_candidate_takes_the_alias(uri, evaluate):
    promotion.retrain(
        _train_fn(uri, -1.0), evaluate, "better", tracking_uri=uri, experiment="retrain"
    )
    decision = promotion.retrain(
        _train_fn(uri, 1.0), evaluate, "better", margin=0.5, tracking_uri=uri, experiment="retrain"
    )
    assert decision.promoted
    assert (decision.candidate_version, decision.champion_version) == ("2", "1")
    assert (decision.candidate_score, decision.champion_score) == (1.0, 0.0)
    assert tracking.alias_version(uri, "better", "champion") == "2"
    assert tracking.alias_version(uri, "better", "previous_champion") == "1"
    tags = tracking.version_tags(uri, "better", "2")
    assert tags["retrain.promoted"] == "True"
    assert tags["retrain.candidate_score"] == "1.0" and tags["retrain.champion_score"] == "0.0"
    assert tags["retrain.champion_version"] == "1" and tags["retrain.margin"] == "0.5"
    # the candidate's training run records the same decision and both scores
    run = tracking.run_info(tags["pipeline.run_id"], uri)
    assert run["tags"]["retrain.promoted"] == "True"
    assert run["metrics"] == {"retrain/candidate_accuracy": 1.0, "retrain/champion_accuracy": 0.0}


def test_worse_candidate_is_rejected_and_recorded(uri, evaluate):
    promotion.retrain(
        _train_fn(uri, 1.0), evaluate, "worse", tracking_uri=uri, experiment="retrain"
    )
    decision = promotion.retrain(
        _train_fn(uri, -1.0), evaluate, "worse", tracking_uri=uri, experiment="retrain"
    )
    assert not decision.promoted
    assert (decision.candidate_score, decision.champion_score) == (0.0, 1.0)
    assert tracking.alias_version(uri, "worse", "champion") == "1"
    assert tracking.alias_version(uri, "worse", "candidate") == "2"
    assert tracking.alias_version(uri, "worse", "previous_champion") is None
    tags = tracking.version_tags(uri, "worse", "2")
    assert tags["retrain.promoted"] == "False"
    assert tags["retrain.reason"] == "candidate gain -1 is not above margin 0"


def test_equal_candidate_does_not_win_the_tie(uri, evaluate):
    promotion.retrain(_train_fn(uri, 1.0), evaluate, "tie", tracking_uri=uri, experiment="retrain")
    decision = promotion.retrain(
        _train_fn(uri, 1.0), evaluate, "tie", tracking_uri=uri, experiment="retrain"
    )
    assert not decision.promoted and decision.candidate_score == decision.champion_score == 1.0
    assert tracking.alias_version(uri, "tie", "champion") == "1"


def test_loss_metric_and_bad_metric(uri, evaluate):
    promotion.retrain(
        _train_fn(uri, -1.0),
        evaluate,
        "by-loss",
        metric="loss",
        tracking_uri=uri,
        experiment="retrain",
    )
    decision = promotion.retrain(
        _train_fn(uri, 1.0),
        evaluate,
        "by-loss",
        metric="loss",
        tracking_uri=uri,
        experiment="retrain",
    )
    assert decision.promoted and decision.candidate_score < decision.champion_score
    with pytest.raises(ValueError, match="metric"):
        promotion.promote_if_better("by-loss", "2", evaluate, metric="f1", tracking_uri=uri)


def test_train_fn_without_a_model_is_an_error(uri, evaluate):
    with pytest.raises(RuntimeError, match="neither"):
        promotion.retrain(lambda: SimpleNamespace(run_id=None), evaluate, "none", tracking_uri=uri)


def test_job_config_is_a_fresh_run_registered_as_candidate():
    from jobs import retrain as job

    config = job.retrain_config(TrainConfig(), "fmow-ats", None)
    assert config.run.name.startswith(f"{TrainConfig().run.name}-retrain-")
    assert (config.run.register_name, config.run.register_alias) == ("fmow-ats", "candidate")
    assert job.retrain_config(TrainConfig(), "m", "nightly-7").run.name == "nightly-7"


def test_job_rejects_bad_arguments(tmp_path, capsys):
    from jobs import retrain as job

    with pytest.raises(SystemExit):
        job.main([])  # --register is required
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  no_such_key: 1\n")
    assert job.main(["--config", str(bad), "--register", "m"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_manifest(tmp_path_factory):
    """A tiny fMoW-layout sample (2 train, 6 val scenes, 2 classes) ingested to a local dir."""
    from jobs import ingest_fmow, make_fmow_sample

    root = tmp_path_factory.mktemp("fmow")
    sample = ["--out", str(root / "raw"), "--train", "2", "--val", "6", "--classes", "airport,dam"]
    sample += [
        "--size",
        "300,400",
        "--min-long-side",
        "300",
        "--large-fraction",
        "0",
        "--workers",
        "1",
    ]
    assert make_fmow_sample.main(sample) == 0
    ingest = ["--src", str(root / "raw"), "--dst", str(root / "pyr"), "--workers", "1"]
    assert ingest_fmow.main([*ingest, "--coarsest", "64", "--progress-s", "60"]) == 0
    return str(root / "pyr" / "manifest.parquet")


def _val_labels(manifest: str, limit: int) -> list[int]:
    from pipeline.store.manifest import read_manifest
    from pipeline.train import data

    return [int(v) for v in data.split_rows(read_manifest(manifest), "val", limit)["label"]]


def test_job_main_wires_training_validation_split_and_promotion(
    uri, local_manifest, monkeypatch, capsys
):
    """``jobs/retrain.py`` end to end with the training replaced by tiny logged models that
    always answer one class: candidates are registered as ``candidate``, scored on the
    manifest's val split (``data.limit`` rows) through the Zarr reader, and the alias moves
    only for the better one."""
    from jobs import retrain as job

    labels = _val_labels(local_manifest, limit=4)
    accuracy = {c: sum(v == c for v in labels) / len(labels) for c in (0, 1)}
    assert accuracy[0] != accuracy[1], (
        "the val rows must be unbalanced for this test to mean anything"
    )
    best, worst = sorted((0, 1), key=accuracy.get, reverse=True)
    answers = iter([worst, best, worst])
    configs = []

    def fake_run_training(config, ray_temp_dir=None, verbose=False):
        configs.append(config)
        tracker = tracking.MlflowTracker(config.run.mlflow_experiment, uri)
        run_id = tracker.start(f"{config.run.storage_path}/{config.run.name}")
        model_uri = tracker.log_model(constant_model(next(answers)), classes=["airport", "dam"])
        version = tracker.register(model_uri, config.run.register_name, config.run.register_alias)
        tracker.end()
        return SimpleNamespace(run_id=run_id, model_uri=model_uri, registered_version=version)

    monkeypatch.setattr("pipeline.train.driver.run_training", fake_run_training)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    argv = ["--set", f"data.manifest={local_manifest}", "--set", "data.limit=4"]
    argv += ["--set", "run.mlflow_experiment=job", "--register", "job-model", "--json"]

    def run(name):
        assert job.main([*argv, "--run-name", name]) == 0
        out = capsys.readouterr().out
        return json.loads(out.splitlines()[-1]), out

    first, _ = run("nightly-1")
    assert first["promoted"] and first["candidate_score"] == accuracy[worst]
    second, out = run("nightly-2")
    assert second["promoted"] and "PROMOTED" in out
    assert (second["candidate_score"], second["champion_score"]) == (
        accuracy[best],
        accuracy[worst],
    )
    third, out = run("nightly-3")
    assert not third["promoted"] and "kept the champion" in out
    assert tracking.alias_version(uri, "job-model", "champion") == "2"
    assert tracking.alias_version(uri, "job-model", "candidate") == "3"
    assert tracking.version_tags(uri, "job-model", "3")["retrain.promoted"] == "False"
    assert [c.run.name for c in configs] == ["nightly-1", "nightly-2", "nightly-3"]
    assert {(c.run.register_name, c.run.register_alias) for c in configs} == {
        ("job-model", "candidate")
    }
