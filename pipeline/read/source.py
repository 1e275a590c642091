"""The one source factory, and the manifest -> split -> source recipe every entry point uses.

``ZarrSourceFactory(settings)`` is a picklable recipe for the attended-chunk reader of a
``ReaderSettings`` (``pipeline.read.settings``): in this process (``ZarrPixelSource``) or in a
child process (``ProcessPixelSource``) as ``settings.process`` says. It is built on the driver
and called where the reader is used (a Ray worker, a view task), where the source lives.

``open_split(manifest_uri, split, settings, limit)`` reads a manifest (``pipeline.store.manifest``)
and gives one split's rows, the class list and that factory as one ``SplitData``;
``SplitData.sibling(other_split)`` gives another split of the same manifest without reading it
again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.protocol import PixelSource
from pipeline.read.settings import ReaderSettings


@dataclass(frozen=True, slots=True)
class ZarrSourceFactory:
    """Picklable recipe for a reader: ``factory()`` -> a ``PixelSource`` with ``settings``;
    ``record_requests`` keeps every store request for ``requests()`` (e.g. bytes per scene).

    ``settings.process``: the source is a ``ProcessPixelSource`` whose child builds the same
    reader in process; otherwise a ``ZarrPixelSource``.
    """

    settings: ReaderSettings = ReaderSettings()
    record_requests: bool = False

    def in_process(self) -> ZarrSourceFactory:
        """The same reader without a child process (for short-lived users such as view tasks)."""
        return ZarrSourceFactory(dataclasses.replace(self.settings, process=False),
                                 self.record_requests)

    def __call__(self) -> PixelSource:
        """A new reader of ``settings`` (its loop, caches or child process start on first use)."""
        from pipeline.read.process import ProcessPixelSource
        from pipeline.read.reader import ZarrPixelSource

        if self.settings.process:  # the same reader, built in a child process
            return ProcessPixelSource(self.in_process())
        return ZarrPixelSource.from_settings(self.settings, record_requests=self.record_requests)


def split_rows(manifest: Any, split: str, limit: int = 0) -> dict[str, np.ndarray]:
    """Columns of one split of a manifest table, in manifest order (a Ray Data batch):
    ``key`` (N,) str scene URIs, ``label`` (N,) int64 class indices, ``size`` (N, 2) int64
    level-0 (height, width) in pixels.

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


@dataclass(frozen=True, slots=True, eq=False)
class SplitData:
    """One split of a manifest, ready to read.

    Attributes:
        split: the value of the manifest's ``split`` column.
        rows: its columns (``split_rows``): ``key`` (N,) str, ``label`` (N,) int64, ``size``
            (N, 2) int64 level-0 (height, width) px.
        classes: class names by index, over the whole manifest.
        source_factory: the reader of the settings the split was opened with.
        manifest: the whole manifest table (``pyarrow.Table``), for facts not copied here.
        limit: at most this many rows were kept (0: all).
    """

    split: str
    rows: dict[str, np.ndarray]
    classes: tuple[str, ...]
    source_factory: ZarrSourceFactory
    manifest: Any
    limit: int = 0

    @property
    def keys(self) -> list[str]:
        """The N scene URIs as ``str``."""
        return [str(k) for k in self.rows["key"]]

    @property
    def labels(self) -> list[int]:
        """The N class indices as ``int``."""
        return [int(v) for v in self.rows["label"]]

    def sibling(self, split: str) -> SplitData:
        """Another split of the same manifest, same limit and reader (no read)."""
        return dataclasses.replace(self, split=split,
                                   rows=split_rows(self.manifest, split, self.limit))


def open_split(manifest_uri: str, split: str, settings: ReaderSettings = ReaderSettings(),
               limit: int = 0) -> SplitData:
    """The rows of ``split`` of the manifest at ``manifest_uri`` (first ``limit`` rows when
    > 0), its class list and the ``ZarrSourceFactory`` of ``settings``; ``ValueError`` when
    the split has no rows."""
    from pipeline.store.manifest import read_classes, read_manifest

    manifest = read_manifest(manifest_uri)
    classes = tuple(read_classes(manifest_uri))
    return SplitData(split, split_rows(manifest, split, limit), classes,
                     ZarrSourceFactory(settings), manifest, limit)
