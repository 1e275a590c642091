"""remove_orphan_checkpoints: the run's checkpoint folders that Ray Train's snapshot does not
list are deleted, the listed ones and everything else stay; without a snapshot nothing goes."""

from __future__ import annotations

import json

import pytest

from pipeline.train.checkpoint import SNAPSHOT_FILE, remove_orphan_checkpoints


def _folder(run, name, files=("state.pt", "meta.json")):
    (run / name / "sub").mkdir(parents=True)
    for file in files:
        (run / name / file).write_bytes(b"x")
    (run / name / "sub" / "extra.bin").write_bytes(b"y")


def test_unlisted_folders_are_removed_and_listed_ones_kept(tmp_path):
    run = tmp_path / "store" / "run-a"
    kept = ["checkpoint_2026-12-02_09-12-25.074270", "checkpoint_2026-12-02_09-12-28.627328"]
    orphans = ["checkpoint_2026-12-02_09-11-21.491592", "checkpoint_2026-12-02_09-11-30.000001"]
    for name in kept + orphans:
        _folder(run, name)
    (run / ".validate_storage_marker").write_bytes(b"")
    assert remove_orphan_checkpoints(str(run)) == []  # no snapshot: nothing is known, nothing goes
    assert all((run / name).is_dir() for name in kept + orphans)
    (run / SNAPSHOT_FILE).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in kept]}))
    assert remove_orphan_checkpoints(str(run) + "/") == orphans
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".validate_storage_marker", SNAPSHOT_FILE, *kept])
    assert (run / kept[0] / "sub" / "extra.bin").exists()
    assert remove_orphan_checkpoints(str(run)) == []  # idempotent


@pytest.mark.s3
def test_orphans_are_removed_from_s3_and_the_snapshot_stays(s3_server):
    from pipeline.store import storage

    run = f"{s3_server.new_bucket('orphans')}/store/run-b"  # s3://bucket/...
    kept, orphan = "checkpoint_2026-12-02_09-12-28.627328", "checkpoint_2026-12-02_09-11-21.491592"
    for name in (kept, orphan):
        for file in ("state.pt", "meta.json"):
            storage.write_bytes(f"{run}/{name}/{file}", b"x")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": kept, "metrics": {}}]}
    storage.write_bytes(f"{run}/{SNAPSHOT_FILE}", json.dumps(snapshot).encode())
    assert remove_orphan_checkpoints(run) == [orphan]
    assert storage.list_prefix(run) == sorted(
        [f"{run}/{kept}/meta.json", f"{run}/{kept}/state.pt", f"{run}/{SNAPSHOT_FILE}"])
