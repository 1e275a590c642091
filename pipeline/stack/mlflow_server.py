"""The MLflow tracking server on 127.0.0.1: PostgreSQL backend store, artifacts in S3.

``start_mlflow(backend_uri, artifacts, s3_env, log_path)`` runs the venv's ``mlflow server``
with the PostgreSQL URL as backend store (``MLFLOW_BACKEND_STORE_URI``, so that the password
is not on the command line; MLflow creates its tables on first start),
``--artifacts-destination s3://BUCKET/...`` (clients upload and download artifacts *through
the server*, so they need no S3 credentials: the server gets ``AWS_*`` and
``MLFLOW_S3_ENDPOINT_URL``), ``--host 127.0.0.1``, a free port and ``--workers`` worker
processes, without MLflow 3's server jobs (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``), in its
own process group; it waits until ``/health`` answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.stack.process import Group, stop_group, tail, wait_http
from pipeline.store.seaweed import free_ports


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``.

    Attributes:
        pid: the ``mlflow server`` process (also its process-group id; uvicorn's workers are in
            the group). port: TCP port on 127.0.0.1. uri: ``http://127.0.0.1:PORT`` (what
            ``MLFLOW_TRACKING_URI`` is set to). artifacts: the ``--artifacts-destination``.
        log_path: its output. start_time: the leader's start time (``process.Group``).
    """

    pid: int
    port: int
    uri: str
    artifacts: str
    log_path: Path
    start_time: int

    @property
    def group(self) -> Group:
        return Group(self.pid, self.start_time)

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM the process group, SIGKILL after ``timeout_s``; True when it is gone."""
        return stop_group(self.group, timeout_s=timeout_s)


def start_mlflow(backend_uri: str, artifacts: str, s3_env: dict[str, str], log_path: Path,
                 workers: int = 2, timeout_s: float = 300.0,
                 port: int | None = None) -> MlflowServer:
    """Start the server (see the module docstring); ``s3_env`` holds ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``; ``port``: a
    given one (a restart, so that clients find it again) or a free one. Raises RuntimeError
    with the log's tail if it exits or does not answer within ``timeout_s``."""
    port = port or free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    # the backend URI holds PostgreSQL's password: in the environment (readable by its owner
    # only), not on the command line (``ps`` shows that to every user)
    env.update(s3_env, MLFLOW_S3_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"],
               MLFLOW_BACKEND_STORE_URI=backend_uri,
               # MLflow 3's server jobs (GenAI scorers, prompt optimisation, trace rollups)
               # start a job runner and 7 huey consumers, 8 more Python processes importing
               # MLflow beside the server's own worker: the start took 144 s at a load of 30
               # on 2 cores. The pipeline uses none of them.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers),
           # uvicorn restarts a worker that misses a 5 s health ping: on a loaded machine
           # that killed workers in a loop while they were still importing MLflow
           "--uvicorn-opts", "--timeout-worker-healthcheck 120"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = MlflowServer(proc.pid, port, f"http://127.0.0.1:{port}", artifacts, log_path,
                          Group.of(proc.pid).start_time)
    try:
        wait_http(f"{server.uri}/health", time.monotonic() + timeout_s,
                  lambda: proc.poll() is None, "mlflow server")
    except RuntimeError as err:
        server.stop(timeout_s=5)
        raise RuntimeError(f"{err}; log {log_path}:\n{tail(log_path)}") from None
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server
