"""``bench/checksum_cost.py`` runs and reports both encodings and their ratio."""

import json

from bench import checksum_cost


def test_checksum_cost_reports_both_and_the_ratio(capsys):
    assert checksum_cost.main(["--side", "300", "--rounds", "2", "--batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["checksum"] > 0 and result["none"] > 0
    assert result["read_ratio"] == result["checksum"] / result["none"]
    assert result["decode_checksum"] > 0 and result["decode_none"] > 0
