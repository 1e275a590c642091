"""The training job's command line: bad configs fail fast with exit status 2 and a clear message."""

from __future__ import annotations

from jobs import train_fmow


def test_unknown_key_exits_2_naming_the_key(capsys):
    assert train_fmow.main(["--set", "optim.learning_rate=0.1"]) == 2
    assert "unknown config key 'optim.learning_rate'" in capsys.readouterr().err


def test_wrong_type_in_file_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("scaling:\n  num_workers: two\n")
    assert train_fmow.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'scaling.num_workers'" in err and "bad.yaml" in err


def test_shipped_configs_load():
    from pathlib import Path

    from pipeline.train.config import load_config

    for path in sorted(Path(train_fmow.ROOT / "jobs" / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.model.name, path
