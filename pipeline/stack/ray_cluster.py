"""A Ray cluster on one machine: a head and a second node, loopback only, token auth.

``start_cluster(temp_dir, token, log_dir)`` runs ``ray start --head --block`` and then ``ray
start --address=127.0.0.1:GCS_PORT --block`` for a second node, each from this virtual
environment in its own process group, with its own custom resource (``{"head": 1}`` /
``{"node2": 1}``, so a task can be pinned to a node) and CPU count, and **every port given
explicitly and picked free on 127.0.0.1** (GCS, dashboard, Ray client server, node manager,
object manager, dashboard agent HTTP and gRPC, runtime-env agent, metrics export and a worker
port range), so it never collides with another Ray on the machine. Both nodes get
``--node-ip-address=127.0.0.1`` and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (loopback only),
token authentication with a fresh token in a 0600 file (``ray_env``), usage stats off, and
``PATH`` with this venv's ``bin`` first, so a job's ``python`` is this venv's.

``start_head`` / ``stop_head`` are the single-node head of ``make demo`` (``jobs/demo.py``).
Nodes stop by their process group (``ray start`` and the GCS, raylet, agents and workers it
started), never with ``ray stop`` (which ends every Ray of the user on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.stack.process import Group, free_port_range, stop_group, tail, wait_http
from pipeline.store.seaweed import free_ports

VENV_BIN = Path(sys.executable).parent
WORKER_PORTS = 100  # workers of one node: one port each
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
_NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def ray_env(token: Path | None = None) -> dict[str, str]:
    """Environment of the nodes and the CLI: this venv first on PATH (so the job's ``python``
    is ours), loopback only, usage stats off, token authentication on, with the token file
    ``token`` (mode 0600, ``pipeline.train.driver.write_token_file``) when given."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 protects a head's APIs with a token; say so explicitly for both `ray start` and
    # `ray job submit`, or the CLI does not send it. Ray's own default token file
    # (~/.ray/auth_token) is written readable by every user (0644): use ours (0600).
    env.setdefault("RAY_AUTH_MODE", "token")
    # the raylet waits this long for its agents' port files (default 15 s; under load 20 on 2
    # cores a second node's agent took longer and the node died during startup)
    env.setdefault("RAY_agent_register_timeout_ms", "120000")
    env.setdefault("RAY_raylet_start_wait_time_s", "120")  # the same wait, for the port files
    if token is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


