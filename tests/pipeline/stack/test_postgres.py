"""PostgreSQL for MLflow: password login over TCP, loopback only, gone after stop."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from pipeline.stack.postgres import BIN, masked, start_postgres
from tests.pipeline.stack.conftest import group_sockets
from tests.sockets import is_loopback

pytestmark = pytest.mark.skipif(not (BIN / "postgres").exists(), reason="no PostgreSQL 15")


def test_masked_hides_the_password_only():
    assert masked("postgresql+psycopg://mlflow:s3cr3t@127.0.0.1:5432/mlflow") == \
        "postgresql+psycopg://mlflow:***@127.0.0.1:5432/mlflow"
    assert masked("sqlite:///x.db") == "sqlite:///x.db"


def test_postgres_query_loopback_and_stop(stack_dir):
    import psycopg

    server = start_postgres(stack_dir / "pg")
    try:
        plain = server.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as conn:
            user, db = conn.execute("SELECT current_user, current_database()").fetchone()
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (41)")
            assert conn.execute("SELECT x + 1 FROM t").fetchone() == (42,)
        assert (user, db) == ("mlflow", "mlflow")
        with pytest.raises(psycopg.OperationalError):  # password authentication is on
            psycopg.connect(plain.replace(plain.split(":")[2].split("@")[0], "wrong"))
        sockets = group_sockets(server.pid)
        assert sockets and all(is_loopback(s[2]) for s in sockets), sockets
        assert {s[3] for s in sockets} == {server.port}
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as the postgres user
            assert Path(f"/proc/{server.pid}").stat().st_uid == pwd.getpwnam("postgres").pw_uid
    finally:
        assert server.stop()
    assert server.group.members() == []
    assert server.stop()  # idempotent
    again = start_postgres(stack_dir / "pg")  # the same cluster starts again, data kept
    try:
        with psycopg.connect(again.url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (41,)
    finally:
        again.stop()
