"""``--verbose`` reaches the training driver. What the jobs print by default (their own lines,
one per epoch from rank 0, the summary; no Ray INFO lines, no colour codes) is asserted on the
README's commands, which run the training and retraining jobs as a user does
(``tests/test_readme_commands.py``, ``assert_quiet_output``)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
