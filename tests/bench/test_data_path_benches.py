"""bench/train_throughput.py and bench/reader_cpu.py end to end on a tiny ingested sample:
every setting runs, the patches come through each store, and the last line is the JSON object
the README describes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"


def load_bench(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_three_settings_and_the_json_line(tiny_manifest, capsys, monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, "unset")  # the bench sets its own; restored after the test
    code = load_bench().main(["--manifest", tiny_manifest, "--scenes", "4",
                              "--epochs", "1", "--latency-ms", "5",
                              "--without-read-ahead", "--set", "data.batch_size=2", "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert set(report["samples_per_s"]) == {"memory", "local", "s3", "s3_no_read_ahead"}
    assert all(v > 0 for v in report["samples_per_s"].values())
    assert report["s3_over_memory"] == report["samples_per_s"]["s3"] / report["samples_per_s"]["memory"]
    assert report["data_wait_fraction"]["memory"] == 0.0
    assert 0 < report["bytes_per_sample"] < report["full_resolution_bytes_per_sample"]
    assert report["s3_requests_served"] > 0 and report["scenes"] == 4


def test_reader_cpu_reports_per_sample_costs(tiny_manifest, capsys):
    bench = load_bench(BENCH.parent / "reader_cpu.py")
    assert bench.main(["--manifest", tiny_manifest, "--scenes", "4", "--batches", "5",
                       "--batch", "2", "--patches", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 10 and report["cpu_ms_per_sample"] > 0
    assert report["requests_per_sample"] > 0 and report["chunks_per_sample"] >= 4
    for where in ("thread", "process"):  # 3 reads in flight: each comes back after the one before
        back = report[f"in_flight_ms_{where}"]
        assert len(back) == 3 and 0 < back[0] <= back[1] <= back[2]


def test_demo_learning_prints_per_epoch_accuracies(tiny_manifest, capsys):
    bench = load_bench(BENCH.parent / "demo_learning.py")
    assert bench.main(["--manifest", tiny_manifest, "--epochs", "2", "--batch", "2",
                       "--set", "model.overrides.n_patches=4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["epoch"] for row in report["history"]] == [1, 2] and report["read_ahead"]
    assert all(0.0 <= row["val_accuracy"] <= 1.0 for row in report["history"])


@pytest.mark.ray
@pytest.mark.slow
def test_demo_seeds_prints_the_spread_over_seeds(tiny_manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    bench = load_bench(BENCH.parent / "demo_seeds.py")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    assert bench.main(["--seeds", "3", "--manifest", tiny_manifest, "--runs", str(tmp_path / "runs"),
                       "--ray-temp-dir", ray_tmp, "--config",
                       str(BENCH.parents[1] / "jobs" / "configs" / "tiny.yaml"),
                       "--set", "optim.epochs=1", "--set", "data.batch_size=2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert summary["seeds"] == [3] and len(summary["val_accuracy"]) == 1
    assert summary["val_scenes"] == 1
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert 0 < summary["bytes_per_sample"] < summary["full_scene_bytes"]
