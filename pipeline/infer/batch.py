"""Batch prediction over a manifest with Ray Data: one Parquet row per scene.

``prepare(spec)`` then ``run(job)`` (``jobs/batch_predict.py`` starts Ray in between, so that a
wrong model name or manifest fails before Ray starts):
1. the model URI is pinned (``pipeline.track.tracking.resolve_model``: ``models:/NAME@champion``
   -> ``models:/NAME/3``), so every actor loads the same version even if the alias moves while
   the job runs; the manifest's rows (every split, or one) are read and cut into blocks of
   ``batch_size`` scenes;
2. Ray Data maps the blocks with ``ScenePredictor`` on ``concurrency`` actors: each loads the
   model once (from the registry, nothing unpickled) and keeps one recording reader
   (``pipeline.read.settings.EXACT_READS``: only the planned chunk bytes, in the actor's
   process) for all its batches;
3. the driver collects the rows (printing progress), puts them back in manifest order and writes
   one Parquet file (``PREDICTION_SCHEMA``) to ``spec.out``, a local path or ``s3://`` URI
   (``pipeline.store.storage``, ``AWS_*`` variables).

Reproducibility: every forward pass starts a fresh generator seeded with ``spec.seed``, and the
sampling models draw a scene's samples from one draw of that generator and the scene's own view
(``models.ats.scene_seeds``), so a scene's prediction does not depend on the batch or actor it
lands in. It equals ``jobs/predict.py --seed S`` whenever predict.py makes one forward pass (at
most ``--batch-size`` URIs).

Failures: a batch whose read or forward pass fails is predicted again scene by scene (cache
cleared, so each scene's bytes are its own); a scene that fails alone gets a row with ``error``
(naming the scene) and no prediction; the others are predicted. Bytes per scene: the bytes of
the store requests the reader made for that scene (metadata, shard indexes, chunk ranges;
``pipeline.read.reader.reads_by_scene``), what a ``Predictor`` with a fresh reader reads for
the scene alone.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

PREDICTION_SCHEMA = pa.schema([
    ("scene_id", pa.string()),
    ("uri", pa.string()),  # the scene's pyramid
    ("split", pa.string()),
    ("label", pa.int32()),  # true class index from the manifest (null: none)
    ("category", pa.string()),  # true class name from the manifest (null: none)
    ("predicted", pa.int32()),  # predicted class index (null: the scene failed)
    ("predicted_class", pa.string()),  # its name in the model's class list
    ("probabilities", pa.list_(pa.float32())),  # softmax over the model's classes
    ("correct", pa.bool_()),  # null when unlabelled or failed
    ("bytes_read", pa.int64()),  # bytes the reader fetched for this scene
    ("requests", pa.int64()),  # store requests it made for this scene
    ("model_uri", pa.string()),  # the pinned URI every actor loaded (models:/NAME/VERSION)
    ("model_version", pa.string()),  # null for a model that is not registered
    ("error", pa.string()),  # null, or why the scene could not be predicted
])
"""One row per manifest row (of the split), in manifest order."""

ROW = "row"  # manifest position: carried through Ray Data to restore the order
ENV_PREFIXES = ("AWS_", "MLFLOW_")  # storage and registry settings the actors need
MAX_BLOCKS = 1000  # Ray Data blocks of manifest rows at most (see ``block_rows``)


@dataclass(frozen=True, slots=True)
class BatchPredictSpec:
    """What to predict and where to put it.

    Attributes:
        model: ``models:/NAME@alias``, ``models:/NAME/VERSION`` or any MLflow model URI.
        manifest: URI of the scenes' ``manifest.parquet`` (local or ``s3://``).
        out: URI of the Parquet file to write (local or ``s3://``).
        split: the manifest split to predict, or ``"all"``.
        batch_size: scenes per forward pass (and per Ray Data batch).
        concurrency: Ray actors, each holding one copy of the model.
        seed: seed of the models' sampling (see the module docstring).
        tracking_uri: MLflow tracking URI (None: ``MLFLOW_TRACKING_URI`` or the work tree's).
        cpus_per_actor: CPUs Ray reserves per actor (also its torch threads, at least 1).
    """

    model: str
    manifest: str
    out: str
    split: str = "all"
    batch_size: int = 8
    concurrency: int = 2
    seed: int = 0
    tracking_uri: str | None = None
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1 or self.cpus_per_actor <= 0:
            raise ValueError(f"need batch_size >= 1, concurrency >= 1, cpus_per_actor > 0; got "
                             f"{self.batch_size}, {self.concurrency}, {self.cpus_per_actor}")
        if not self.out.endswith(".parquet"):
            raise ValueError(f"--out must name a .parquet file, got {self.out!r}")


@dataclass(frozen=True, slots=True)
class PreparedJob:
    """A spec with its model pinned (``tracking.ModelRef``), its tracking URI resolved and the
    manifest rows to predict (``manifest_rows``)."""

    spec: BatchPredictSpec
    model: Any
    tracking_uri: str
    rows: pa.Table


@dataclass(frozen=True, slots=True)
class SceneResult:
    """One scene's outcome: ``record`` (``packaging.prediction_record``) or ``error``, and
    the ``requests`` and ``bytes`` the reader made and read for it."""

    uri: str
    record: Mapping[str, Any] | None
    requests: int
    bytes: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """Totals of a finished job. ``accuracy`` over the predicted scenes with a label (None
    when none has one); ``bytes_per_scene`` the mean over predicted scenes; ``wall_s`` from
    ``run`` to the file written, in seconds."""

    predictions: str
    predicted_scenes: int
    failed_scenes: int
    labelled_scenes: int
    accuracy: float | None
    bytes_per_scene: float
    wall_s: float
    model: str
    model_uri: str
    model_version: str | None

    @property
    def scenes_per_s(self) -> float:
        """Scenes (predicted or failed) per second of ``wall_s``."""
        return (self.predicted_scenes + self.failed_scenes) / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        """The human summary line."""
        accuracy = ("n/a (no labels)" if self.accuracy is None
                    else f"{self.accuracy:.3f} on {self.labelled_scenes} labelled")
        return (f"predicted {self.predicted_scenes} scenes, {self.failed_scenes} failed, accuracy "
                f"{accuracy}, {self.bytes_per_scene:,.0f} B read per scene, {self.wall_s:.1f} s "
                f"({self.scenes_per_s:.2f} scenes/s) with {self.model_uri} -> {self.predictions}")

    def as_json(self) -> dict[str, Any]:
        """The JSON summary (the job's last line)."""
        return {"predictions": self.predictions, "predicted_scenes": self.predicted_scenes,
                "failed_scenes": self.failed_scenes, "accuracy": self.accuracy,
                "bytes_per_scene": self.bytes_per_scene, "labelled_scenes": self.labelled_scenes,
                "wall_s": round(self.wall_s, 3), "scenes_per_s": round(self.scenes_per_s, 3),
                "model": self.model, "model_uri": self.model_uri,
                "model_version": self.model_version}


def manifest_rows(manifest_uri: str, split: str = "all") -> pa.Table:
    """The manifest's ``row`` (position), ``scene_id``, ``uri``, ``split``, ``label`` (int32)
    and ``category`` columns, of one split or all; ``ValueError`` when there is no row."""
    import pyarrow.compute as pc

    from pipeline.store.manifest import read_manifest

    table = read_manifest(manifest_uri)
    if split != "all":
        present = sorted(set(table["split"].to_pylist()))
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            raise ValueError(f"manifest {manifest_uri} has no rows in split {split!r}; "
                             f"splits present: {present}")
    if table.num_rows == 0:
        raise ValueError(f"manifest {manifest_uri} has no rows")
    return pa.table({
        ROW: pa.array(range(table.num_rows), pa.int64()),
        **{name: table[name] for name in ("scene_id", "uri", "split")},
        "label": table["label"].cast(pa.int32()),
        "category": table["category"],
    })


def forwarded_env() -> dict[str, str]:
    """The ``AWS_*`` and ``MLFLOW_*`` variables of this process, for the actors."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def prepare(spec: BatchPredictSpec) -> PreparedJob:
    """Pin the model and read the manifest rows (no Ray): fails fast, naming what is wrong
    (``LookupError`` for a model, ``ValueError`` / ``FileNotFoundError`` for a manifest)."""
    from pipeline.track import tracking

    tracking_uri = spec.tracking_uri or tracking.default_tracking_uri()
    model = tracking.resolve_model(spec.model, tracking_uri)
    return PreparedJob(spec, model, tracking_uri, manifest_rows(spec.manifest, spec.split))


# --------------------------------------------------------------------------- in each actor


def scene_error(uri: str, err: BaseException) -> str:
    """``err`` as one line that names the scene."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if uri in text else f"{uri}: {text}"


def predict_alone(predictor: Any, source: Any, uri: str, seed: int) -> SceneResult:
    """One scene with a cleared cache and zeroed counters, its failure caught."""
    source.clear_cache()
    source.reset_counters()
    record, error = None, None
    try:
        record = predictor.predict_source(source, [uri], 1, seed)[0]
    except Exception as err:  # this scene only: the job goes on
        error = scene_error(uri, err)
    reads = _reads(source, [uri])[uri]
    return SceneResult(uri, record, reads.requests, reads.bytes, error)


def predict_scenes(predictor: Any, source: Any, uris: Sequence[str],
                   seed: int) -> list[SceneResult]:
    """``uris`` in one forward pass (a fresh generator seeded ``seed``); when that fails, one
    scene at a time (``predict_alone``), so one bad scene costs only its own row.

    ``predictor``: a ``pipeline.track.packaging.Predictor``; ``source``: a reader recording its
    requests (``ZarrSourceFactory(..., record_requests=True)()``).
    """
    uris = list(uris)
    source.reset_counters()
    try:
        records = predictor.predict_source(source, uris, len(uris), seed)
    except Exception:
        return [predict_alone(predictor, source, uri, seed) for uri in uris]
    reads = _reads(source, uris)
    return [SceneResult(uri, record, reads[uri].requests, reads[uri].bytes)
            for uri, record in zip(uris, records, strict=True)]


def _reads(source: Any, uris: Sequence[str]) -> dict:
    from pipeline.read.reader import reads_by_scene

    return reads_by_scene(source.requests(), uris)


def prediction_table(rows: pa.Table, results: Sequence[SceneResult], model: Any,
                     named_classes: bool) -> pa.Table:
    """``PREDICTION_SCHEMA`` (plus ``row``) for a block of manifest ``rows`` and their results.

    ``correct`` compares class names when the model has them (``named_classes``; a model
    trained on another class order is still judged right), else class indices.
    """
    labels, categories = rows["label"].to_pylist(), rows["category"].to_pylist()
    recs = [r.record for r in results]
    predicted = [None if r is None else int(r["label"]) for r in recs]
    names = [None if r is None else str(r["class"]) for r in recs]
    truth, guess = (categories, names) if named_classes else (labels, predicted)
    correct = [None if g is None or t is None else g == t
               for t, g in zip(truth, guess, strict=True)]
    n = rows.num_rows
    columns = {
        **{name: rows[name] for name in ("scene_id", "uri", "split", "label", "category")},
        "predicted": predicted, "predicted_class": names,
        "probabilities": [None if r is None else r["probabilities"] for r in recs],
        "correct": correct,
        "bytes_read": [r.bytes for r in results], "requests": [r.requests for r in results],
        "model_uri": [model.uri] * n, "model_version": [model.version] * n,
        "error": [r.error for r in results],
    }
    table = pa.table(columns, schema=PREDICTION_SCHEMA)
    return table.append_column(ROW, rows[ROW])


class ScenePredictor:
    """The Ray Data actor: the model, loaded once from the registry, and one recording reader.

    Args:
        model: the pinned ``tracking.ModelRef``.
        tracking_uri: where the registry is.
        seed: seed of each forward pass's generator.
        env: variables to set first (``forwarded_env`` of the driver: storage, registry).
        threads: torch intra-op threads.
    """

    def __init__(self, model: Any, tracking_uri: str, seed: int, env: Mapping[str, str],
                 threads: int = 1):
        import torch

        from pipeline.read.settings import EXACT_READS
        from pipeline.read.source import ZarrSourceFactory
        from pipeline.track.tracking import load_predictor

        os.environ.update(env)
        torch.set_num_threads(max(1, threads))
        self.model, self.seed = model, seed
        self.predictor = load_predictor(model.uri, tracking_uri)
        self.source = ZarrSourceFactory(EXACT_READS, record_requests=True)()

    def __call__(self, rows: pa.Table) -> pa.Table:
        """Predictions of a block of ``manifest_rows`` (see ``prediction_table``)."""
        results = predict_scenes(self.predictor, self.source, rows["uri"].to_pylist(), self.seed)
        return prediction_table(rows, results, self.model, bool(self.predictor.classes))


# --------------------------------------------------------------------------- on the driver


def block_rows(n: int, batch_size: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Rows per Ray Data block: one batch, or whole batches enough to stay under
    ``max_blocks`` blocks (tiny objects cost the object store more than they balance)."""
    return batch_size * max(1, math.ceil(n / (batch_size * max_blocks)))


def prediction_dataset(job: PreparedJob) -> Any:
    """The lazy ``ray.data.Dataset`` of predictions: blocks of whole batches of manifest rows
    (``block_rows``) mapped by ``ScenePredictor`` on an actor pool of ``concurrency`` (fewer
    for fewer blocks), ``batch_size`` scenes per call."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # progress: ``collect``
    spec, rows = job.spec, job.rows
    per = block_rows(rows.num_rows, spec.batch_size)
    blocks = [rows.slice(i, per) for i in range(0, rows.num_rows, per)]
    return ray.data.from_arrow(blocks).map_batches(
        ScenePredictor,
        batch_size=spec.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(spec.concurrency, len(blocks))),
        num_cpus=spec.cpus_per_actor,
        fn_constructor_kwargs={"model": job.model, "tracking_uri": job.tracking_uri,
                               "seed": spec.seed, "env": forwarded_env(),
                               "threads": int(spec.cpus_per_actor)},
    )


def collect(dataset: Any, total: int, say: Callable[[str], None],
            every_s: float = 10.0) -> pa.Table:
    """Every row of ``dataset`` in manifest order, ``row`` dropped; progress through ``say``
    for the first block, then at most every ``every_s`` seconds, and at the end.
    ``RuntimeError`` when rows are lost."""
    tables, done, failed, start, last = [], 0, 0, time.perf_counter(), 0.0
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(block)
        done += block.num_rows
        failed += block.num_rows - block["error"].null_count
        now = time.perf_counter() - start
        if len(tables) == 1 or now - last >= every_s or done == total:
            first = " (first results: actors started, model loaded)" if len(tables) == 1 else ""
            say(f"[infer] {done}/{total} scenes, {failed} failed, {now:.1f} s{first}")
            last = now
    table = pa.concat_tables(tables) if tables else PREDICTION_SCHEMA.empty_table()
    if table.num_rows != total or (tables and len(set(table[ROW].to_pylist())) != total):
        raise RuntimeError(f"expected {total} prediction rows, got {table.num_rows}")
    return table.sort_by(ROW).drop_columns([ROW]) if tables else table


def write_predictions(table: pa.Table, uri: str, metadata: Mapping[str, str]) -> None:
    """``table`` as one zstd Parquet file at ``uri`` with ``metadata`` in its schema."""
    import pyarrow.parquet as pq

    from pipeline.store import storage

    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(dict(metadata)), buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def summarize(table: pa.Table, job: PreparedJob, wall_s: float) -> BatchSummary:
    """The ``BatchSummary`` of a table of predictions (``PREDICTION_SCHEMA``)."""
    ok = [e is None for e in table["error"].to_pylist()]
    predicted = sum(ok)
    judged = [c for c in table["correct"].to_pylist() if c is not None]
    used = sum(b for b, good in zip(table["bytes_read"].to_pylist(), ok, strict=True) if good)
    return BatchSummary(
        predictions=job.spec.out, predicted_scenes=predicted, failed_scenes=len(ok) - predicted,
        labelled_scenes=len(judged), accuracy=sum(judged) / len(judged) if judged else None,
        bytes_per_scene=used / predicted if predicted else 0.0, wall_s=wall_s,
        model=job.model.requested, model_uri=job.model.uri, model_version=job.model.version)


def run(job: PreparedJob, say: Callable[[str], None] = print) -> BatchSummary:
    """Predict every row of ``job`` on the Ray instance this process is connected to, write
    the Parquet file, return the summary (see the module docstring)."""
    start = time.perf_counter()
    spec = job.spec
    say(f"[infer] {job.rows.num_rows} scenes of {spec.manifest} (split {spec.split}) with "
        f"{job.model.uri} on {spec.concurrency} actors, batches of {spec.batch_size}")
    table = collect(prediction_dataset(job), job.rows.num_rows, say)
    write_predictions(table, spec.out, {
        "model": job.model.requested, "model_uri": job.model.uri,
        "model_version": job.model.version or "", "manifest": spec.manifest,
        "split": spec.split, "seed": str(spec.seed)})
    return summarize(table, job, time.perf_counter() - start)
