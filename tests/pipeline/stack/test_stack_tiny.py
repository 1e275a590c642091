"""The production stack's path, tiny, on the same real servers as ``make stack-demo``.

One stack for the module (``pipeline.stack.stack.up``: SeaweedFS as S3, PostgreSQL with the
MLflow server on it and its artifacts in S3, a two-node Ray cluster, one MLflow worker), then
``jobs/stack_demo.py --two-jobs``: one ``ray job submit`` that ingests 4 + 2 generated scenes
into ``s3://pyramids``, trains 1 epoch with 2 workers spread over both nodes, checkpoints in
``s3://checkpoints`` and registers ``@champion``, and a second that predicts every scene from
``models:/...@champion`` into Parquet in S3 (no retraining). Marked ``stack_tiny``, not
``stack``: it runs in ``make test``; the full path, with retraining and separate jobs, is
``make test-stack`` (``test_stack_e2e.py``).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.stack import stack
from pipeline.stack.postgres import BIN
from tests.pipeline.stack.conftest import group_sockets
from tests.sockets import is_loopback

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.s3,
    pytest.mark.stack_tiny,
    pytest.mark.timeout(900),  # four servers and one Ray job; minutes under load
    pytest.mark.skipif(not (BIN / "postgres").exists(), reason="no PostgreSQL 15"),
]

TRAIN, VAL = 4, 2
NAME = "tiny-stack"


@pytest.fixture(scope="module")
def tiny():
    """The stack up and the two jobs run: ``(stack, the demo's JSON object)``; the stack is
    stopped (by process group) and its folder removed afterwards. This process gets the
    stack's client environment (S3 endpoint and keys, MLflow server) meanwhile."""
    from jobs import stack_demo

    folder = Path(tempfile.mkdtemp(prefix="stt-", dir="/tmp"))  # short: Ray's socket paths
    folder.chmod(0o711)  # PostgreSQL's user passes through to its data folder
    state = folder / "state"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        try:
            running = stack.up(state, mlflow_workers=1)
            for key in stack_demo.JOB_ENV:
                env.setenv(key, running.env[key])
            argv = f"--two-jobs --train {TRAIN} --val {VAL} --epochs 1 --retrain-epochs 0"
            where = ["--state-dir", str(state), "--data", str(folder / "data")]
            args = stack_demo.parse_args([*argv.split(), "--register", NAME, *where])
            yield running, stack_demo.run_demo(running, args)
        finally:
            stack.down(state, quiet=True)
            shutil.rmtree(folder, ignore_errors=True)


def test_trained_on_both_nodes_with_s3_and_postgres(tiny):
    from pipeline.store import storage

    running, result = tiny
    assert result["ray_nodes"] == 2 and result["train_worker_nodes"] == 2
    assert result["mlflow_backend"].startswith("postgresql://mlflow:***@127.0.0.1:")
    assert result["mlflow_uri"] == running.env["MLFLOW_TRACKING_URI"]
    assert result["pyramids"].startswith("s3://pyramids/stack-demo/")
    assert storage.exists(result["pyramids"] + "/manifest.parquet")
    assert result["checkpoint"].startswith("s3://checkpoints/stack-demo/")
    assert storage.list_prefix(result["checkpoint"])  # the checkpoint's files are in S3
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert result["retrain"] is None


def test_registered_champion_with_its_artifacts_in_s3(tiny):
    from pipeline.store import storage
    from pipeline.track import tracking

    _, result = tiny
    assert result["artifact_root"] == "s3://mlflow-artifacts/"
    assert result["registered"] == f"{NAME}@champion" and result["champion_version"] == "1"
    assert tracking.alias_version(None, NAME, "champion") == "1"
    # the server stored the model's files in the artifact bucket (clients uploaded through it)
    assert any(key.endswith("MLmodel") for key in storage.list_prefix("s3://mlflow-artifacts/"))


def test_batch_predictions_of_every_scene_are_in_s3(tiny):
    import pyarrow.parquet as pq

    from pipeline.store import storage

    _, result = tiny
    assert result["predictions"].startswith("s3://pyramids/predictions/")
    table = pq.read_table(io.BytesIO(storage.read_bytes(result["predictions"])))
    assert result["predicted_scenes"] == table.num_rows == TRAIN + VAL
    assert table.column("error").null_count == TRAIN + VAL  # no scene failed
    assert min(table.column("bytes_read").to_pylist()) > 0  # each read its chunks from S3


def test_every_server_listens_on_loopback_only(tiny):
    running, _ = tiny
    pids = [s["pid"] for s in running.state["services"].values()]
    sockets = group_sockets(*pids)
    assert len(sockets) > 10 and [s for s in sockets if not is_loopback(s[2])] == []
