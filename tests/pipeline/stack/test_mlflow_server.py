"""The MLflow server on PostgreSQL with artifacts in S3 (SeaweedFS), alone.

Marked ``stack`` (``make test-stack``): in ``make test`` the same server, on the same
PostgreSQL and S3, is covered by the tiny stack test (``test_stack_tiny.py``: backend on
PostgreSQL, the champion's artifacts in S3, loopback only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.stack.mlflow_server import start_mlflow
from pipeline.stack.postgres import BIN, start_postgres
from tests.pipeline.stack.conftest import group_sockets
from tests.s3 import seaweed_server  # noqa: F401  (fixture)
from tests.sockets import is_loopback

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.stack,
              pytest.mark.skipif(not (BIN / "postgres").exists(), reason="no PostgreSQL 15")]


def test_mlflow_server_logs_to_postgres_and_s3(stack_dir, seaweed_server):  # noqa: F811
    import os

    from pipeline.store import storage

    bucket = seaweed_server.new_bucket("mlart")
    s3_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                         "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    pg = start_postgres(stack_dir / "pg")
    server = None
    try:
        server = start_mlflow(pg.url, f"{bucket}/artifacts", s3_env, stack_dir / "mlflow.log")
        sockets = group_sockets(server.pid)
        assert sockets and all(is_loopback(s[2]) for s in sockets), sockets
        # no MLflow server jobs: their runner starts with the server (then 7 huey consumers)
        commands = [Path(f"/proc/{p}/cmdline").read_bytes() for p in server.group.members()]
        assert not [c for c in commands if b"_job_runner" in c or b"huey" in c], commands
        import mlflow

        # a client of this server only: the fluent API keeps process-wide state (tracking URI,
        # active experiment) that earlier tests of this process may have set
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        (stack_dir / "note.txt").write_text("attended chunks only")
        run = client.create_run(client.create_experiment("stack-test"))
        client.log_metric(run.info.run_id, "val_accuracy", 0.75)
        client.log_artifact(run.info.run_id, str(stack_dir / "note.txt"))
        client.set_terminated(run.info.run_id)
        fetched = client.get_run(run.info.run_id)
        assert fetched.data.metrics["val_accuracy"] == 0.75
        keys = storage.list_prefix(f"{bucket}/artifacts")
        assert [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/note.txt")], keys
        assert storage.read_bytes([k for k in keys if k.endswith("note.txt")][0]) == \
            b"attended chunks only"
        import psycopg  # the run is in PostgreSQL, not in a file of the server's

        with psycopg.connect(pg.url.replace("+psycopg", "")) as conn:
            row = conn.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s",
                               (run.info.run_id, "val_accuracy")).fetchone()
        assert row == (0.75,)
    finally:
        if server is not None:
            assert server.stop()
        pg.stop()
    assert server.group.members() == []
