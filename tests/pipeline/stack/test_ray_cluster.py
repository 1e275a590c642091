"""The two-node Ray cluster: both nodes alive, a task pinned to node2 runs there, the ingest
runs on both nodes as on one machine, loopback only, token required, nothing of ours left
after stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.stack.ray_cluster import alive_nodes, ray_env, start_cluster
from pipeline.train.driver import write_token_file
from tests.pipeline.stack.conftest import group_sockets
from tests.sockets import is_loopback, process_tree

ROOT = Path(__file__).resolve().parents[3]

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
        _ingest_on_the_cluster_equals_the_local_ingest(cluster.gcs_address, token, stack_dir)
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


def _ingest_on_the_cluster_equals_the_local_ingest(gcs: str, token, work) -> None:
    """``jobs/ingest_fmow.py --scheduler ray`` on the cluster (issue 17): the scenes run on
    both nodes, and the manifest and rejects equal dask's local path on the same inputs."""
    from pipeline.store.manifest import read_manifest, read_rejects
    from tests.pipeline.fmow_fixtures import make_sample, small_spec

    src = work / "fmow"
    make_sample(str(src), small_spec(train=6, val=2, bad=3))
    outs = {}
    for name, extra, env in (("local", [], os.environ),
                             ("ray", ["--scheduler", "ray"],
                              {**ray_env(token), "RAY_ADDRESS": gcs})):
        dst = work / f"pyr-{name}"
        done = subprocess.run([sys.executable, "jobs/ingest_fmow.py", "--src", str(src),
                               "--dst", str(dst), "--workers", "4", *extra], cwd=ROOT,
                              env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 3, done.stderr[-3000:]  # 3: some inputs rejected
        outs[name] = (done.stderr, read_manifest(str(dst / "manifest.parquet")).to_pandas(),
                      read_rejects(str(dst / "manifest.parquet")).to_pandas())
    assert "ran as Ray tasks on 2 node(s)" in outs["ray"][0], outs["ray"][0][-3000:]
    same = ["scene_id", "split", "label", "category", "height", "width"]
    local, ray_ = (outs[n][1][same].sort_values("scene_id").reset_index(drop=True)
                   for n in ("local", "ray"))
    assert len(local) == 8 and local.equals(ray_)
    kinds = [sorted(zip(outs[n][2]["path"], outs[n][2]["kind"], strict=True))
             for n in ("local", "ray")]
    assert len(kinds[0]) == 3 and kinds[0] == kinds[1]


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
