"""bench/feature_net_cost.py: every net timed, ratios against small_cnn, the JSON line last."""

import json

from bench.feature_net_cost import NETS, main


def test_tiny_run_times_every_net_against_small_cnn(capsys):
    assert main(["--patches", "4", "--side", "24", "--rounds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["ratio"]) == set(NETS) and report["ratio"]["small_cnn"] == 1.0
    assert all(r > 0 for r in report["ratio"].values())
    # the soft mask adds a conv per stage to the same net: more parameters than small_cnn
    assert report["params"]["small_cnn+soft_mask"] > report["params"]["small_cnn"] == 74352
