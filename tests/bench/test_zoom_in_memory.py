"""bench/zoom_in_memory.py: a saved Zoom-In model's distinct tiles and peak memory per canvas."""

import json

import pytest
import torch

from bench.learning import Setup, model_kwargs, save_model
from bench.zoom_in_memory import main
from models.registry import create_model


@pytest.fixture
def saved_zoom_in(tmp_path):
    """An untrained Zoom-In written as ``bench/learning.py --save-models`` writes it, its tiles
    read at the level that fits the canvas (``tile_level=None``)."""
    setup = Setup(canvas=300, view=60, others=0, noise=0, models=("zoom_in",),
                  save_dir=str(tmp_path),
                  model_kwargs={"zoom_in": {"tile_grid": [5, 5], "tile_level": None,
                                            "tile_view": [24, 24], "n_patches": 6}})
    reg, kwargs = model_kwargs("zoom_in", setup)
    torch.manual_seed(0)
    return save_model(create_model(reg, **kwargs), reg, kwargs, setup, "zoom_in")


def test_reports_tiles_level_and_peak_for_every_canvas(saved_zoom_in, capsys):
    assert main([str(saved_zoom_in), "--canvases", "300,600", "--n", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trained_at"] == 300 and report["n_patches"] == 6
    assert [(r["canvas"], r["index"]) for r in report["rows"]] == [
        (300, 0), (300, 1), (600, 0), (600, 1)]
    assert all(1 <= r["tiles"] <= 6 and r["peak_bytes"] > 0 for r in report["rows"])
    # tiles 60 px at 300 px and 120 px at 600 px: each read at the coarsest level still >= 24 px
    assert [r["level"] for r in report["rows"]] == [1, 1, 2, 2]


def test_rejects_a_model_that_is_not_zoom_in(tmp_path):
    setup = Setup(canvas=300, view=60, models=("ats",), save_dir=str(tmp_path))
    reg, kwargs = model_kwargs("ats", setup)
    path = save_model(create_model(reg, **kwargs), reg, kwargs, setup, "ats")
    with pytest.raises(SystemExit):
        main([str(path)])