@dataclass(frozen=True)
class RayNode:
    """One ``ray start --block`` process group.

    Attributes:
        name: ``head`` or ``node2``. pid: the ``ray start`` process (= process-group id).
        start_time: its start time (``process.Group``). ports: every port given on the
            command line by flag name (``port``, ``dashboard-port``, ``node-manager-port``,
            ..., ``min-worker-port``, ``max-worker-port``). log_path: its output.
    """

    name: str
    pid: int
    start_time: int
    ports: dict[str, int]
    log_path: Path

    @property
    def group(self) -> Group:
        return Group(self.pid, self.start_time)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the node's process group, SIGKILL what is left after ``timeout_s``, and
        wait until no process of it is left (so none still holds a port); True when gone."""
        return stop_group(self.group, timeout_s=timeout_s)


@dataclass(frozen=True)
class RayCluster:
    """The head and the second node.

    Attributes:
        head, node2: the nodes. gcs_address: ``127.0.0.1:PORT`` (``ray start --address``,
        ``ray.init(address=...)``). dashboard: ``http://127.0.0.1:PORT``, the jobs API
        (``RAY_ADDRESS`` of ``ray job submit``). token: the 0600 token file. temp_dir: Ray's.
    """

    head: RayNode
    node2: RayNode
    gcs_address: str
    dashboard: str
    token: Path
    temp_dir: Path

    def stop(self) -> bool:
        """Stop the second node, then the head; True when both groups are gone."""
        return all([self.node2.stop(), self.head.stop()])


def node_ports(head: bool) -> dict[str, int]:
    """Free ports for one node by ``ray start`` flag name, including a free worker range that
    holds none of the single ports (both are free when picked, none is held: a range drawn
    over the dashboard agent's port made ``ray start`` refuse to start, "used by other
    components")."""
    names = (*_HEAD_PORTS, *_NODE_PORTS) if head else _NODE_PORTS
    for _ in range(100):
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        first = free_port_range(WORKER_PORTS)
        if not any(first <= port < first + WORKER_PORTS for port in ports.values()):
            return {**ports, "min-worker-port": first, "max-worker-port": first + WORKER_PORTS - 1}
    raise RuntimeError("no worker port range apart from the node's own ports was found")


def start_node(name: str, temp_dir: Path, env: dict[str, str], log_path: Path, *,
               num_cpus: int, gcs_address: str | None = None,
               object_store_bytes: int = 512 * 2**20) -> RayNode:
    """``ray start --block`` of one node in its own process group (a head when
    ``gcs_address`` is None), with resource ``{name: 1}``; returns at once (see the waits)."""
    ports = node_ports(head=gcs_address is None)
    # ``ray start`` through ``ray_start``: a second node can join on loopback, and a node
    # does not die when its raylet registers later than Ray's fixed 30 s
    cmd = [sys.executable, "-m", "pipeline.stack.ray_start", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", f"--resources={json.dumps({name: 1})}",
           f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
           *(f"--{flag}={port}" for flag, port in ports.items())]
    if gcs_address is None:
        cmd += ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                f"--temp-dir={temp_dir}"]
    else:
        # a temp dir of its own: sharing the head's, node2's runtime-env agent deleted the
        # job's unpacked working dir (same path on both nodes) under the head's running driver
        # when node2's last worker of the job exited ("[Errno 2]" from os.getcwd())
        temp_dir = temp_dir / name
        cmd += [f"--address={gcs_address}", f"--temp-dir={temp_dir}"]
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # processes on the node that look for "the" cluster (address "auto", e.g. Ray Train's
    # placement-group cleaner asking the state API) find this one, not "multiple active Ray
    # instances" when other Rays run on the machine
    env = dict(env, RAY_ADDRESS=gcs_address or f"127.0.0.1:{ports['port']}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return RayNode(name, proc.pid, Group.of(proc.pid).start_time, ports, log_path)


def start_cluster(temp_dir: Path, token: Path, log_dir: Path, cpus: tuple[int, int] = (2, 2),
                  timeout_s: float = 600.0) -> RayCluster:
    """Start the head, wait for its jobs API, start the second node and wait until the
    cluster counts two alive nodes; on failure stop what was started and raise RuntimeError."""
    env = ray_env(token)
    deadline = time.monotonic() + timeout_s
    head = _with_retries(lambda: _head_up(temp_dir, env, log_dir, cpus[0], deadline, token))
    dashboard = f"http://127.0.0.1:{head.ports['dashboard-port']}"
    gcs = f"127.0.0.1:{head.ports['port']}"
    try:
        node2 = _with_retries(lambda: _node2_up(temp_dir, env, log_dir, cpus[1], gcs, head,
                                                 token, deadline))
    except BaseException:
        head.stop(timeout_s=10)
        raise
    return RayCluster(head, node2, gcs, dashboard, token, temp_dir)


class _NodeExited(RuntimeError):
    """A node's ``ray start`` exited while starting (Ray gives its raylet a fixed 30 s to
    register with the GCS, which a loaded machine can miss): worth another try."""


def _with_retries(start, attempts: int = 3):
    """``start()``, tried again (fresh ports) when the node exited while starting."""
    for attempt in range(attempts):
        try:
            return start()
        except _NodeExited as err:
            if attempt == attempts - 1:
                raise RuntimeError(str(err)) from None
            print(f"[ray] {err.args[0].splitlines()[0]}; trying again", file=sys.stderr)
    raise AssertionError("unreachable")


def _head_up(temp_dir: Path, env: dict[str, str], log_dir: Path, cpus: int,
             deadline: float, token: Path) -> RayNode:
    """The head, once its jobs API answers and it is registered as an alive node (the
    dashboard can answer first, and a node joining before that fails)."""
    head = start_node("head", temp_dir, env, log_dir / "ray_head.log", num_cpus=cpus)
    dashboard = f"http://127.0.0.1:{head.ports['dashboard-port']}"
    try:
        wait_http(f"{dashboard}/api/version", deadline, lambda: bool(head.group.members()),
                  "the Ray head")
        wait_nodes(dashboard, token, 1, deadline, [head])
    except RuntimeError as err:
        head.stop(timeout_s=10)
        if "exited" in str(err):
            raise _NodeExited(f"Ray head exited while starting; log {head.log_path}") from None
        raise
    except BaseException:
        head.stop(timeout_s=10)
        raise
    return head


def _node2_up(temp_dir: Path, env: dict[str, str], log_dir: Path, cpus: int, gcs: str,
              head: RayNode, token: Path, deadline: float) -> RayNode:
    node2 = start_node("node2", temp_dir, env, log_dir / "ray_node2.log", num_cpus=cpus,
                       gcs_address=gcs)
    try:
        wait_nodes(f"http://127.0.0.1:{head.ports['dashboard-port']}", token, 2, deadline,
                   [head, node2])
    except BaseException:
        node2.stop(timeout_s=10)
        raise
    return node2


def alive_nodes(dashboard: str, token: Path) -> list[dict]:
    """The cluster's alive nodes from the state API (``/api/v0/nodes``), with the token."""
    request = urllib.request.Request(
        f"{dashboard}/api/v0/nodes?limit=1000&detail=true",
        headers={"Authorization": f"Bearer {Path(token).read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def raylet_pids(node: RayNode) -> list[int]:
    """The node's ``raylet`` processes (in its process group), read from ``/proc``."""
    found = []
    for pid in node.group.members():
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"/raylet"):
            found.append(pid)
    return found


def wait_nodes(dashboard: str, token: Path, count: int, deadline: float,
               nodes: list[RayNode]) -> None:
    """Wait until ``count`` nodes are alive; fail at once when a node's group has died, or
    when its raylet has started and died: Ray gives the dashboard agent a fixed 15 s to write
    its port files, the raylet aborts when the agent misses it (its import took longer under
    a load of 25 on 2 cores) and ``ray start`` itself only notices 4 minutes later."""
    last, seen = "no answer yet", {node.name: False for node in nodes}
    while time.monotonic() < deadline:
        for node in nodes:
            if not node.group.members():
                raise _NodeExited(f"Ray {node.name} exited; log {node.log_path}:\n"
                                  f"{tail(node.log_path)}")
            raylets = bool(raylet_pids(node))
            if seen[node.name] and not raylets:
                raise _NodeExited(f"Ray {node.name}'s raylet exited while starting (its "
                                  f"raylet.out in Ray's temp dir says why); log {node.log_path}")
            seen[node.name] |= raylets
        try:
            alive = alive_nodes(dashboard, token)
            if len(alive) >= count:
                return
            last = f"{len(alive)} alive"
        except (OSError, ValueError, KeyError) as err:
            last = repr(err)
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} alive nodes in time ({last}); "
                       f"logs {[str(n.log_path) for n in nodes]}")


