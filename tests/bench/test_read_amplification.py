"""bench/read_amplification.py runs end to end on tiny scenes (local and its own S3 server)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "read_amplification.py"


def test_bench_runs_and_prints_json_last(capsys, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("read_amplification", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "read_amplification", bench)  # dataclasses need it
    endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
    spec.loader.exec_module(bench)
    code = bench.main(["--sizes", "256", "512", "--patches", "32", "--trials", "1",
                       "--workdir", str(tmp_path), "--json"])
    assert code == 0
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint_before  # the bench restores it
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("amplification", "bytes_per_sample_8k_over_1k", "full_read_over_sample_8k"):
        assert result[key] > 0
    assert {r["store"] for r in result["rows"]} == {"local", "s3"}
    # 32 px patches on 16 px chunks: between exact (1.0) and the worst case ((32+16)/32)**2
    assert 1.0 <= result["amplification"] <= 2.25
