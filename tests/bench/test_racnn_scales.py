"""bench/racnn_scales.py: digit cover of a zoom, and a tiny end-to-end run."""

import json

import torch

from bench.racnn_scales import covered, main
from pipeline.synth.megapixel_mnist import DIGIT


def test_a_box_covers_a_digit_when_it_holds_at_least_half_of_it():
    digits = torch.tensor([[[0, 0, DIGIT, DIGIT], [100, 100, 100 + DIGIT, 100 + DIGIT]]])
    half = DIGIT // 2
    boxes = torch.tensor([[[0, 0, DIGIT, half], [0, 0, DIGIT, half - 1], [90, 90, 200, 200]]])
    assert covered(boxes, digits).tolist() == [[[True, False], [False, False], [False, True]]]


def test_tiny_run_reports_every_scale_and_zoom(capsys):
    assert main(["--budget-s", "1", "--train", "8", "--test", "8", "--track", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for table in (report["init"], report["trained"]):
        assert len(table["scale_acc"]) == 2 and len(table["side_px_mean"]) == 1
        assert all(0 <= c <= 5 for c in table["digits_covered"])
    assert report["bytes_per_sample"] > 0 and report["epochs"] >= 1
