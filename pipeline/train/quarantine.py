"""Quarantine: a scene whose reads fail after the reader's retries is skipped for the rest of
the run instead of ending it.

What quarantines a scene: any ``OSError`` or ``ValueError`` its read raises once the reader
has retried what it retries (``pipeline.read.reader.ReadError`` and its kinds: a missing or
truncated shard, a chunk that fails its checksum, S3 timeouts exhausted; no pyramid group; an
incomplete scene; a level the scene does not have), and, before the first step, a manifest row
with fewer pyramid levels than the model reads (``too_few_levels``). A failed read of a
micro-batch names only the micro-batch, so its scenes are read again one by one
(``find_bad``) to tell which fail; the step then runs again without them. Other errors (a bug,
out of memory) still end the run.

Data-parallel training stays in step: a scene is dropped from its batch, never the batch, so
every rank runs the same number of steps; a rank whose whole batch is quarantined takes part in
the step with no samples (zero gradients in the average). Nothing here imports Ray or MLflow:
``pipeline.train.worker`` gathers every rank's records and logs them through ``pipeline.track``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.protocol import ReadRequest

READ_ERRORS = (OSError, ValueError)
"""What a read that failed after retries raises for a bad scene (see the module docstring)."""


@dataclass
class Quarantine:
    """The scenes quarantined so far on this worker, each recorded once.

    ``records``: scene key -> ``{"scene", "error", "message", "epoch", "step"}`` (the error's
    class name and message, the epoch and the step within it when it was found).
    """

    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, error: str, message: str, epoch: int, step: int) -> bool:
        """Record ``key``; False if it was already quarantined (its first record is kept)."""
        if key in self.records:
            return False
        self.records[key] = {"scene": key, "error": error, "message": message,
                             "epoch": int(epoch), "step": int(step)}
        return True

    def add_error(self, key: str, err: BaseException, epoch: int, step: int) -> bool:
        return self.add(key, type(err).__name__, str(err), epoch, step)

    def admit(self, batch: Mapping[str, Any], epoch: int, step: int) -> Mapping[str, Any]:
        """``batch`` without its quarantined rows (the same object when none is). Rows whose
        ``error`` column is set (their view could not be read, or the manifest says they lack
        a level the model reads: ``pipeline.train.data``) are quarantined here first."""
        keys = [str(k) for k in batch["key"]]
        errors = batch.get("error")
        if errors is not None:
            for key, message in zip(keys, errors, strict=True):
                if str(message):
                    self.add(key, "UnreadableScene", str(message), epoch, step)
        keep = np.array([k not in self.records for k in keys], dtype=bool)
        if keep.all():
            return batch
        return {name: np.asarray(column)[keep] for name, column in batch.items()}

    def as_list(self) -> list[dict[str, Any]]:
        """The records, in the order they were found."""
        return list(self.records.values())


def merge_records(per_rank: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One record per scene over every rank's records (the first found wins), sorted by
    (epoch, step, scene)."""
    merged: dict[str, dict[str, Any]] = {}
    for records in per_rank:
        for record in records:
            merged.setdefault(record["scene"], dict(record))
    return sorted(merged.values(), key=lambda r: (r["epoch"], r["step"], r["scene"]))


def find_bad(source: Any, keys: Sequence[str], request: ReadRequest) -> dict[str, BaseException]:
    """Read each scene of a failed read alone (its own row of boxes): the scenes whose read
    still fails, with their error. Empty when every one reads now (a transient fault)."""
    bad: dict[str, BaseException] = {}
    for i, key in enumerate(keys):
        if key in bad:
            continue
        one = ReadRequest(request.boxes[i : i + 1], request.scene_level(i), request.size)
        try:
            source.read([key], one)
        except READ_ERRORS as err:
            bad[key] = err
    return bad


def model_read_level(model: Any) -> int:
    """The deepest pyramid level ``model`` reads whatever the scene: the largest of its fixed
    ``patch_level`` / ``tile_level`` / ``level`` attributes (0 without any). Levels a model
    picks per scene from the scene's own size (Zoom-In without ``tile_level``) always exist."""
    levels = [getattr(model, name, None) for name in ("patch_level", "tile_level", "level")]
    return max([int(v) for v in levels if isinstance(v, int | np.integer)] or [0])


def too_few_levels(keys: Sequence[str], num_levels: Sequence[int], read_level: int) -> list[str]:
    """Per row: an error message when the scene has no level ``read_level`` (its manifest
    ``num_levels`` <= ``read_level``), else ``""``."""
    return [f"scene {k} has {int(n)} pyramid levels; the model reads level {read_level}"
            if int(n) <= read_level else "" for k, n in zip(keys, num_levels, strict=True)]


def with_level_check(rows: Mapping[str, np.ndarray], manifest: Any, read_level: int) -> dict[str, np.ndarray]:
    """``rows`` (``pipeline.read.source.split_rows``) with an ``error`` column: the message of
    ``too_few_levels`` for every scene whose manifest ``num_levels`` lacks ``read_level``
    (the worker quarantines those before their first step), ``""`` for the others."""
    table = manifest.to_pandas() if hasattr(manifest, "to_pandas") else manifest
    levels = dict(zip(table["uri"].astype(str), table["num_levels"].astype(int), strict=True))
    keys = [str(k) for k in rows["key"]]
    counts = [levels.get(k, read_level + 1) for k in keys]
    return {**rows, "error": np.array(too_few_levels(keys, counts, read_level), dtype=object)}
