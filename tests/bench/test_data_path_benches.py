"""bench/train_throughput.py and bench/reader_cpu.py end to end on a tiny ingested sample:
every setting runs, the patches come through each store, and the last line is the JSON object
the README describes."""

from __future__ import annotations

import importlib.util
import json
import sys
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
                              "--without-read-ahead", "--also-shard", "64", "--also-max-gap", "0",
                              "--set", "data.batch_size=2", "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert set(report["samples_per_s"]) == {"memory", "local", "s3", "s3_no_read_ahead",
                                            "s3_shard_64", "s3_gap_0"}
    assert all(v > 0 for v in report["samples_per_s"].values())
    assert report["s3_over_memory"] == report["samples_per_s"]["s3"] / report["samples_per_s"]["memory"]
    assert report["data_wait_fraction"]["memory"] == 0.0
    assert 0 < report["bytes_per_sample"] < report["full_resolution_bytes_per_sample"]
    assert report["s3_requests_served"] > 0 and report["scenes"] == 4


def test_rewrite_scene_keeps_pixels_levels_and_attributes_with_new_shards(tiny_manifest, tmp_path):
    import numpy as np
    import zarr

    from pipeline.read.source import open_split

    src = open_split(tiny_manifest, "train", limit=1).keys[0]
    dst = load_bench().rewrite_scene(src, str(tmp_path), 64)
    a, b = (zarr.open_group(u, mode="r", zarr_format=3) for u in (src, dst))
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for k in a.array_keys():
        assert b[k].shards[1:] == (64, 64) and b[k].chunks == a[k].chunks
        assert np.array_equal(a[k][:], b[k][:])
    assert dict(b.attrs["scene"]) == dict(a.attrs["scene"])


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


def test_demo_seeds_runs_each_seed_and_prints_the_spread(tiny_manifest, tmp_path, monkeypatch, capsys):
    """The bench's own part: one training run per seed with that seed and the bench's run
    settings, and the spread over them. ``run_training`` is replaced by a recorder (a real
    run, its Ray start and its seed, is what tests/jobs/test_train_fmow_e2e.py tests)."""
    from types import SimpleNamespace

    from pipeline.train import driver

    seen = []

    def fake_run_training(config, ray_temp_dir=None):
        seen.append((config.run.seed, config.run.mlflow_experiment, config.optim.epochs,
                     config.data.manifest, ray_temp_dir))
        acc = {3: 0.5, 4: 1.0, 5: 0.75}[config.run.seed]
        metrics = {"val/accuracy": acc, "train/accuracy": acc, "train/bytes_per_sample": 100.0 * acc}
        return SimpleNamespace(metrics=metrics, full_scene_bytes_per_sample=1000.0)

    monkeypatch.setattr(driver, "run_training", fake_run_training)
    bench = load_bench(BENCH.parent / "demo_seeds.py")
    assert bench.main(["--seeds", "3,4,5", "--manifest", tiny_manifest, "--runs", str(tmp_path / "runs"),
                       "--ray-temp-dir", str(tmp_path / "ray"), "--config",
                       str(BENCH.parents[1] / "jobs" / "configs" / "tiny.yaml"),
                       "--set", "optim.epochs=1", "--json"]) == 0
    assert seen == [(seed, "demo-seeds", 1, tiny_manifest, tmp_path / "ray") for seed in (3, 4, 5)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("[seeds] seed ") for line in lines) == 3
    summary = json.loads(lines[-1])
    assert summary["seeds"] == [3, 4, 5] and summary["val_accuracy"] == [0.5, 1.0, 0.75]
    assert (summary["min"], summary["median"], summary["max"]) == (0.5, 0.75, 1.0)
    assert summary["val_scenes"] == 1 and summary["full_scene_bytes"] == 1000.0
    assert summary["bytes_per_sample"] == pytest.approx(75.0)
