"""The whole production stack on one machine: ``up`` starts it, ``down`` stops it.

``up(state_dir)`` starts, each on 127.0.0.1 with free ports and in its own process group:
SeaweedFS (S3, buckets ``pyramids``, ``mlflow-artifacts``, ``checkpoints``; a fresh random
key pair each time), PostgreSQL (``postgres``), the MLflow server on it with artifacts in
``s3://mlflow-artifacts/`` (``mlflow_server``) and, in a thread beside those three (it needs
none of them), the two-node Ray cluster (``ray_cluster``), printing one line per server on
stderr when it is up. After each server it rewrites the state file
``state_dir/stack.json`` (mode 0600: it holds the S3 keys): every process group (pid and the
leader's start time), port, endpoint, log, and the environment clients need (``env``:
``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``RAY_ADDRESS`` for ``ray job submit``, ``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN_PATH``). If a server fails to start, the ones already started are stopped.

``down(state_dir)`` stops whatever the state file records, by process group (Ray nodes, MLflow,
PostgreSQL, SeaweedFS), is idempotent and tolerates processes that are already gone; it keeps
the data (PostgreSQL's cluster, SeaweedFS's volumes), so the next ``up`` has the same registry
and objects.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stack.mlflow_server import start_mlflow
from pipeline.stack.postgres import backend_url, masked, start_postgres
from pipeline.stack.process import Group, done_line, stop_group
from pipeline.stack.ray_cluster import start_cluster
from pipeline.store.seaweed import REGION, remove_unix_sockets, start_seaweed

WORK_TREE = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = WORK_TREE / "runs" / "stack"
STATE_FILE = "stack.json"
BUCKETS = ("pyramids", "mlflow-artifacts", "checkpoints")
ARTIFACT_ROOT = "s3://mlflow-artifacts/"
# stop order: the Ray nodes (their jobs write to MLflow and S3) first, S3 last; each wave's
# servers are stopped side by side
_STOP_ORDER = ("ray_node2", "ray_head", "mlflow", "postgres", "seaweed")
_STOP_WAVES = (("ray_node2", "ray_head"), ("mlflow", "postgres", "seaweed"))
_STOP_SIGNAL = {"postgres": signal.SIGINT}  # PostgreSQL's fast shutdown
# seconds between the stop signal and SIGKILL: a Ray node keeps nothing we need (the GCS is in
# memory) and its head took 33 s to end on SIGTERM (GCS and autoscaler monitor); MLflow,
# PostgreSQL and SeaweedFS (its filer flushes for up to 15 s) get the full grace
_STOP_GRACE_S = {"ray_head": 5.0, "ray_node2": 5.0}
# the state dict and its file: written by ``up``'s thread and the Ray cluster's thread
_STATE_LOCK = threading.RLock()


@dataclass(frozen=True)
class Stack:
    """A running stack as its state file records it (``state``: the parsed JSON)."""

    state_dir: Path
    state: dict[str, Any]

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of this stack (see the module docstring)."""
        return dict(self.state["env"])

    @property
    def endpoints(self) -> dict[str, str]:
        return dict(self.state["endpoints"])

    def runtime_env(self) -> dict[str, Any]:
        """Ray's runtime environment for a job on this stack: the MLflow server and the S3
        endpoint and keys (``ray job submit --runtime-env-json``), one thread per process."""
        keys = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")
        return {"env_vars": {**{k: self.env[k] for k in keys}, "OMP_NUM_THREADS": "1"}}

    def alive(self) -> bool:
        """Every recorded server still has a live process."""
        services = self.state.get("services", {})
        return set(services) == set(_STOP_ORDER) and all(
            Group(s["pid"], s["start_time"]).members() for s in services.values())


