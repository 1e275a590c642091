"""The scene manifest: one Parquet row per ingested scene, and the rejects table beside it.

Manifest columns (``MANIFEST_SCHEMA``):
    scene_id      str    unique id, also the scene's path below the pyramid root
    split         str    "train", "val", ...
    category      str    class name
    label         int32  class index into the class list stored with the manifest
    uri           str    URI of the scene's OME-Zarr pyramid group
    height, width int32  level-0 size in px
    channels      int32
    num_levels    int32
    level_shapes  str    JSON list of [height, width] per level, level 0 first
    box           list<int32> of 4, or null: labelled box (y0, x0, y1, x1), level-0 px, half-open
    gsd           float64 or null: ground sample distance in metres (fMoW)
    timestamp     str or null: acquisition time as given by the source
    source        str    URI of the raw image

The class list (index -> name) is stored twice: as the Parquet key-value metadata ``classes``
(a JSON list) and as ``<manifest stem>.classes.json`` beside the manifest. Rejects go to
``<manifest stem>.rejects.parquet`` (and a ``.rejects.csv`` copy for people) with
``REJECTS_SCHEMA``. Everything is read and written by URI through ``pipeline.store.storage``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.store import storage

MANIFEST_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("split", pa.string()),
        ("category", pa.string()),
        ("label", pa.int32()),
        ("uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("num_levels", pa.int32()),
        ("level_shapes", pa.string()),
        ("box", pa.list_(pa.int32())),  # 4 values or null (a fixed-size list reads back badly with nulls)
        ("gsd", pa.float64()),
        ("timestamp", pa.string()),
        ("source", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),  # the input that failed (image or JSON URI)
        ("kind", pa.string()),  # short category: missing_json, unreadable_image, ...
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class ManifestPaths:
    """Where the manifest and the files beside it live."""

    manifest: str
    classes: str
    rejects: str
    rejects_csv: str


def paths_for(manifest_uri: str) -> ManifestPaths:
    """``x/name.parquet`` -> ``x/name.classes.json``, ``x/name.rejects.parquet``, ``.csv``."""
    stem = manifest_uri[: -len(".parquet")] if manifest_uri.endswith(".parquet") else manifest_uri
    return ManifestPaths(
        manifest_uri, f"{stem}.classes.json", f"{stem}.rejects.parquet", f"{stem}.rejects.csv"
    )


def manifest_table(rows: Sequence[Mapping], classes: Sequence[str]) -> pa.Table:
    """Rows (dicts with the ``MANIFEST_SCHEMA`` columns) -> table sorted by ``(split,
    scene_id)``, with the class list in its metadata. Raises ``ValueError`` naming the scene
    whose label does not match its category's index."""
    index = {name: i for i, name in enumerate(classes)}
    for row in rows:
        if row.get("box") is not None and len(row["box"]) != 4:
            raise ValueError(f"manifest row {row['scene_id']}: box {row['box']} is not 4 values")
        if index.get(row["category"]) != row["label"]:
            raise ValueError(
                f"manifest row {row['scene_id']}: label {row['label']} is not the index of "
                f"{row['category']!r} in the class list"
            )
    ordered = sorted(rows, key=lambda r: (r["split"], r["scene_id"]))
    columns = {f.name: [r.get(f.name) for r in ordered] for f in MANIFEST_SCHEMA}
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    return table.replace_schema_metadata({"classes": json.dumps(list(classes))})


def rejects_table(rejects: Sequence[Mapping]) -> pa.Table:
    """Reject dicts (``REJECTS_SCHEMA`` columns) -> table sorted by ``(split, path)``."""
    ordered = sorted(rejects, key=lambda r: (r["split"] or "", r["path"]))
    columns = {f.name: [r.get(f.name) for r in ordered] for f in REJECTS_SCHEMA}
    return pa.table(columns, schema=REJECTS_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest(
    manifest_uri: str,
    rows: Sequence[Mapping],
    classes: Sequence[str],
    rejects: Sequence[Mapping] = (),
) -> ManifestPaths:
    """Write the manifest, the class list and the rejects (always, even when empty)."""
    paths = paths_for(manifest_uri)
    storage.write_bytes(paths.classes, (json.dumps(list(classes), indent=1) + "\n").encode())
    rejected = rejects_table(rejects)
    storage.write_bytes(paths.rejects, _parquet_bytes(rejected))
    csv = io.BytesIO()
    pacsv.write_csv(rejected, csv)
    storage.write_bytes(paths.rejects_csv, csv.getvalue())
    # the manifest last: a reader that finds it finds the files beside it too
    storage.write_bytes(paths.manifest, _parquet_bytes(manifest_table(rows, classes)))
    return paths


def read_manifest(manifest_uri: str) -> pa.Table:
    """The manifest table of ``manifest_uri`` (``classes`` in its schema metadata)."""
    data = storage.read_bytes(manifest_uri)
    return pq.read_table(pa.BufferReader(data))


def read_classes(manifest_uri: str) -> tuple[str, ...]:
    """The class list (index -> name) stored with the manifest."""
    meta = read_manifest(manifest_uri).schema.metadata or {}
    if b"classes" not in meta:
        raise ValueError(f"manifest {manifest_uri} has no 'classes' metadata")
    return tuple(json.loads(meta[b"classes"]))


def read_rejects(manifest_uri: str) -> pa.Table:
    """The rejects table written beside ``manifest_uri``."""
    return pq.read_table(pa.BufferReader(storage.read_bytes(paths_for(manifest_uri).rejects)))


def level_shapes(table_row: Mapping) -> list[tuple[int, int]]:
    """Decode a row's ``level_shapes`` column: ``[(height, width), ...]`` level 0 first."""
    return [tuple(s) for s in json.loads(table_row["level_shapes"])]
