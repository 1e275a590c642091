"""``bench/scale.py`` runs end to end on small sides: ingest figures, per-sample costs, ratios."""

import json

import pytest

from bench import scale


@pytest.mark.slow
def test_scale_bench_reports_every_side_and_the_ratios(tmp_path, capsys):
    argv = ["--sides", "512,1024", "--samples", "1", "--rounds", "1", "--work", str(tmp_path),
            "--nice", "0", "--json"]
    assert scale.main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["max_side"] == 1024 and set(result["ingest_peak_rss_mb"]) == {"512", "1024"}
    base, top = result["per_side"]["512"], result["per_side"]["1024"]
    assert base["bytes"] > 0 and base["requests"] > 0 and base["memory_mb"] > 0
    assert result["bytes_max_over_1k"] == top["bytes"] / base["bytes"]
    assert result["full_read_over_sample_max"] == top["level0_stored_bytes"] / top["bytes"]
    assert all(v > 0 for v in result["ingest_mpx_per_s"].values())