def load(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> Stack | None:
    """The stack recorded in ``state_dir``, or None when there is no state file."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    return Stack(Path(state_dir), json.loads(path.read_text()))


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    """Write the state file (0600) atomically."""
    with _STATE_LOCK:
        tmp = state_dir / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(state, out, indent=1)
        tmp.replace(state_dir / STATE_FILE)


def up(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, *, cpus: tuple[int, int] = (2, 2),
       mlflow_workers: int = 2) -> Stack:
    """Start the stack (see the module docstring); returns it. A stack already recorded as
    running in ``state_dir`` is refused (``down`` it first); a dead one is cleaned up."""
    state_dir = Path(state_dir).absolute()
    previous = load(state_dir)
    if previous is not None and previous.alive():
        raise RuntimeError(f"a stack is already running from {state_dir} (jobs/stack.py down)")
    if previous is not None:
        down(state_dir, quiet=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o711)  # PostgreSQL's user passes through to its own folder
    state: dict[str, Any] = {"services": {}, "endpoints": {}, "env": {}}
    try:
        _start_all(state_dir, state, cpus, mlflow_workers)
    except BaseException:
        down(state_dir, quiet=True)
        raise
    return Stack(state_dir, state)


def _start_all(state_dir: Path, state: dict[str, Any], cpus: tuple[int, int],
               mlflow_workers: int) -> None:
    """SeaweedFS, PostgreSQL and the MLflow server on them, in order, while the Ray cluster
    starts in a thread beside them (a minute or two each under load: side by side the stack
    is up in the longer of the two); the state saved after each. When one side fails the
    other is waited for (so that ``down`` finds every process it started), then the error
    is raised."""
    print(f"starting SeaweedFS, PostgreSQL, the MLflow server ({mlflow_workers} workers) and, "
          f"beside them, the Ray cluster (head + node2, {cpus[0]} + {cpus[1]} CPUs) on "
          "127.0.0.1 ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(1, thread_name_prefix="stack-ray") as pool:
        ray = pool.submit(_start_ray, state_dir, state, cpus)
        try:
            _start_tracking(state_dir, state, mlflow_workers)
        finally:
            ray.result()
    _save(state_dir, state)


def _start_tracking(state_dir: Path, state: dict[str, Any], mlflow_workers: int) -> None:
    """SeaweedFS, PostgreSQL, then the MLflow server with its store in the one and its
    artifacts in the other."""
    s3_env = _start_s3(state_dir, state)
    t = time.monotonic()
    pg = start_postgres(state_dir / "postgres")
    with _STATE_LOCK:
        _record(state_dir, state, "postgres", pg.pid, pg.start_time, {"port": pg.port},
                pg.log_path)
        backend = masked(pg.url).replace("postgresql+psycopg", "postgresql")
        state["endpoints"]["mlflow_backend"] = backend
    done_line("starting PostgreSQL on 127.0.0.1", t, f"ok, port {pg.port}")
    t = time.monotonic()
    ml = start_mlflow(pg.url, ARTIFACT_ROOT, s3_env, state_dir / "mlflow.log", mlflow_workers)
    with _STATE_LOCK:
        _record(state_dir, state, "mlflow", ml.pid, ml.start_time, {"port": ml.port}, ml.log_path)
        state["endpoints"].update(mlflow=ml.uri, artifact_root=ARTIFACT_ROOT)
        state["env"]["MLFLOW_TRACKING_URI"] = ml.uri
        state["mlflow_workers"] = mlflow_workers
    done_line(f"starting the MLflow server ({mlflow_workers} workers)", t, f"ok, {ml.uri}")


def _start_s3(state_dir: Path, state: dict[str, Any]) -> dict[str, str]:
    """SeaweedFS with a fresh key pair and the buckets; returns the S3 client environment."""
    t = time.monotonic()
    access, secret = "stack-" + secrets.token_hex(6), secrets.token_hex(20)
    s3 = start_seaweed(state_dir / "s3", access_key=access, secret_key=secret, buckets=BUCKETS)
    s3_env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": access,
              "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
    with _STATE_LOCK:
        state["env"].update(s3_env)
        state["endpoints"].update(s3=s3.endpoint, buckets=list(BUCKETS))
        _record(state_dir, state, "seaweed", s3.pid, Group.of(s3.pid).start_time, s3.ports,
                s3.log_path)
    done_line("starting SeaweedFS (S3) on 127.0.0.1", t,
              f"ok, {s3.endpoint}, buckets {', '.join(BUCKETS)}")
    return s3_env


def _start_ray(state_dir: Path, state: dict[str, Any], cpus: tuple[int, int]) -> None:
    """The two-node Ray cluster, its token (0600) under ``state_dir`` and a short temp dir
    (Ray's socket paths must stay under 107 bytes)."""
    from pipeline.train.driver import write_token_file

    t = time.monotonic()
    token = write_token_file(state_dir / "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-stack-", dir="/tmp"))
    with _STATE_LOCK:
        state.update(ray_temp_dir=str(temp_dir), ray_token=str(token))
        _save(state_dir, state)
    cluster = start_cluster(temp_dir, token, state_dir, cpus)
    with _STATE_LOCK:
        for node in (cluster.head, cluster.node2):
            _record(state_dir, state, f"ray_{node.name}", node.pid, node.start_time, node.ports,
                    node.log_path)
        state["endpoints"].update(ray_gcs=cluster.gcs_address, ray_dashboard=cluster.dashboard)
        state["env"].update(RAY_ADDRESS=cluster.dashboard, RAY_AUTH_MODE="token",
                            RAY_AUTH_TOKEN_PATH=str(token))
    done_line(f"starting the Ray cluster (head + node2, {cpus[0]} + {cpus[1]} CPUs)", t,
              f"ok, GCS {cluster.gcs_address}, jobs API {cluster.dashboard}")


def restart_mlflow(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, pause_s: float = 0.0) -> float:
    """Stop the stack's MLflow server, wait ``pause_s``, start it again on the same port with
    the same backend and artifacts, and record the new process group; returns the seconds it
    did not answer. Clients keep their URI."""
    state_dir = Path(state_dir).absolute()
    stack = load(state_dir)
    if stack is None or not stack.alive():
        raise RuntimeError(f"no running stack recorded in {state_dir}")
    state = stack.state
    record, pg = state["services"]["mlflow"], state["services"]["postgres"]
    stopped_at = time.monotonic()
    stop_group(Group(record["pid"], record["start_time"]), timeout_s=30)
    time.sleep(pause_s)
    s3_env = {k: v for k, v in state["env"].items() if k.startswith("AWS_")}
    ml = start_mlflow(backend_url(state_dir / "postgres", pg["ports"]["port"]), ARTIFACT_ROOT,
                      s3_env, Path(record["log"]), state.get("mlflow_workers", 2),
                      port=record["ports"]["port"])
    _record(state_dir, state, "mlflow", ml.pid, ml.start_time, {"port": ml.port}, ml.log_path)
    return time.monotonic() - stopped_at


def _record(state_dir: Path, state: dict[str, Any], name: str, pid: int, start_time: int,
            ports: dict[str, int], log: Path) -> None:
    with _STATE_LOCK:
        state["services"][name] = {"pid": pid, "start_time": start_time, "ports": ports,
                                   "log": str(log)}
        _save(state_dir, state)


def down(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, quiet: bool = False) -> list[str]:
    """Stop every server the state file records (by process group; already-gone ones are
    skipped): the two Ray nodes side by side (5 s before SIGKILL), then MLflow, PostgreSQL and
    SeaweedFS side by side (30 s: one after another, with Ray's nodes, that took 79 s); remove
    Ray's temp dir and token and mark the state file stopped; returns the names of the
    servers that were still running, in ``_STOP_ORDER``. Idempotent."""
    stack = load(state_dir)
    if stack is None:
        return []
    state = stack.state
    running = [n for n in _STOP_ORDER if n in state.get("services", {})]
    stopped: list[str] = []
    for wave in _STOP_WAVES:
        names = [n for n in running if n in wave]
        records = [state["services"][n] for n in names]
        with ThreadPoolExecutor(max(len(names), 1), thread_name_prefix="stack-stop") as pool:
            were = list(pool.map(_stop_service, records, names, [quiet] * len(names)))
        stopped += [n for n, was in zip(names, were, strict=True) if was]
    for key in ("ray_temp_dir", "ray_token"):
        if state.get(key):
            target = Path(state[key])
            shutil.rmtree(target if key == "ray_temp_dir" else target.parent, ignore_errors=True)
    state["services"], state["stopped_at"] = {}, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _save(Path(state_dir), state)
    if not quiet and not stopped:
        print("nothing was running", file=sys.stderr)
    return stopped


def _stop_service(record: dict[str, Any], name: str, quiet: bool) -> bool:
    """Stop one recorded server's process group; True when it was still running."""
    group = Group(record["pid"], record["start_time"])
    was_running = bool(group.members())
    if was_running:
        t = time.monotonic()
        gone = stop_group(group, _STOP_SIGNAL.get(name, signal.SIGTERM),
                          timeout_s=_STOP_GRACE_S.get(name, 30.0))
        if not quiet:
            done_line(f"stopping {name} (process group {group.pgid})", t,
                      "ok" if gone else "STILL RUNNING")
    if name == "seaweed":
        remove_unix_sockets(record["ports"].values())
    return was_running
