"""Ray Data: manifest rows plus the low-resolution view of each scene.

The driver reads the manifest (``pipeline.store.manifest``), keeps one split, and builds a Ray
Dataset of rows ``key`` (the scene's pyramid URI), ``label``, ``size`` (level-0 height, width)
and ``view`` (C, h, w float32 in [0, 1], read through the reader at the model's view size by
``map_batches``). Views never change during training, so the dataset is materialised once;
Ray Train splits it over the workers (``ray.train.get_dataset_shard``) and the loop reshuffles
each worker's shard every epoch with a seed (``pipeline.train.loop.worker_main``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.protocol import PixelSource


@dataclass(frozen=True, slots=True)
class ZarrSourceFactory:
    """Picklable recipe for the worker's reader: ``factory()`` -> ``ZarrPixelSource``.

    The fields are those of ``pipeline.train.config.ReaderConfig``. The source is built inside the
    worker, where it lives for the run.
    """

    concurrency: int = 64
    cache_bytes: int = 64 * 2**20
    max_gap: int = 16384
    process: bool = False
    prefetch_indexes: bool = False

    @classmethod
    def from_config(cls, reader: Any) -> ZarrSourceFactory:
        """The factory for a ``pipeline.train.config.ReaderConfig``."""
        return cls(reader.concurrency, reader.cache_bytes, reader.max_gap, reader.process,
                   reader.prefetch_indexes)

    def in_process(self) -> ZarrSourceFactory:
        """The same reader without a child process (for short-lived users such as view tasks)."""
        return dataclasses.replace(self, process=False)

    def __call__(self) -> PixelSource:
        from pipeline.read.process import ProcessPixelSource
        from pipeline.read.reader import ZarrPixelSource

        if self.process:  # the same reader, built in a child process
            return ProcessPixelSource(dataclasses.replace(self, process=False))
        return ZarrPixelSource(concurrency=self.concurrency, cache_bytes=self.cache_bytes,
                               max_gap=self.max_gap, prefetch_indexes=self.prefetch_indexes)


def split_rows(manifest: Any, split: str, limit: int = 0) -> dict[str, np.ndarray]:
    """Columns ``key``, ``label``, ``size`` (N, 2) of one split of a manifest table, in order.

    ``manifest`` is a ``pyarrow.Table`` with the ``pipeline.store.manifest`` schema; ``limit`` > 0
    keeps the first ``limit`` rows of the split.
    """
    table = manifest.to_pandas() if hasattr(manifest, "to_pandas") else manifest
    rows = table[table["split"] == split]
    if limit > 0:
        rows = rows.iloc[:limit]
    if len(rows) == 0:
        splits = sorted(set(table["split"]))
        raise ValueError(f"manifest has no rows in split {split!r}; splits present: {splits}")
    return {
        "key": rows["uri"].astype(str).to_numpy(),
        "label": rows["label"].astype(np.int64).to_numpy(),
        "size": np.stack([rows["height"].to_numpy(), rows["width"].to_numpy()], 1).astype(np.int64),
    }


def add_views(
    batch: Mapping[str, np.ndarray],
    source_factory: Callable[[], PixelSource],
    view_size: tuple[int, int],
    env: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """``map_batches`` function: the batch plus ``view`` (B, C, h, w) float32 read by the source."""
    os.environ.update(env or {})
    source = source_factory()
    keys = [str(k) for k in batch["key"]]
    try:
        views = source.view(keys, tuple(view_size))
    finally:
        if hasattr(source, "close"):
            source.close()
    return {**batch, "view": views.numpy().astype(np.float32)}


def view_dataset(
    rows: Mapping[str, np.ndarray],
    source_factory: Callable[[], PixelSource],
    view_size: tuple[int, int],
    env: Mapping[str, str] | None = None,
    batch_size: int = 16,
) -> Any:
    """A materialised ``ray.data.Dataset`` of ``rows`` with their views (see module docstring)."""
    import ray.data

    ds = ray.data.from_items(
        [{"key": k, "label": int(y), "size": s} for k, y, s in zip(rows["key"], rows["label"], rows["size"], strict=True)]
    )
    ds = ds.map_batches(
        add_views,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"source_factory": source_factory, "view_size": tuple(view_size), "env": dict(env or {})},
    )
    return ds.materialize()


def reader_env() -> dict[str, str]:
    """Storage settings to forward to Ray workers and tasks: every ``AWS_*`` variable."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
