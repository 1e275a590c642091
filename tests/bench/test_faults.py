"""bench/faults.py: the cheap entries of the fault matrix run end to end (SeaweedFS, the fault
proxy, the reader) and report what they found as the last JSON line."""

from __future__ import annotations

import json
import os

import pytest

from bench import faults

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def test_cheap_entries_run_and_report_json_last(capsys, tmp_path):
    endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
    names = ["missing_shard", "truncated_shard", "index_404"]
    assert faults.main(["--json", "--only", ",".join(names), "--keep", str(tmp_path)]) == 0
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint_before  # the bench restores it
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result) == names
    for name in names:  # mended already: an error naming the scene, never zeros or garbage
        entry = result[name]
        assert entry["ok"] is True, (name, entry)
        assert entry["wrong_without_error"] == 0 and entry["errors_not_naming_the_scene"] == 0
    assert result["missing_shard"]["read_errors"] > 0
    assert result["index_404"]["injected"]["404"] > 0  # the proxy did inject
    assert result["index_404"]["right"] > 0  # and the reads it spared came back right


def test_unknown_entry_is_refused():
    with pytest.raises(SystemExit) as info:
        faults.main(["--only", "missing_shard,no_such_fault"])
    assert info.value.code == 2


def test_only_takes_the_two_groups_by_name():
    assert faults.parse_args(["--only", "integrity"]).names == list(faults.INTEGRITY_ENTRIES)
    assert faults.parse_args(["--only", "stack,integrity"]).names == [
        *faults.STACK_ENTRIES, *faults.INTEGRITY_ENTRIES]
    assert faults.parse_args(["--only", "s3_stalls,integrity"]).names[0] == "s3_stalls"
    assert len(faults.parse_args([]).names) == 16
