"""Starting a Ray node of the stack, without Ray: the worker port range never holds one of
the node's single ports (``ray start`` refuses that: "is trying to use a port number ... used by
other components"), and a raylet that dies while its node starts ends the wait at once (Ray's
own ``ray start`` notices after 4 minutes)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pipeline.stack import ray_cluster
from pipeline.stack.process import Group, stop_group


def test_worker_range_is_drawn_again_when_it_holds_a_single_port(monkeypatch):
    ranges = iter([40000, 50000])  # the first range holds 40010, a port drawn singly
    monkeypatch.setattr(ray_cluster, "free_port_range", lambda count: next(ranges))
    monkeypatch.setattr(ray_cluster, "free_ports", lambda n: [40010 + i for i in range(n)])
    ports = ray_cluster.node_ports(head=False)
    assert (ports["min-worker-port"], ports["max-worker-port"]) == (50000, 50099)
    singles = [p for k, p in ports.items() if not k.endswith("worker-port")]
    assert len(singles) == 6 and not any(50000 <= p <= 50099 for p in singles)


def test_head_ports_are_distinct_and_apart_from_the_worker_range():
    ports = ray_cluster.node_ports(head=True)
    first, last = ports["min-worker-port"], ports["max-worker-port"]
    singles = [p for k, p in ports.items() if not k.endswith("worker-port")]
    assert last - first + 1 == ray_cluster.WORKER_PORTS
    assert len(set(singles)) == len(singles) == 9
    assert not any(first <= p <= last for p in singles)


def test_a_raylet_that_died_while_starting_ends_the_wait(monkeypatch, tmp_path):
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the node's `ray start`
    node = ray_cluster.RayNode(
        "node2", proc.pid, Group.of(proc.pid).start_time, {}, tmp_path / "ray_node2.log"
    )
    raylets = iter([[], [4242], [4242], []])  # starts, runs, dies
    monkeypatch.setattr(ray_cluster, "raylet_pids", lambda n: next(raylets))
    monkeypatch.setattr(ray_cluster, "alive_nodes", lambda dashboard, token: [{}])  # 1 of 2
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda s: None)
    start = time.monotonic()
    try:
        with pytest.raises(ray_cluster._NodeExited, match="node2's raylet exited"):
            ray_cluster.wait_nodes("http://x", Path("t"), 2, start + 60, [node])
    finally:
        stop_group(node.group, timeout_s=5)
    assert time.monotonic() - start < 30


def test_the_raylet_is_told_the_agent_listen_port():
    from pipeline.stack.ray_start import raylet_command

    agent = "--dashboard_agent_command=python -u agent.py --grpc-port=52375 --listen-port=38027"
    command = ["raylet", "--node_manager_port=1", agent]
    assert raylet_command(command) == [*command, "--dashboard_agent_listen_port=38027"]
    told = [*command, "--dashboard_agent_listen_port=40000"]
    assert raylet_command(told) == told  # already given: unchanged
    assert raylet_command(["raylet", "--dashboard_agent_command=python agent.py"]) == [
        "raylet",
        "--dashboard_agent_command=python agent.py",
    ]
