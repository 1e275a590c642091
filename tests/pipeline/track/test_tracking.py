"""MLflow tracking: one run per training run (resume, worker restart), params, metrics, artifacts.

Everything runs against a SQLite tracking URI in a temporary directory: no server.
"""

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.track import tracking
from pipeline.track.tracking import MlflowTracker, NullTracker, flatten_params
from tests.pipeline.tracking_fixtures import fresh_mlflow_uri

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return fresh_mlflow_uri(tmp_path_factory)


@dataclasses.dataclass(frozen=True)
class _Inner:
    lr: float = 0.001
    sizes: tuple = (1, 2)


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str = "ats"
    optim: _Inner = _Inner()
    overrides: dict = dataclasses.field(default_factory=lambda: {"k": 3, "deep": {"x": None}})


def test_flatten_params_dotted_json_values():
    assert flatten_params(_Config()) == {
        "name": "ats",
        "optim.lr": "0.001",
        "optim.sizes": "[1, 2]",
        "overrides.k": "3",
        "overrides.deep.x": "null",
    }
    assert flatten_params({"a": {}, "p": Path("/x")}) == {"a": "{}", "p": "/x"}
    long = flatten_params({"v": "x" * 7000})["v"]
    assert len(long) == tracking.MAX_PARAM_VALUE and long.endswith("...")


def test_default_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri() == f"sqlite:///{ROOT / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.sqlite_artifact_root("http://127.0.0.1:5000", "e") is None
    assert (
        tracking.sqlite_artifact_root("sqlite:////a/b/m.db", "my exp")
        == "file:///a/b/mlruns/my_exp"
    )


def test_null_tracker_records_nothing():
    null = NullTracker()
    assert null.start("k", params={"a": 1}) is None
    null.log_metrics({"a": 1.0}, step=0)
    null.log_image(b"png", "x/y.png")
    null.log_confusion(np.eye(2), None, step=0)
    assert null.log_model(object()) is None
    assert null.register("models:/x", "n", "champion") is None
    null.end("FAILED")
    assert null.run_id is None
    assert tracking.make_tracker(False).__class__ is NullTracker
    assert isinstance(
        tracking.make_tracker(True, "e", tracking_uri="sqlite:///x.db"), MlflowTracker
    )


def test_one_run_per_key_across_resume(uri):
    first = MlflowTracker("resume", uri)
    run_id = first.start("/runs/store/job-a", params=_Config(), run_name="job-a")
    first.log_metrics({"train/loss": 1.0, "val/accuracy": 0.25}, step=0)
    first.end("FAILED")  # the driver died

    resumed = MlflowTracker("resume", uri)
    assert resumed.start("/runs/store/job-a", params=_Config()) == run_id
    assert tracking.run_info(run_id, uri)["status"] == "RUNNING"
    resumed.log_metrics({"train/loss": 0.5, "val/accuracy": 0.75}, step=1)
    resumed.end()

    other = MlflowTracker("resume", uri)
    assert other.start("/runs/store/job-b") != run_id
    assert tracking.runs_with_key("/runs/store/job-a", "resume", uri) == [run_id]

    info = tracking.run_info(run_id, uri)
    assert info["status"] == "FINISHED"
    assert info["params"]["optim.lr"] == "0.001"
    assert info["params"]["overrides.deep.x"] == "null"
    assert info["tags"][tracking.RUN_KEY_TAG] == "/runs/store/job-a"
    assert info["tags"]["mlflow.runName"] == "job-a"
    assert tracking.metric_history(run_id, "train/loss", uri) == [(0, 1.0), (1, 0.5)]
    assert tracking.metric_history(run_id, "val/accuracy", uri) == [(0, 0.25), (1, 0.75)]


def test_changed_param_on_resume_is_a_tag_not_an_error(uri):
    tracker = MlflowTracker("changed", uri)
    run_id = tracker.start("k-changed", params={"optim": {"epochs": 2}, "seed": 1})
    tracker.start("k-changed", params={"optim": {"epochs": 5}, "seed": 1})
    info = tracking.run_info(run_id, uri)
    assert info["params"] == {"optim.epochs": "2", "seed": "1"}
    assert info["tags"]["param_changed.optim.epochs"] == "5"
    assert "param_changed.seed" not in info["tags"]


def test_nan_metrics_are_skipped(uri):
    tracker = MlflowTracker("nan", uri)
    run_id = tracker.start("k-nan")
    tracker.log_metrics({"a": float("nan"), "b": 2}, step=3)
    assert tracking.metric_history(run_id, "b", uri) == [(3, 2.0)]
    assert tracking.metric_history(run_id, "a", uri) == []


