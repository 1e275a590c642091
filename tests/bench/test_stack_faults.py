"""bench/stack_faults.py without a stack: selection through bench/faults.py, and the figures
read from a run's checkpoint folder (orphans, committed epochs) and its output lines."""

from __future__ import annotations

import json

from bench import faults, stack_faults
from bench.stack_faults import Rig


def test_stack_entries_are_selected_by_name_and_keep_their_order(monkeypatch, capsys, tmp_path):
    calls = {}

    def fake_stack(names, work):
        calls["stack"] = list(names)
        return {n: {"ok": False, "fake": True} for n in names if n in stack_faults.STACK_ENTRIES}

    def fake_local(names, work):
        calls["local"] = list(names)
        return {n: {"ok": True} for n in names}

    monkeypatch.setattr(faults, "run_stack_entries", fake_stack)
    monkeypatch.setattr(faults, "run_local", fake_local)
    only = "node_killed,missing_shard,worker_killed"
    assert faults.main(["--json", "--only", only, "--keep", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result) == only.split(",")
    assert calls["local"] == ["missing_shard"]
    assert result["node_killed"] == {"ok": False, "fake": True}


def _checkpoint(base, name, files):
    folder = base / "run" / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_bytes(b"x")


def test_orphans_are_unlisted_or_incomplete_folders_and_committed_is_read(tmp_path):
    rig = Rig(stack=None, work=tmp_path, manifest="", storage=str(tmp_path))
    assert stack_faults._committed(rig, "run") == 0  # no snapshot yet
    _checkpoint(tmp_path, "checkpoint_2026-12-02_08-15-58.099035", ["state.pt", "meta.json"])
    _checkpoint(tmp_path, "checkpoint_2026-12-02_08-16-07.740158", ["state.pt", "meta.json"])
    _checkpoint(tmp_path, "checkpoint_2026-12-02_08-16-09.000001", ["meta.json"])  # cut short
    _checkpoint(tmp_path, "checkpoint_2026-12-02_08-16-20.000002", ["state.pt", "meta.json"])
    listed = ["checkpoint_2026-12-02_08-15-58.099035", "checkpoint_2026-12-02_08-16-09.000001"]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": d, "metrics": {"epoch": e}}
                                       for d, e in zip(listed, (1.0, 2.0), strict=True)]}
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    found = stack_faults._checkpoints(rig, "run")
    assert len(found["checkpoint_folders"]) == 4
    assert found["orphans"] == ["checkpoint_2026-12-02_08-16-07.740158",
                                "checkpoint_2026-12-02_08-16-09.000001",
                                "checkpoint_2026-12-02_08-16-20.000002"]
    assert stack_faults._committed(rig, "run") == 3  # 0-based epoch 2 done


def test_epoch_lines_are_the_epoch_summaries_not_the_step_counter():
    lines = ["(RayTrainWorker pid=1) [train] epoch 1/4: step 1/2 | 0.05 steps/s | eta 20 s",
             "(RayTrainWorker pid=1) [train] epoch 1/4: train loss 1.820 acc 0.188 | val acc",
             "(RayTrainWorker pid=2) [train] resumed from the checkpoint before epoch 2 (step 3)",
             "(RayTrainWorker pid=2) [train] epoch 2/4: train loss 1.646 acc 0.250 | val acc"]
    assert [int(m.group(1)) for m in map(stack_faults.EPOCH_LINE.search, lines) if m] == [1, 2]
    assert [int(m.group(1)) for m in map(stack_faults.RESUMED_LINE.search, lines) if m] == [2]
