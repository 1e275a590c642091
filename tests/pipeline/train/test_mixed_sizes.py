"""A mix of scene sizes in one run: Zoom-In's coarsest comes from the pyramids, and its automatic
tile level is chosen per scene, so every read exists and costs about the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.registry import create_model
from pipeline.ingest.engine import SceneTask, run_ingest
from pipeline.ingest.folder import load_folder_scene
from pipeline.read.source import open_split
from pipeline.store.manifest import write_manifest
from pipeline.synth.large_scene import write_large_scene
from pipeline.train.config import load_config
from pipeline.train.driver import pyramids_coarsest, resolve_config
from pipeline.train.loop import StepRunner, train_epoch

ROOT = Path(__file__).resolve().parents[3]
SIDES = (1100, 2200, 3300)


def test_pyramids_coarsest_is_the_largest_coarsest_level_of_any_scene():
    table = pd.DataFrame({"level_shapes": ["[[1000, 600], [500, 300], [250, 150]]",
                                           "[[4096, 4096], [2048, 2048], [1024, 1024], [512, 512]]",
                                           "[[90, 70]]"]})
    assert pyramids_coarsest(table) == 512
    assert pyramids_coarsest(table.iloc[:0]) is None


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory) -> str:
    """Three scenes of 1,100, 2,200 and 3,300 px (tiled TIFFs) ingested down to 1,024 px
    (fewer levels than the demo's 128: 2, 3 and 3; coarsest levels of 550, 550 and 825 px)."""
    root = tmp_path_factory.mktemp("mixed")
    tasks = []
    for i, side in enumerate(SIDES):
        path = str(root / f"s{side}.tif")
        write_large_scene(path, side, tile=128, seed=i)
        tasks.append(SceneTask(f"s{side}", "train", path, "ab"[i % 2]))
    report = run_ingest(tasks, load_folder_scene, ("a", "b"), str(root / "pyr"), coarsest=1024,
                        out=None)
    assert report.counts["written"] == 3, report.rejects
    manifest = str(root / "pyr" / "manifest.parquet")
    write_manifest(manifest, report.rows, ("a", "b"))
    return manifest


class Recording:
    """The reader, remembering each request's keys and per-scene levels."""

    def __init__(self, source):
        self.source, self.requests = source, []

    def view(self, keys, size):
        return self.source.view(keys, size)

    def level0_sizes(self, keys):
        return self.source.level0_sizes(keys)

    def read(self, keys, request):
        self.requests.append((list(keys), request.levels, request.size))
        return self.source.read(keys, request)


def _train_one_batch(split, config) -> tuple[Recording, float]:
    torch.manual_seed(0)
    model = create_model(config.model.name, **config.model.overrides)
    source = Recording(split.source_factory())
    keys, sizes, labels = split.keys, torch.as_tensor(split.rows["size"]), split.rows["label"]
    views = source.view(keys, model.view_size)
    runner = StepRunner(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                        source=source, micro_batches=1, clip_norm=1.0,
                        generator=torch.Generator().manual_seed(1))
    batch = {"key": np.array(keys), "view": views.numpy(), "size": sizes.numpy(),
             "label": np.asarray(labels)}
    stats = train_epoch(runner, [batch], 0)
    return source, stats.metrics("train")["train/loss"]


def test_zoom_in_trains_on_a_mix_of_sizes_with_one_tile_level_per_scene(mixed_manifest):
    split = open_split(mixed_manifest, "train")
    # the demo's recipe with the automatic tile level and a coarsest the pyramids do not have
    config = load_config(ROOT / "infra/configs/fmow_ats_local.yaml",
                         ["model.overrides.tile_level=null", "model.overrides.coarsest=16"])
    coarsest = pyramids_coarsest(split.manifest)
    assert coarsest == 825  # the 3,300 px scene stops at 825 px
    fixed = resolve_config(config, list(split.classes), coarsest)
    assert fixed.model.overrides["coarsest"] == 825
    source, loss = _train_one_batch(split, fixed)
    assert np.isfinite(loss)
    tile_reads = [r for r in source.requests if r[2] == (64, 64)]
    assert tile_reads, source.requests
    keys, tile_levels, _ = tile_reads[0]
    by_side = dict(zip((int(k.rsplit("s", 1)[-1]) for k in keys), tile_levels, strict=True))
    # tiles of side / 4 px would span 64 px at levels 2, 3, 3; the pyramids stop at 1, 2, 2
    assert by_side == {1100: 1, 2200: 2, 3300: 2}, by_side


def test_without_the_pyramids_coarsest_the_model_asks_for_a_missing_level(mixed_manifest):
    split = open_split(mixed_manifest, "train")
    config = load_config(ROOT / "infra/configs/fmow_ats_local.yaml",
                         ["model.overrides.tile_level=null", "model.overrides.coarsest=16"])
    with pytest.raises(Exception, match="has 2 levels, asked for 2"):  # the 1,100 px scene
        _train_one_batch(split, resolve_config(config, list(split.classes)))


@pytest.mark.parametrize("name", ["stn", "tnet", "racnn", "two_level"])
def test_models_that_choose_a_read_level_take_the_pyramids_coarsest(name):
    """STN, TNet, RA-CNN and two-level attention choose their read level per batch: with the
    pyramids' coarsest (here 1,024 px: a 1,100 px scene has 2 levels) they ask only for levels
    that exist; with the old fixed 256 px they asked for a third."""
    from models.memory import TensorPyramidSource

    image = torch.randint(0, 256, (3, 1100, 1100), dtype=torch.uint8)
    source = TensorPyramidSource.from_images({"a": image}, coarsest=1024)
    config = resolve_config(load_config(None, [f"model.name={name}"]), ["x", "y"], coarsest=1024)
    assert config.model.overrides["coarsest"] == 1024

    def run(coarsest: int):
        model = create_model(name, **{**config.model.overrides, "coarsest": coarsest}).eval()
        return model(source.view(["a"], model.view_size), source.level0_sizes(["a"]), source,
                     ["a"], torch.Generator().manual_seed(0))

    assert run(1024).logits.shape == (1, 2)
    with pytest.raises(ValueError, match="has 2 levels, asked for 3"):
        run(256)
