"""A plain folder of images with a CSV of labels, as an ingest source (for users without fMoW).

The CSV has a header with the columns ``path,label`` and optionally ``split``
(default ``train``); ``path`` is relative to the folder (or a full URI). The scene id is
``<split>/<path without extension>`` with characters other than letters, digits, ``._-/``
replaced by ``_``. The class list is the sorted distinct labels (numerically when every label
is an integer), unless the caller gives one. Images in the folder that the CSV does not name are
reported by ``unlabelled_images`` (not ingested, not silently passed over).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.ingest.engine import LoadedScene, SceneTask, open_image
from pipeline.store import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


@dataclass(frozen=True, slots=True)
class LabelRow:
    """One CSV row: ``path`` as written, ``label`` as text, ``split``."""

    path: str
    label: str
    split: str


def parse_labels_csv(data: bytes, where: str) -> list[LabelRow]:
    """Rows of a labels CSV; ``ValueError`` naming the file and line for a malformed one."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"labels CSV {where} is not UTF-8: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if not {"path", "label"} <= columns:
        raise ValueError(f"labels CSV {where} needs a header with path,label; got {sorted(columns)}")
    rows = []
    for line, rec in enumerate(reader, start=2):
        path, label = (rec.get("path") or "").strip(), (rec.get("label") or "").strip()
        if not path or not label:
            raise ValueError(f"labels CSV {where} line {line}: empty path or label")
        rows.append(LabelRow(path, label, (rec.get("split") or "train").strip() or "train"))
    return rows


def folder_class_list(labels: Iterable[str]) -> tuple[str, ...]:
    """Sorted distinct labels; numeric order when all of them are integers."""
    names = set(labels)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def scene_id_for(row: LabelRow) -> str:
    """``<split>/<path without extension>``, made safe to use as a store path."""
    stem = row.path.split("://", 1)[-1].lstrip("/")
    stem = stem.rsplit(".", 1)[0] if "." in stem.rsplit("/", 1)[-1] else stem
    return _UNSAFE.sub("_", f"{row.split}/{stem}")


def folder_tasks(root_uri: str, rows: Sequence[LabelRow]) -> list[SceneTask]:
    """One ``SceneTask`` per CSV row; the category is the label text."""
    tasks = []
    for row in rows:
        source = row.path if "://" in row.path else storage.join_uri(root_uri, row.path)
        tasks.append(SceneTask(scene_id_for(row), row.split, source, row.label))
    return tasks


def unlabelled_images(root_uri: str, rows: Sequence[LabelRow]) -> list[str]:
    """URIs of images under ``root_uri`` that no CSV row names."""
    named = {_normalise(t.source) for t in folder_tasks(root_uri, rows)}
    found = [u for u in storage.list_prefix(root_uri) if u.lower().endswith(IMAGE_SUFFIXES)]
    return [u for u in found if _normalise(u) not in named]


def _normalise(uri: str) -> str:
    """Local paths and ``file://`` URIs as absolute paths; other URIs unchanged."""
    parsed = storage.parse_uri(uri)
    return parsed.root if parsed.scheme == "file" else uri


def load_folder_scene(task: SceneTask) -> LoadedScene:
    """Loader for ``run_ingest``: the image (a local TIFF read band by band while writing,
    ``engine.open_image``; anything else decoded whole); no box; a GeoTIFF's ground sample
    distance as ``gsd`` and its geotransform and EPSG code as scene attributes."""
    image, geo = open_image(task.source)
    extra = {k: v for k, v in geo.items() if k != "gsd"}
    return LoadedScene(image, gsd=geo.get("gsd"), extra=extra)