def start_head(temp_dir: Path, env: dict[str, str]) -> tuple[RayNode, str]:
    """A single Ray head (``make demo``): ``ray start --head --block`` with environment ``env``
    (``ray_env``), 4 CPUs, every port explicit; returns it and the jobs address once the jobs
    API answers (its log is ``temp_dir/../ray_head.log``)."""
    head = start_node("head", temp_dir, env, temp_dir.parent / "ray_head.log", num_cpus=4)
    address = f"http://127.0.0.1:{head.ports['dashboard-port']}"
    print(f"[ray] head on 127.0.0.1:{head.ports['port']} (jobs API {address})", flush=True)
    try:
        wait_http(f"{address}/api/version", time.monotonic() + 180,
                  lambda: bool(head.group.members()), "the Ray head")
    except BaseException:
        head.stop(timeout_s=10)
        raise
    return head, address


def stop_head(head: RayNode) -> None:
    """Stop a head from ``start_head`` by its process group and wait until it is gone."""
    head.stop()
    print("[ray] head stopped", flush=True)


def job_actor_nodes(dashboard: str, token: Path, submission_id: str, class_name: str) -> set[str]:
    """Node ids that hosted an actor of class ``class_name`` (alive or dead) of the job
    submitted as ``submission_id``, from the jobs API and the state API."""
    headers = {"Authorization": f"Bearer {Path(token).read_text().strip()}"}

    def get(path: str):
        with urllib.request.urlopen(urllib.request.Request(f"{dashboard}{path}", headers=headers),
                                    timeout=60) as response:
            return json.load(response)

    job_id = get(f"/api/jobs/{submission_id}")["job_id"]
    actors = get(f"/api/v0/actors?limit=10000&detail=true&filter_keys=class_name"
                 f"&filter_predicates=%3D&filter_values={class_name}")["data"]["result"]["result"]
    return {a["node_id"] for a in actors if a.get("job_id") == job_id}
