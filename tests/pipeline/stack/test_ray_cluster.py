"""The two-node Ray cluster: both nodes alive, a task pinned to node2 runs there, loopback
only, token required, nothing of ours left after stop."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from pipeline.stack.ray_cluster import alive_nodes, ray_env, start_cluster
from pipeline.train.driver import write_token_file
from tests.pipeline.stack.conftest import group_sockets
from tests.sockets import is_loopback, process_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_TASK = """
import json, ray
ray.init(address={gcs!r})
where = ray.remote(resources={{"node2": 1}})(lambda: ray.get_runtime_context().get_node_id())
print(json.dumps({{"node2_task": ray.get(where.remote())}}))
"""


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_two_nodes_task_on_node2_loopback_and_stop(stack_dir):
    token = write_token_file(stack_dir)
    cluster = start_cluster(stack_dir / "t", token, stack_dir)
    try:
        nodes = alive_nodes(cluster.dashboard, token)
        assert len(nodes) == 2
        by_resource = {r: n["node_id"] for n in nodes for r in ("head", "node2")
                       if r in n["resources_total"]}
        assert set(by_resource) == {"head", "node2"} and len(set(by_resource.values())) == 2
        out = subprocess.run([sys.executable, "-c", _TASK.format(gcs=cluster.gcs_address)],
                             env=ray_env(token), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1])["node2_task"] == by_resource["node2"]
        sockets = group_sockets(cluster.head.pid, cluster.node2.pid)
        assert len(sockets) > 10 and [s for s in sockets if not is_loopback(s[2])] == []
        ports = {s[3] for s in sockets}
        for node in (cluster.head, cluster.node2):  # the ports we chose are the ones in use
            assert node.ports["node-manager-port"] in ports
        assert _status(f"{cluster.dashboard}/api/version") == 401  # no token, no answer
        ours = {pid: _stat(pid) for pid in process_tree(cluster.head.pid) + process_tree(cluster.node2.pid)}
    finally:
        assert cluster.stop()
    assert cluster.head.group.members() == [] and cluster.node2.group.members() == []
    left = [pid for pid, before in ours.items() if _alive_same(pid, before)]
    assert left == [], left


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the name (state first, start time at [19])."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive_same(pid: int, before: list[str] | None) -> bool:
    """The same process (same start time) still runs, not a zombie or a reused pid."""
    now = _stat(pid)
    return bool(now and before and now[19] == before[19] and now[0] != "Z")
