"""PostgreSQL 15 on 127.0.0.1 for MLflow's backend store: one data directory of ours.

``start_postgres(data_root)`` initialises a cluster under ``data_root/data`` (first time only),
starts ``postgres`` listening on 127.0.0.1 only, on a free port, with its Unix socket in
``data_root/socket`` (not ``/var/run/postgresql``), password authentication (SCRAM-SHA-256)
for every connection, and a database ``mlflow`` owned by a login role ``mlflow``. PostgreSQL
refuses to run as root: when we are root, ``initdb`` and ``postgres`` run as the unprivileged
``postgres`` user (the Debian package's) with the data directory chowned to it; otherwise as
the current user. Passwords are random, kept in ``data_root/passwords.json`` (0600).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.stack.process import Group, stop_group, tail
from pipeline.store.seaweed import free_ports

BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "stack_admin"
DB_USER = DATABASE = "mlflow"


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server.

    Attributes:
        pid: the postmaster's pid (also its process-group id). port: TCP port on 127.0.0.1.
        url: SQLAlchemy URL of the ``mlflow`` database, ``postgresql+psycopg://mlflow:PASSWORD
            @127.0.0.1:PORT/mlflow``. data_dir: the cluster's data directory. log_path: its log.
        start_time: the postmaster's start time (``process.Group``).
    """

    pid: int
    port: int
    url: str
    data_dir: Path
    log_path: Path
    start_time: int

    @property
    def group(self) -> Group:
        return Group(self.pid, self.start_time)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Fast shutdown (SIGINT: abort open transactions, checkpoint, exit), SIGKILL after
        ``timeout_s``; True when every process of it is gone. Idempotent."""
        return stop_group(self.group, signal.SIGINT, timeout_s)


def _run_as() -> str | None:
    """The user to run PostgreSQL as: ``postgres`` when we are root, else None (ourselves)."""
    return "postgres" if os.geteuid() == 0 else None


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _passwords(data_root: Path) -> dict[str, str]:
    """The stack's PostgreSQL passwords, created once (file mode 0600)."""
    path = data_root / "passwords.json"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({SUPERUSER: secrets.token_hex(16), DB_USER: secrets.token_hex(16)}, out)
    return json.loads(path.read_text())


def _initdb(data_dir: Path, password: str, user: str | None, log) -> None:
    """``initdb`` with SCRAM for local and host connections and superuser ``SUPERUSER``."""
    pwfile = data_dir.parent / "initdb.pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    _own(pwfile, user)
    try:
        subprocess.run([str(BIN / "initdb"), "-D", str(data_dir), "-U", SUPERUSER,
                        f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                        "--locale=C.UTF-8"], check=True, stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, user=user, cwd=data_dir.parent)
    finally:
        pwfile.unlink(missing_ok=True)


def _check_reachable(data_root: Path, user: str | None) -> None:
    """Fail clearly when ``user`` cannot pass through a folder above ``data_root`` (e.g. a 0700
    temp folder): initdb would fail later with a bare "permission denied"."""
    if user is None:
        return
    uid = pwd.getpwnam(user).pw_uid
    for folder in data_root.parents:
        st = folder.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise PermissionError(f"PostgreSQL runs as {user!r}, which cannot enter {folder} "
                                  f"(mode {st.st_mode & 0o777:o}): put the stack elsewhere")


def _prepare(data_root: Path, user: str | None, log) -> tuple[Path, Path, dict[str, str]]:
    """Directories (owned by ``user``, 0700) and, the first time, the cluster itself."""
    _check_reachable(data_root, user)
    data_root.mkdir(parents=True, exist_ok=True)
    os.chmod(data_root, 0o711)  # the postgres user must reach its folders, not read ours
    data_dir, socket_dir = data_root / "data", data_root / "socket"
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    _own(socket_dir, user)
    passwords = _passwords(data_root)
    if not (data_dir / "PG_VERSION").exists():
        shutil.rmtree(data_dir, ignore_errors=True)  # an interrupted initdb
        data_dir.mkdir(mode=0o700)
        _own(data_dir, user)
        _initdb(data_dir, passwords[SUPERUSER], user, log)
    return data_dir, socket_dir, passwords


def start_postgres(data_root: str | os.PathLike, timeout_s: float = 60.0) -> Postgres:
    """Start PostgreSQL (see the module docstring) and wait until the ``mlflow`` database
    accepts a password login over TCP; returns it. Raises RuntimeError naming the log."""
    data_root = Path(data_root).absolute()
    user = _run_as()
    log_path = data_root / "postgres.log"
    data_root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        data_dir, socket_dir, passwords = _prepare(data_root, user, log)
        port = free_ports(1)[0]
        cmd = [str(BIN / "postgres"), "-D", str(data_dir), "-p", str(port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}",
               "-c", "max_connections=50", "-c", "shared_buffers=32MB"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                user=user, cwd=data_dir, start_new_session=True)
    server = Postgres(proc.pid, port, _url(DB_USER, passwords[DB_USER], port), data_dir, log_path,
                      Group.of(proc.pid).start_time)
    try:
        _wait_and_create_db(server, passwords, proc, time.monotonic() + timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


def backend_url(data_root: str | os.PathLike, port: int) -> str:
    """The ``mlflow`` database's URL (with its password) of the server ``start_postgres(data_root)``
    started on ``port``: what a restarted MLflow server connects to."""
    return _url(DB_USER, _passwords(Path(data_root).absolute())[DB_USER], port)


def _url(user: str, password: str, port: int, database: str = DATABASE) -> str:
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{port}/{database}"


def _wait_and_create_db(server: Postgres, passwords: dict[str, str], proc: subprocess.Popen,
                        deadline: float) -> None:
    """Connect as the superuser until the server accepts; create role and database once."""
    import psycopg

    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}; log {server.log_path}:\n"
                               f"{tail(server.log_path)}")
        try:
            with psycopg.connect(host="127.0.0.1", port=server.port, user=SUPERUSER,
                                 password=passwords[SUPERUSER], dbname="postgres",
                                 autocommit=True, connect_timeout=5) as conn:
                _create_role_and_db(conn, passwords[DB_USER])
            return
        except psycopg.OperationalError as err:
            last = str(err).strip()
            time.sleep(0.3)
    raise RuntimeError(f"PostgreSQL on 127.0.0.1:{server.port} not ready in time ({last}); "
                       f"log {server.log_path}:\n{tail(server.log_path)}")


def _create_role_and_db(conn, password: str) -> None:
    from psycopg import sql

    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(DB_USER), sql.Literal(password)))
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(DATABASE), sql.Identifier(DB_USER)))


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and reports)."""
    head, sep, rest = url.partition("://")
    if "@" not in rest or ":" not in rest.split("@", 1)[0]:
        return url
    cred, host = rest.split("@", 1)
    return f"{head}{sep}{cred.split(':', 1)[0]}:***@{host}"
