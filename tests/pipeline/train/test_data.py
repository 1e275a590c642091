"""Ray Data helpers without Ray: manifest split rows, the view map function, picklable factory."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.read.settings import ReaderSettings
from pipeline.read.source import ZarrSourceFactory, split_rows
from pipeline.train.data import add_views, reader_env
from tests.pipeline.toy_models import ToySourceFactory, write_toy_manifest


def _manifest(tmp_path):
    from pipeline.store.manifest import read_manifest

    uri = write_toy_manifest(str(tmp_path / "manifest.parquet"), n=10, n_val=4)
    return read_manifest(uri)


def test_split_rows_keeps_order_and_columns(tmp_path):
    rows = split_rows(_manifest(tmp_path), "train")
    assert list(rows["key"]) == [f"mem://scene-{i:03d}" for i in range(6)]
    assert rows["label"].tolist() == [0, 1, 0, 1, 0, 1]
    assert rows["size"].shape == (6, 2) and rows["size"].dtype == np.int64
    assert len(split_rows(_manifest(tmp_path), "train", limit=2)["key"]) == 2


def test_split_rows_names_missing_split(tmp_path):
    with pytest.raises(ValueError, match=r"no rows in split 'test'.*\['train', 'val'\]"):
        split_rows(_manifest(tmp_path), "test")


def test_add_views_reads_through_the_source(tmp_path, monkeypatch):
    rows = split_rows(_manifest(tmp_path), "val")
    factory = ToySourceFactory(10)
    monkeypatch.delenv("AWS_TEST_MARKER", raising=False)
    out = add_views(rows, factory, (16, 16), env={"AWS_TEST_MARKER": "1"})
    expected = factory().view(list(rows["key"]), (16, 16)).numpy()
    assert out["view"].shape == (4, 3, 16, 16) and out["view"].dtype == np.float32
    np.testing.assert_array_equal(out["view"], expected)
    assert list(out["key"]) == list(rows["key"])
    assert reader_env()["AWS_TEST_MARKER"] == "1"  # forwarded to the task's environment


def test_zarr_source_factory_pickles_small_and_builds_a_reader():
    factory = ZarrSourceFactory(ReaderSettings(concurrency=4, cache_bytes=1 << 20, process=False,
                                               prefetch_indexes=False))
    clone = pickle.loads(pickle.dumps(factory))
    assert clone == factory and len(pickle.dumps(factory)) < 300
    source = clone()
    assert hasattr(source, "submit") and hasattr(source, "counters")
    assert isinstance(source.level0_sizes, type(source.view))  # a PixelSource-shaped object
