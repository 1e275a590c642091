"""``stack.down`` without servers: process groups standing in for them are stopped wave by
wave (Ray nodes, then the rest), reported in stop order, and a second ``down`` finds none."""

from __future__ import annotations

import json
import subprocess

from pipeline.stack import stack
from pipeline.stack.process import Group


def test_down_stops_every_recorded_group_and_is_idempotent(tmp_path):
    names = ("seaweed", "ray_head", "mlflow")  # recorded out of stop order
    procs = {n: subprocess.Popen(["sleep", "60"], start_new_session=True) for n in names}
    groups = {n: Group.of(p.pid) for n, p in procs.items()}
    services = {
        n: {"pid": g.pgid, "start_time": g.start_time, "ports": {}, "log": ""}
        for n, g in groups.items()
    }
    (tmp_path / "stack.json").write_text(json.dumps({"services": services, "env": {}}))
    try:
        assert stack.down(tmp_path, quiet=True) == ["ray_head", "mlflow", "seaweed"]
        assert all(g.members() == [] for g in groups.values())
        assert stack.down(tmp_path, quiet=True) == []
        assert stack.load(tmp_path).state["services"] == {}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
