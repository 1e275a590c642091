"""A Ray node's ports: the worker range never holds one of the node's single ports (``ray
start`` refuses that: "is trying to use a port number ... used by other components")."""

from __future__ import annotations

from pipeline.stack import ray_cluster


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
