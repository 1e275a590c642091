"""A much shorter run of bench/learning.py: ATS and Zoom-In learn clearly better than chance.

A small, easy canvas: 300 px with 3 digits of the label and no
others (label = the digit shown), view 60 px (scale 0.2: a digit is about 5.6 px in the view),
patches read at level 1. Ten classes, so chance is 0.10; on 200 test canvases the standard
deviation of a chance-level accuracy is 0.02; the bar is 0.50 (measured here: ATS 0.825,
Zoom-In 0.82 in 36 s).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_attention_models_learn_clearly_better_than_chance():
    bench = load_bench()
    setup = bench.Setup(
        canvas=300, view=60, others=0, n_train=600, n_test=200, epochs=3, budget_s=600,
        batch=8, lr=3e-3, models=("ats", "zoom_in"),
    )
    report = bench.run(setup, log=lambda msg: None)
    assert set(report["acc"]) == {"ats", "zoom_in"}
    for name, acc in report["acc"].items():
        assert acc >= 0.50, f"{name}: test accuracy {acc:.3f} after 3 epochs (chance 0.10)"
    json.dumps({k: v for k, v in report.items() if k != "rows"})  # the --json line serialises


def test_cli_prints_the_json_line_last(capsys):
    bench = load_bench()
    code = bench.main(
        ["--canvas", "300", "--view", "60", "--train", "16", "--test", "8", "--epochs", "1",
         "--batch", "8", "--models", "ats,lowres_cnn", "--json"]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert set(report["acc"]) == {"ats", "lowres_cnn"}
    assert report["canvas"] == 300 and report["seconds"] > 0
    assert set(report["peak_mem_mb"]) == {"ats", "lowres_cnn"}
    assert 0.0 <= report["acc"]["ats"] <= 1.0
