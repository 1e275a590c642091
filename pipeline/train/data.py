"""Ray Data: manifest rows plus the low-resolution view of each scene.

The driver opens a split of the manifest (``pipeline.read.source.open_split``) and builds a Ray
Dataset of rows ``key`` (the scene's pyramid URI), ``label``, ``size`` (level-0 height, width)
and ``view`` (C, h, w float32 in [0, 1], read through the reader at the model's view size by
``map_batches``). Views never change during training, so the dataset is materialised once;
Ray Train splits it over the workers (``ray.train.get_dataset_shard``) and the loop reshuffles
each worker's shard every epoch with a seed (``pipeline.train.worker``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from models.protocol import ClosableSource, PixelSource
from pipeline.read.source import split_rows

__all__ = ["add_views", "reader_env", "split_rows", "view_dataset"]  # split_rows: re-exported


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
        if isinstance(source, ClosableSource):
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