def test_artifacts_config_pictures_confusion(uri, tmp_path):
    tracker = MlflowTracker("artifacts", uri)
    run_id = tracker.start("k-art")
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: ats\n")
    tracker.log_artifact_file(config)
    tracker.log_image(b"\x89PNG fake", "val_scenes/epoch_000/scene_1.png")
    tracker.log_json({"a": 1}, "extra/info.json")
    tracker.log_confusion(np.array([[2, 1], [0, 3]]), ["dark", "bright"], step=4)
    assert sorted(tracking.list_artifacts(run_id, tracking_uri=uri)) == [
        "config.yaml",
        "confusion/epoch_004.csv",
        "confusion/epoch_004.json",
        "confusion/epoch_004.png",
        "extra/info.json",
        "val_scenes/epoch_000/scene_1.png",
    ]
    root = Path(tracking.run_info(run_id, uri)["artifact_uri"].removeprefix("file://"))
    assert root.is_relative_to(Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / "artifacts")
    assert json.loads((root / "confusion/epoch_004.json").read_text())["matrix"] == [[2, 1], [0, 3]]
    assert (root / "val_scenes/epoch_000/scene_1.png").read_bytes() == b"\x89PNG fake"
    with pytest.raises(ValueError, match="relative"):
        tracker.log_bytes(b"x", "../escape.txt")
    with pytest.raises(FileNotFoundError, match="no file"):
        tracker.log_artifact_file(tmp_path / "missing.yaml")


def test_tracker_pickles_as_ids_and_attaches(uri):
    driver = MlflowTracker("pickle", uri)
    run_id = driver.start("k-pickle")
    _ = driver.client  # a live client must not travel
    worker = pickle.loads(pickle.dumps(driver))
    assert worker.run_id == run_id and worker._client_cache is None
    worker.log_metrics({"x": 1.0}, step=0)
    assert tracking.metric_history(run_id, "x", uri) == [(0, 1.0)]
    fresh = MlflowTracker("pickle", uri)
    fresh.attach(run_id)
    assert fresh.run_id == run_id
    with pytest.raises(RuntimeError, match="start"):
        MlflowTracker("pickle", uri).log_metrics({"x": 1.0}, step=0)
    with pytest.raises(ValueError, match="status"):
        driver.end("DONE")


