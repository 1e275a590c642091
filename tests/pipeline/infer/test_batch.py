"""``pipeline.infer.batch`` without Ray: the actor class called directly on manifest blocks.

Its predictions equal the registered model's ``Predictor`` on the same scenes and seed, its
bytes per scene equal what a fresh reader reads for that scene alone, a scene whose shards
are gone becomes an error row while the rest of its batch is still predicted, and the
summary counts what the table holds.
"""

import pyarrow as pa
import pytest

from pipeline.infer import batch
from pipeline.read.reader import ZarrPixelSource, reads_by_scene
from pipeline.track import tracking
from pipeline.track.packaging import Predictor
from tests.pipeline.infer_fixtures import (
    CLASSES,
    delete_shards,
    register_brightness,
    write_brightness_manifest,
)
from tests.pipeline.tracking_fixtures import brightness_model, fresh_mlflow_uri


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh SQLite MLflow holding ``tiny-batch@champion``; its tracking URI."""
    uri = fresh_mlflow_uri(tmp_path_factory)
    register_brightness(uri)
    return uri


@pytest.fixture(scope="module")
def actor(registry):
    """The actor class as Ray Data would build it, here in the test process."""
    model = tracking.resolve_model("models:/tiny-batch@champion", registry)
    return batch.ScenePredictor(model, registry, seed=0, env={})


def _direct(uri: str, seed: int = 0):
    """(record, bytes) of a ``Predictor`` with a fresh reader on ``uri`` alone."""
    source = ZarrPixelSource()
    predictor = Predictor(model=brightness_model(), spec={"classes": CLASSES})
    return predictor.predict_source(source, [uri], 1, seed)[0], source.counters().bytes


def test_the_actor_predicts_like_the_predictor_and_counts_each_scenes_bytes(actor, tmp_path):
    manifest = write_brightness_manifest(str(tmp_path), n=6)
    rows = batch.manifest_rows(manifest)
    out = actor(rows.slice(0, 4)).to_pylist()
    assert [r["scene_id"] for r in out] == rows["scene_id"].to_pylist()[:4]
    for row in out:
        want, want_bytes = _direct(row["uri"])
        assert row["error"] is None
        assert row["predicted"] == want["label"] and row["predicted_class"] == want["class"]
        assert row["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-7)
        assert row["bytes_read"] == want_bytes > 0
        assert row["requests"] > 0
        assert row["correct"] is True  # brightness_model is right on every scene
        assert row["model_uri"] == "models:/tiny-batch/1" and row["model_version"] == "1"


def test_a_scene_without_shards_is_an_error_row_and_its_batch_is_still_predicted(actor, tmp_path):
    manifest = write_brightness_manifest(str(tmp_path), n=4)
    rows = batch.manifest_rows(manifest)
    bad = rows["label"].to_pylist().index(1)  # a bright scene: every shard holds pixels
    broken = rows["uri"][bad].as_py()
    assert delete_shards(broken) == 3
    out = actor(rows).to_pylist()
    assert [r["error"] is None for r in out] == [i != bad for i in range(4)]
    assert broken in out[bad]["error"] and "missing" in out[bad]["error"]
    assert out[bad]["predicted"] is None and out[bad]["probabilities"] is None
    assert out[bad]["correct"] is None
    for row in out[:bad] + out[bad + 1:]:  # predicted alone after the batch failed: same bytes
        want, want_bytes = _direct(row["uri"])
        assert row["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-7)
        assert row["bytes_read"] == want_bytes


def test_reads_are_split_per_scene_exactly(tmp_path):
    manifest = write_brightness_manifest(str(tmp_path), n=3)
    uris = batch.manifest_rows(manifest)["uri"].to_pylist()
    together = ZarrPixelSource(record_requests=True)
    predictor = Predictor(model=brightness_model(), spec={"classes": CLASSES})
    predictor.predict_source(together, uris, 3)
    split = reads_by_scene(together.requests(), uris)
    assert sum(c.bytes for c in split.values()) == together.counters().bytes
    for uri in uris:
        alone = ZarrPixelSource()
        predictor.predict_source(alone, [uri], 1)
        assert split[uri].bytes == alone.counters().bytes
        assert split[uri].requests == alone.counters().requests
    with pytest.raises(ValueError, match="share a key prefix"):
        reads_by_scene([], ["s3://a/x/scene", "s3://b/x/scene"])


def test_manifest_rows_keep_one_split_and_name_the_missing_one(tmp_path):
    manifest = write_brightness_manifest(str(tmp_path), n=6)
    assert batch.manifest_rows(manifest).num_rows == 6
    val = batch.manifest_rows(manifest, "val")
    assert val["split"].to_pylist() == ["val", "val"] and val["row"].to_pylist() == [0, 1]
    with pytest.raises(ValueError, match="no rows in split 'dev'.*'test', 'train', 'val'"):
        batch.manifest_rows(manifest, "dev")


def test_summary_counts_the_table(tmp_path):
    table = pa.table({
        "error": [None, "x: gone", None, None],
        "correct": [True, None, False, None],
        "bytes_read": [100, 7, 300, 200],
    })
    model = tracking.ModelRef("models:/m@champion", "models:/m/2", "m", "2")
    job = batch.PreparedJob(batch.BatchPredictSpec("models:/m@champion", "m.parquet",
                                                   "o.parquet"), model, "sqlite://", table)
    summary = batch.summarize(table, job, wall_s=2.0)
    assert (summary.predicted_scenes, summary.failed_scenes, summary.labelled_scenes) == (3, 1, 2)
    assert summary.accuracy == 0.5 and summary.bytes_per_scene == 200.0
    assert summary.scenes_per_s == 2.0
    assert summary.as_json()["model_uri"] == "models:/m/2"


def test_the_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        batch.BatchPredictSpec("models:/m@c", "m.parquet", "o.parquet", batch_size=0)
    with pytest.raises(ValueError, match=r"\.parquet"):
        batch.BatchPredictSpec("models:/m@c", "m.parquet", "out.csv")


def test_blocks_hold_whole_batches_and_stay_few():
    assert batch.block_rows(9, 2) == 2
    assert batch.block_rows(10_000, 8, max_blocks=1000) == 16
    assert batch.block_rows(10_000, 8, max_blocks=1000) * 1000 >= 10_000


class _Blocks:
    """Stands in for a Ray Dataset: ``iter_batches`` gives the blocks as they are."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, batch_size=None, batch_format="pyarrow"):
        return iter(self.blocks)


def test_collect_restores_manifest_order_and_refuses_lost_rows():
    def block(rows, errors):
        return pa.table({"error": pa.array(errors, pa.string()), batch.ROW: pa.array(rows, pa.int64())})

    said = []
    blocks = [block([2, 3], [None, "x"]), block([0, 1], [None, None])]
    table = batch.collect(_Blocks(blocks), 4, said.append)
    assert table.column_names == ["error"] and table["error"].to_pylist() == [None, None, None, "x"]
    assert said[0].startswith("[infer] 2/4 scenes, 1 failed") and "first results" in said[0]
    assert said[-1].startswith("[infer] 4/4 scenes, 1 failed")
    with pytest.raises(RuntimeError, match="expected 5 prediction rows, got 4"):
        batch.collect(_Blocks(blocks), 5, said.append)
