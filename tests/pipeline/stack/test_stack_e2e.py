"""The stack path end to end, small: ``jobs/stack_demo.py`` on a fresh stack (8 + 4 scenes,
1 epoch, 2 workers), then ``jobs/stack.py env`` and ``down``. Marked ``stack`` (``pytest -m
stack`` runs the stack's tests)."""

from __future__ import annotations

import json

import pytest

from pipeline.stack import stack
from pipeline.stack.postgres import BIN
from tests.pipeline.stack.conftest import group_sockets
from tests.sockets import is_loopback

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.stack,
              pytest.mark.timeout(1800),  # four servers and four Ray jobs; minutes under load
              pytest.mark.skipif(not (BIN / "postgres").exists(), reason="no PostgreSQL 15")]


def test_stack_demo_small(stack_dir, tmp_path, capsys, monkeypatch):
    from jobs import stack as stack_job
    from jobs import stack_demo
    from pipeline.store import storage

    state = stack_dir / "state"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--state-dir", str(state), "--data", str(tmp_path / "data"), "--train", "8",
            "--val", "4", "--epochs", "1", "--retrain-epochs", "1", "--register", "e2e-stack",
            "--keep"]
    try:
        assert stack_demo.main(args) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        running = stack.load(state)
        assert running is not None and running.alive()
        pids = [s["pid"] for s in running.state["services"].values()]
        sockets = group_sockets(*pids)
        assert [s for s in sockets if not is_loopback(s[2])] == []
        assert result["ray_nodes"] == 2 and result["train_worker_nodes"] == 2
        assert result["mlflow_backend"].startswith("postgresql://mlflow:***@127.0.0.1:")
        assert result["artifact_root"] == "s3://mlflow-artifacts/"
        assert result["checkpoint"].startswith("s3://checkpoints/stack-demo/")
        assert result["registered"] == "e2e-stack@champion" and result["champion_version"]
        assert result["retrain"]["candidate_version"] is not None
        assert 0.0 <= result["val_accuracy"] <= 1.0
        monkeypatch.setenv("AWS_ENDPOINT_URL", running.env["AWS_ENDPOINT_URL"])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, running.env[key])
        assert storage.list_prefix(result["checkpoint"])  # the checkpoint is in S3
        assert storage.exists(result["pyramids"] + "/manifest.parquet")
        assert result["predictions"].startswith("s3://pyramids/predictions/")
        assert result["predicted_scenes"] == 8 + 4  # every scene of the manifest
        assert storage.exists(result["predictions"])
        assert stack_job.main(["env", "--state-dir", str(state)]) == 0
        exports = capsys.readouterr().out
        for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            assert f"export {key}=" in exports
    finally:
        stack.down(state)
    assert stack.load(state).alive() is False
    assert stack.down(state) == []  # idempotent
    assert stack_job.main(["env", "--state-dir", str(state)]) == 3