def test_restarted_worker_process_reopens_the_same_run(uri):
    """A new process (a Ray worker restarted after a crash) finds the run by its key."""
    parent = MlflowTracker("restart", uri)
    run_id = parent.start("store/job-r", params={"a": 1})
    code = (
        "import sys; from pipeline.track.tracking import MlflowTracker;"
        f"t = MlflowTracker('restart', {uri!r});"
        "print(t.start('store/job-r', params={'a': 1}));"
        "t.log_metrics({'epoch_done': 1}, step=1)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == run_id
    assert tracking.runs_with_key("store/job-r", "restart", uri) == [run_id]
    assert tracking.metric_history(run_id, "epoch_done", uri) == [(1, 1.0)]


def test_run_keys_with_quotes_and_backslashes_are_matched_exactly(uri):
    tracker = MlflowTracker("quotes", uri)
    odd = "s3://bucket/it's a \\ run"
    run_id = tracker.start(odd)
    other = MlflowTracker("quotes", uri).start("s3://bucket/it")
    assert MlflowTracker("quotes", uri).start(odd) == run_id != other
    assert tracking.runs_with_key(odd, "quotes", uri) == [run_id]


def _gone_process() -> dict:
    """The identity of a driver process that has exited (started and waited for here)."""
    code = ("import json; from pipeline.track.tracking import driver_identity; "
            "print(json.dumps(driver_identity()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout
    return json.loads(out)


def test_driver_alive_tells_live_gone_reused_and_foreign_drivers():
    me = tracking.driver_identity()
    assert tracking.driver_alive(me) is True
    assert tracking.driver_alive(_gone_process()) is False
    assert tracking.driver_alive({**me, "started": me["started"] - 1}) is False  # pid reused
    assert tracking.driver_alive({**me, "host": me["host"] + "-elsewhere"}) is None


def test_run_of_a_vanished_driver_is_marked_killed_on_the_next_start(uri):
    gone = MlflowTracker("orphans", uri)
    orphan = gone.start("k-orphan")
    gone.set_tags({tracking.DRIVER_TAG: json.dumps(_gone_process())})  # SIGKILLed mid-run
    live = MlflowTracker("orphans", uri)
    running = live.start("k-live")  # this process: alive
    foreign = MlflowTracker("orphans", uri)
    elsewhere = foreign.start("k-foreign")
    me = tracking.driver_identity()
    foreign.set_tags({tracking.DRIVER_TAG: json.dumps({**me, "host": me["host"] + "-b"})})

    assert MlflowTracker("orphans", uri).mark_orphans() == [orphan]
    info = tracking.run_info(orphan, uri)
    assert info["status"] == "KILLED"
    assert info["tags"][tracking.ENDED_BY_TAG].startswith(f"driver {me['host']}:")
    assert tracking.run_info(running, uri)["status"] == "RUNNING"
    assert tracking.run_info(elsewhere, uri)["status"] == "RUNNING"  # cannot be judged here
    assert MlflowTracker("orphans", uri).mark_orphans() == []  # once

    resumed = MlflowTracker("orphans", uri)  # the same job submitted again: the same run
    assert resumed.start("k-orphan") == orphan
    assert tracking.run_info(orphan, uri)["status"] == "RUNNING"
    assert json.loads(tracking.run_info(orphan, uri)["tags"][tracking.DRIVER_TAG]) == me


def test_mark_orphans_without_the_experiment_creates_nothing(uri):
    assert MlflowTracker("never-started", uri).mark_orphans() == []
    assert tracking.mlflow_client(uri).get_experiment_by_name("never-started") is None


class _Flaky:
    """A client whose next ``fail`` calls of ``method`` fail with ``error``: after doing the
    call (``arrived``: the server committed, the answer was lost) or before it."""

    def __init__(self, client, method: str, error: Exception, fail: int, arrived: bool):
        self._client, self._method, self._error = client, method, error
        self.fail, self.arrived, self.calls = fail, arrived, 0

    def __getattr__(self, name):
        real = getattr(self._client, name)
        if name != self._method:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.fail > 0:
                self.fail -= 1
                if self.arrived:
                    real(*args, **kwargs)
                raise self._error
            return real(*args, **kwargs)

        return call


def _unavailable():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    return MlflowException("API request failed: 503 Service Unavailable",
                           error_code=TEMPORARILY_UNAVAILABLE)


@pytest.mark.parametrize("arrived", [False, True])
def test_metrics_survive_a_server_outage_without_duplicates(uri, monkeypatch, arrived):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    tracker = MlflowTracker("outage", uri)
    run_id = tracker.start(f"k-outage-{arrived}")
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    flaky = _Flaky(tracker.client, "log_batch", _unavailable(), fail=3, arrived=arrived)
    tracker._client_cache = flaky
    tracker.log_metrics({"train/loss": 0.5, "val/accuracy": 0.75}, step=1)
    assert flaky.calls == (1 if arrived else 4)  # what arrived is asked for, not sent again
    assert tracking.metric_history(run_id, "train/loss", uri) == [(0, 1.0), (1, 0.5)]
    assert tracking.metric_history(run_id, "val/accuracy", uri) == [(1, 0.75)]


def test_an_epoch_logged_again_by_a_restarted_worker_is_not_duplicated(uri):
    driver = MlflowTracker("redo", uri)
    run_id = driver.start("k-redo")
    first = pickle.loads(pickle.dumps(driver))  # rank 0, logs epoch 1 then is killed
    first.log_metrics({"train/loss": 0.9}, step=0)
    first.log_metrics({"train/loss": 0.7}, step=1)
    restarted = pickle.loads(pickle.dumps(driver))  # resumes from the checkpoint of epoch 0
    restarted.log_metrics({"train/loss": 0.71}, step=1)
    restarted.log_metrics({"train/loss": 0.5}, step=2)
    assert tracking.metric_history(run_id, "train/loss", uri) == [(0, 0.9), (1, 0.7), (2, 0.5)]


def test_a_wrong_request_is_not_retried_and_an_outage_ends(uri, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    tracker = MlflowTracker("outage-limits", uri)
    tracker.start("k-limits")
    wrong = MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)
    flaky = _Flaky(tracker.client, "log_batch", wrong, fail=5, arrived=False)
    tracker._client_cache = flaky
    with pytest.raises(MlflowException, match="bad"):
        tracker.log_metrics({"x": 1.0}, step=0)
    assert flaky.calls == 1
    monkeypatch.setattr(tracking, "OUTAGE_S", -1.0)  # the outage outlasted the wait
    flaky = _Flaky(tracker.client._client, "log_batch", _unavailable(), fail=5, arrived=False)
    tracker._client_cache = flaky
    with pytest.raises(MlflowException, match="Unavailable"):
        tracker.log_metrics({"x": 1.0}, step=0)
    assert flaky.calls == 1
