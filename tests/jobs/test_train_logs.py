"""What the training job prints: by default its own lines only (start, one line per epoch from
rank 0, the summary) without Ray's INFO lines or colour codes; ``--verbose`` brings Ray's back.

The output test runs ``jobs/train_fmow.py`` as a user does, in a child process with its own private
Ray instance (stdout and stderr are pipes, as in a log file), on a tiny local sample.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs import ingest_fmow, make_fmow_sample

ROOT = Path(__file__).resolve().parents[2]
MODEL = (
    "model.overrides={view_size: [32, 32], patch_size: [16, 16], patch_level: 1, n_patches: 4,"
    " attention_backbone: small_cnn, attention_backbone_kwargs: {widths: [8, 8, 8], norm: none},"
    " feature_backbone_kwargs: {widths: [8, 8], kernels: [3, 3]}}"
)
EPOCH_LINE = re.compile(r"\[train\] epoch (\d+)/(\d+): train loss")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """8 train + 4 val scenes of 300-400 px in local pyramids; the manifest path."""
    root = tmp_path_factory.mktemp("logs_data")
    assert make_fmow_sample.main([
        "--out", str(root / "raw"), "--train", "8", "--val", "4", "--classes", "airport,dam",
        "--size", "300,400", "--min-long-side", "300", "--large-fraction", "0", "--workers", "1",
    ]) == 0
    assert ingest_fmow.main(["--src", str(root / "raw"), "--dst", str(root / "pyramids"),
                             "--coarsest", "64", "--progress-s", "60"]) == 0
    return str(root / "pyramids" / "manifest.parquet")


def _train(manifest: str, tmp_path: Path, epochs: int, *extra: str) -> str:
    """Run the training job; its stdout and stderr together (it must exit 0)."""
    sets = [f"data.manifest={manifest}", "data.batch_size=2", "scaling.num_workers=2", MODEL,
            f"optim.epochs={epochs}", f"run.storage_path={tmp_path / 'runs'}", "run.name=logs",
            "run.mlflow_experiment=logs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for name in ("RAY_ADDRESS", "RAY_DATA_LOG_LEVEL", "RAY_COLOR_PREFIX", "MLFLOW_LOGGING_LEVEL",
                 "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # an earlier test's Ray
        env.pop(name, None)
    ray_tmp = tempfile.mkdtemp(prefix="ray-logs-")  # short: Ray's socket paths have a limit
    cmd = [sys.executable, "jobs/train_fmow.py", *[x for s in sets for x in ("--set", s)],
           "--ray-temp-dir", ray_tmp, *extra]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_default_output_is_one_line_per_epoch_without_ray_chatter(manifest, tmp_path):
    out = _train(manifest, tmp_path, 3)
    epochs = [int(m.group(1)) for m in EPOCH_LINE.finditer(out)]
    assert epochs == [1, 2, 3], out
    assert "Reporting training result" not in out
    assert "\x1b[" not in out, "colour codes in a log that is not a terminal"
    assert "streaming_executor" not in out and "Dataset" not in out, "Ray Data's INFO lines"
    assert "Deprecat" not in out, out
    assert re.search(r"elapsed \d+ s", out), "the epoch line gives the elapsed time"
    assert "val accuracy" in out and "bytes read per sample" in out  # the summary
    # what remains is the job's own lines and Ray's warnings and errors, not dozens of Ray
    # lines. (On a machine that runs another Ray instance, Ray Train's placement group cleaner
    # dies with "Found multiple active Ray instances", a traceback of 28 lines: Ray's, left out.)
    lines = [x for x in out.splitlines() if not x.startswith("(PlacementGroupCleaner")]
    assert len(lines) < 20, out


@pytest.mark.parametrize("flag", [[], ["--verbose"]])
def test_verbose_reaches_the_driver(monkeypatch, flag):
    """``--verbose`` is handed to ``run_training`` (whose ``ray_output(verbose=True)`` keeps
    Ray's INFO lines: ``tests/pipeline/train/test_ray_output.py``); a whole verbose run is not
    repeated here, it costs a Ray start and an epoch."""
    from jobs import train_fmow
    from pipeline.train import driver

    seen = {}

    def fake_run_training(config, ray_temp_dir=None, verbose=False):
        seen["verbose"] = verbose
        raise RuntimeError("stop here")

    monkeypatch.setattr(driver, "run_training", fake_run_training)
    assert train_fmow.main(["--config", str(ROOT / "jobs/configs/tiny.yaml"), *flag]) == 1
    assert seen == {"verbose": bool(flag)}
