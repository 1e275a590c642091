"""Ray Data: manifest rows plus the low-resolution view of each scene.

The driver opens a split of the manifest (``pipeline.read.source.open_split``) and builds a Ray
Dataset of rows ``key`` (the scene's pyramid URI), ``label``, ``size`` (level-0 height, width)
and ``view`` (C, h, w float32 in [0, 1], read through the reader at the model's view size by
``map_batches``). Views never change during training, so the dataset is materialised once.
The driver deals the rows to the ranks itself, one dataset per rank (``rank_datasets``: a
seeded deal, not Ray's timing-dependent streaming split), and each worker reshuffles its own
every epoch with a seed (``pipeline.train.worker``), so that a seed fixes the data order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from models.protocol import ClosableSource, PixelSource
from pipeline.read.source import split_rows
from pipeline.train.quarantine import READ_ERRORS

__all__ = ["add_views", "rank_dataset_name", "rank_datasets", "reader_env", "split_rows",
           "view_dataset"]  # split_rows: re-exported


def add_views(
    batch: Mapping[str, np.ndarray],
    source_factory: Callable[[], PixelSource],
    view_size: tuple[int, int],
    env: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """``map_batches`` function: the batch plus ``view`` (B, C, h, w) float32 read by the
    source, and ``error`` (B,) str: ``""``, or why the scene cannot be read (its view read
    failed after the reader's retries, or the row came with an error: too few levels). A
    scene with an error gets a zero view and is quarantined by the worker at first sight
    (``pipeline.train.quarantine``); rows are never dropped here, so that every rank keeps
    the same number of rows and steps."""
    os.environ.update(env or {})
    keys = [str(k) for k in batch["key"]]
    errors = [str(e) for e in batch.get("error", [""] * len(keys))]
    source = source_factory()
    try:
        views = _views(source, keys, errors, tuple(view_size))
    finally:
        if isinstance(source, ClosableSource):
            source.close()
    return {**batch, "view": views, "error": np.array(errors, dtype=object)}


def _views(source: PixelSource, keys: list[str], errors: list[str],
           size: tuple[int, int]) -> np.ndarray:
    """(B, C, h, w) float32 views of the scenes without an error, in one read; when it fails,
    one read per scene, and ``errors`` gets the message of each that fails (zero view)."""
    good = [i for i, e in enumerate(errors) if not e]
    try:
        read = source.view([keys[i] for i in good], size).numpy() if good else None
        rows = dict(zip(good, read, strict=True)) if good else {}
    except READ_ERRORS:
        rows = {}
        for i in good:
            try:
                rows[i] = source.view([keys[i]], size).numpy()[0]
            except READ_ERRORS as err:
                errors[i] = f"{type(err).__name__}: {err}"
    channels = next(iter(rows.values())).shape[0] if rows else 3
    out = np.zeros((len(keys), channels, *size), dtype=np.float32)
    for i, view in rows.items():
        out[i] = view
    return out


def view_dataset(
    rows: Mapping[str, np.ndarray],
    source_factory: Callable[[], PixelSource],
    view_size: tuple[int, int],
    env: Mapping[str, str] | None = None,
    batch_size: int = 16,
) -> Any:
    """A materialised ``ray.data.Dataset`` of ``rows`` with their views (see module docstring);
    ``rows`` may carry an ``error`` column (``""`` for a good scene)."""
    import ray.data

    errors = rows.get("error", [""] * len(rows["key"]))
    ds = ray.data.from_items(
        [{"key": k, "label": int(y), "size": s, "error": str(e)}
         for k, y, s, e in zip(rows["key"], rows["label"], rows["size"], errors, strict=True)]
    )
    ds = ds.map_batches(
        add_views,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"source_factory": source_factory, "view_size": tuple(view_size), "env": dict(env or {})},
    )
    return ds.materialize()


def rank_dataset_name(split: str, rank: int) -> str:
    """The name of ``rank``'s dataset of ``split`` among ``TorchTrainer``'s datasets."""
    return f"{split}_{rank}"


def rank_rows(rows: Mapping[str, np.ndarray], workers: int, seed: int | None) -> list[dict[str, np.ndarray]]:
    """``rows`` dealt to ``workers`` ranks, a fixed function of ``seed`` (never of timing).

    With a seed (training): the rows in a seeded random order, cut into ``workers`` equal
    parts of ``n // workers`` rows (the remainder is left out, as Ray's equal split does, so
    every rank runs the same number of steps). Without (validation): every row, in manifest
    order, in ``workers`` contiguous parts whose sizes differ by at most one.
    """
    n = len(rows["key"])
    if seed is None:
        parts = np.array_split(np.arange(n), workers)
    else:
        order = np.random.default_rng(seed).permutation(n)
        per = n // workers
        parts = [order[r * per:(r + 1) * per] for r in range(workers)]
    return [{k: np.asarray(v)[idx] for k, v in rows.items()} for idx in parts]


def rank_datasets(
    split: str,
    rows: Mapping[str, np.ndarray],
    workers: int,
    source_factory: Callable[[], PixelSource],
    view_size: tuple[int, int],
    env: Mapping[str, str] | None = None,
    *,
    seed: int | None,
) -> dict[str, Any]:
    """One materialised view dataset per rank (``rank_dataset_name(split, r)``), in the row
    order of ``rank_rows``: a run's data order is then the same on every run with the same
    seed, which Ray Train's own streaming split (it hands blocks to whichever worker asks
    first) does not give. The caller keeps Ray Data's ``preserve_order`` on, so each dataset
    stays in its rows' order (``pipeline.train.driver`` sets it with the other settings of the
    driver's ``DataContext``)."""
    return {rank_dataset_name(split, r): view_dataset(part, source_factory, view_size, env)
            for r, part in enumerate(rank_rows(rows, workers, seed))}


def reader_env() -> dict[str, str]:
    """Storage settings to forward to Ray workers and tasks: every ``AWS_*`` variable."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
