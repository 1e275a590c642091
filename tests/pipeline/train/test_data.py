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


def test_rank_rows_deal_is_a_function_of_the_seed():
    from pipeline.train.data import rank_rows

    rows = {"key": np.array([f"s{i}" for i in range(11)]), "label": np.arange(11) % 3,
            "size": np.ones((11, 2), dtype=np.int64)}
    first, again = rank_rows(rows, 2, seed=5), rank_rows(rows, 2, seed=5)
    other = rank_rows(rows, 2, seed=6)
    assert [list(p["key"]) for p in first] == [list(p["key"]) for p in again]
    assert [list(p["key"]) for p in first] != [list(p["key"]) for p in other]
    # training: equal parts (the remainder is left out), no scene twice, labels follow keys
    assert [len(p["key"]) for p in first] == [5, 5]
    dealt = np.concatenate([p["key"] for p in first])
    assert len(set(dealt)) == 10
    for part in first:
        assert [int(k[1:]) % 3 for k in part["key"]] == list(part["label"])
    # validation: every scene once, in manifest order
    val = rank_rows(rows, 2, seed=None)
    assert [list(p["key"]) for p in val] == [[f"s{i}" for i in range(6)], [f"s{i}" for i in range(6, 11)]]


def test_add_views_marks_an_unreadable_scene_instead_of_failing(tmp_path):
    """A scene whose view cannot be read gets a zero view and an error (quarantined by the
    worker); rows are never dropped, and a row that came with an error is not read."""
    from pipeline.read.reader import ZarrPixelSource
    from tests.pipeline.scenes import write_scenes

    keys = list(write_scenes(str(tmp_path), [(100, 120), (90, 90)]))
    gone = str(tmp_path / "gone")
    rows = {"key": np.array([keys[0], gone, keys[1]]), "label": np.array([0, 1, 0]),
            "error": np.array(["", "", ""], dtype=object)}
    out = add_views(rows, ZarrPixelSource, (16, 16))
    assert out["view"].shape == (3, 3, 16, 16) and not out["view"][1].any()
    assert out["error"][0] == out["error"][2] == "" and "no pyramid group" in out["error"][1]
    np.testing.assert_array_equal(out["view"][[0, 2]],
                                  ZarrPixelSource().view([keys[0], keys[1]], (16, 16)).numpy())
    marked = {**rows, "error": np.array(["", "", "has 1 pyramid levels"], dtype=object)}
    out = add_views(marked, ZarrPixelSource, (16, 16))
    assert out["error"][2] == "has 1 pyramid levels" and not out["view"][2].any()
