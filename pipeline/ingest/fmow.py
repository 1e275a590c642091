"""The fMoW-rgb layout: category names, walking the folders, parsing the per-image JSON.

Layout (as released): ``<split>/<category>/<category>_<loc>/<category>_<loc>_<t>_rgb.jpg`` with
``<category>_<loc>_<t>_rgb.json`` beside it. The JSON's ``bounding_boxes`` is a list of
``{"box": [x, y, w, h], "category": ..., "ID": ...}`` objects (in some files a single object
instead of a list); the labelled box is the one whose category is the folder's.

Class list: ``FMOW_CATEGORIES`` is the 62 fMoW categories in sorted (alphabetical) order, the
order WILDS and most later work use (the original baseline code listed
``impoverished_settlement`` out of order and prepended ``false_detection``). A data set's class
list is always a sorted subset of it (see ``class_list``), so class indices are reproducible
from the names alone. Nothing here does I/O except ``walk_fmow`` and ``read_fmow_json``, which go
through ``pipeline.store.storage``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.ingest.engine import BadInput, LoadedScene, SceneTask, decode_image, read_source

FMOW_CATEGORIES: tuple[str, ...] = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility",
    "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison",
    "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard",
    "shopping_mall", "single-unit_residential", "smokestack", "solar_farm", "space_facility",
    "stadium", "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower",
    "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)  # fmt: skip

# <split>/<category>/<category>_<loc>/<category>_<loc>_<t>_rgb.(jpg|json)
_RGB_FILE = re.compile(
    r"^(?P<split>[^/]+)/(?P<category>[^/]+)/(?P<site>[^/]+)/"
    r"(?P<stem>(?P<site2>[^/]+)_(?P<t>\d+))_rgb\.(?P<ext>jpg|jpeg|json)$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class FmowFile:
    """One image of the layout, found by walking: paths relative to the fMoW root.

    ``image`` or ``meta`` is None when that half of the pair is missing.
    """

    split: str
    category: str  # the folder's category (not yet checked against any class list)
    stem: str  # "<category>_<loc>_<t>"
    image: str | None
    meta: str | None

    @property
    def scene_id(self) -> str:
        """``<split>/<stem>``: unique per image, usable as a path under the pyramid root."""
        return f"{self.split}/{self.stem}"


@dataclass(frozen=True, slots=True)
class FmowMeta:
    """What the ingest keeps from one fMoW JSON.

    ``box`` is the labelled box as ``(y0, x0, y1, x1)`` in level-0 pixels, half-open
    (the JSON stores ``[x, y, w, h]``).
    """

    category: str
    box: tuple[int, int, int, int]
    box_id: int | None
    width: int
    height: int
    gsd: float | None
    timestamp: str | None
    utm: str | None


@dataclass(frozen=True, slots=True)
class LayoutWalk:
    """Result of walking a layout: complete or half pairs, plus paths that are not fMoW files."""

    files: tuple[FmowFile, ...]
    ignored: tuple[str, ...]


def group_layout(keys: Iterable[str], splits: Sequence[str] | None = None) -> LayoutWalk:
    """Pair the ``_rgb.jpg`` and ``_rgb.json`` files of a listing (keys relative to the root).

    Keys that do not follow the layout (other file kinds such as ``_msrgb.jpg``, misplaced
    files, a site folder that does not start with its category) are returned in ``ignored``;
    files of splits not in ``splits`` (when given) are left out silently, since the caller
    asked for that. Output is sorted by ``scene_id``.
    """
    pairs: dict[tuple[str, str, str], dict[str, str]] = {}
    ignored = []
    for key in keys:
        key = key.lstrip("/")
        m = _RGB_FILE.match(key)
        if m is None or not _consistent(m):
            ignored.append(key)
            continue
        if splits is not None and m["split"] not in splits:
            continue
        kind = "meta" if m["ext"].lower() == "json" else "image"
        slot = pairs.setdefault((m["split"], m["category"], m["stem"]), {})
        if kind in slot:  # e.g. both .jpg and .jpeg of one image: keep one, report the other
            ignored.append(key)
            continue
        slot[kind] = key
    files = [
        FmowFile(split, category, stem, slot.get("image"), slot.get("meta"))
        for (split, category, stem), slot in pairs.items()
    ]
    files.sort(key=lambda f: f.scene_id)
    return LayoutWalk(tuple(files), tuple(sorted(ignored)))


def _consistent(m: re.Match) -> bool:
    """The site folder is ``<category>_<loc>`` and the file name starts with the site."""
    category, site = m["category"], m["site"]
    return site == m["site2"] and site.startswith(category + "_")


def walk_fmow(root_uri: str, splits: Sequence[str] | None = None) -> LayoutWalk:
    """List ``root_uri`` (local path or any storage URI) and group it as ``group_layout`` does."""
    from pipeline.store import storage

    return group_layout(relative_keys(root_uri, storage.list_prefix(root_uri)), splits)


def relative_keys(root_uri: str, uris: Iterable[str]) -> list[str]:
    """Keys of ``uris`` (as ``storage.list_prefix`` returns them) relative to ``root_uri``."""
    from pipeline.store import storage

    parsed = storage.parse_uri(root_uri)
    if parsed.scheme == "file":
        prefix = parsed.root.rstrip("/") + "/"
    else:
        prefix = storage.join_uri(parsed.root_uri(), parsed.path) + "/"
    return [u[len(prefix) :] for u in uris if u.startswith(prefix)]


def class_list(categories: Iterable[str], spec: str = "present") -> tuple[str, ...]:
    """The class names of a data set, index = position.

    ``spec``: ``"present"`` -> the sorted fMoW categories among ``categories`` (names that are
    not fMoW categories are left out, so their scenes are rejected as unknown);
    ``"fmow62"`` -> all 62 in sorted order; otherwise a comma-separated list of names, which is
    sorted (unknown names raise ``ValueError``).
    """
    if spec == "fmow62":
        return FMOW_CATEGORIES
    if spec == "present":
        return tuple(sorted(set(categories) & set(FMOW_CATEGORIES)))
    names = sorted({n.strip() for n in spec.split(",") if n.strip()})
    unknown = [n for n in names if n not in FMOW_CATEGORIES]
    if unknown or not names:
        raise ValueError(f"class list {spec!r}: not fMoW categories: {unknown or 'empty'}")
    return tuple(names)


def parse_fmow_json(data: bytes, category: str) -> FmowMeta:
    """Parse one ``_rgb.json`` and pick the box labelled ``category`` (the folder's).

    Raises ``BadInput`` with the reason when the JSON is malformed, has no box of that
    category, or its box or image size is not usable.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput("malformed_json", f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadInput(
            "malformed_json", f"malformed JSON: top level is {type(doc).__name__}, not an object"
        )
    boxes = doc.get("bounding_boxes")
    if isinstance(boxes, dict):  # some fMoW files hold a single object instead of a list
        boxes = [boxes]
    if not isinstance(boxes, list) or not boxes:
        raise BadInput("malformed_json", "malformed JSON: no bounding_boxes")
    labelled = [b for b in boxes if isinstance(b, dict) and b.get("category") == category]
    if not labelled:
        found = sorted({str(b.get("category")) for b in boxes if isinstance(b, dict)})
        raise BadInput(
            "no_labelled_box", f"no bounding box of category {category!r} (JSON has {found})"
        )
    box = labelled[0]
    width, height = _positive_int(doc, "img_width"), _positive_int(doc, "img_height")
    return FmowMeta(
        category=category,
        box=_box_yxyx(box.get("box"), height, width),
        box_id=box.get("ID") if isinstance(box.get("ID"), int) else None,
        width=width,
        height=height,
        gsd=_gsd(doc.get("gsd")),
        timestamp=str(doc["timestamp"]) if doc.get("timestamp") is not None else None,
        utm=str(doc["utm"]) if doc.get("utm") is not None else None,
    )


def _gsd(value: object) -> float | None:
    """The ground sample distance in metres: a positive finite JSON number; absent or null:
    None. Anything else (a string, even ``"0.5"``, like ``img_height``; NaN; <= 0) is
    ``BadInput`` instead of a NaN in the manifest."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and value > 0
    ):
        raise BadInput("malformed_json",
                       f"malformed JSON: gsd is {value!r}, not a positive number of metres")
    return float(value)


def _positive_int(doc: dict, key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInput(
            "malformed_json", f"malformed JSON: {key} is {value!r}, not a positive integer"
        )
    return value


def _box_yxyx(xywh: object, height: int, width: int) -> tuple[int, int, int, int]:
    """fMoW ``[x, y, w, h]`` -> ``(y0, x0, y1, x1)`` clipped to the image; empty -> BadInput."""
    if (
        not isinstance(xywh, list | tuple)
        or len(xywh) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xywh)
    ):
        raise BadInput("malformed_json", f"malformed JSON: box {xywh!r} is not [x, y, w, h]")
    x, y, w, h = (int(round(v)) for v in xywh)
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + h, height), min(x + w, width)
    if y1 <= y0 or x1 <= x0:
        raise BadInput(
            "bad_box", f"box {list(xywh)} is empty or outside the {width}x{height} image"
        )
    return (y0, x0, y1, x1)


def read_fmow_json(uri: str, category: str) -> FmowMeta:
    """Read and parse one JSON by URI; a missing or bad file is a ``BadInput`` whose reason
    names it."""
    data = read_source(uri, "json")
    try:
        return parse_fmow_json(data, category)
    except BadInput as exc:
        raise BadInput(exc.kind, f"{exc} in {uri}") from None


def fmow_tasks(root_uri: str, walk: LayoutWalk) -> list[SceneTask]:
    """One ``SceneTask`` per image of the walk (URIs under ``root_uri``); a half pair (image
    without JSON or the reverse) becomes a task that only records the reject."""
    from pipeline.store.storage import join_uri

    tasks = []
    for f in walk.files:
        image = join_uri(root_uri, f.image) if f.image else None
        meta = join_uri(root_uri, f.meta) if f.meta else None
        reject = None
        if image is None:
            reject = ("missing_image", f"JSON {meta} has no {f.stem}_rgb.jpg beside it")
        elif meta is None:
            reject = ("missing_json", f"image {image} has no {f.stem}_rgb.json beside it")
        tasks.append(SceneTask(f.scene_id, f.split, image or meta, f.category, meta, reject))
    return tasks


def load_fmow_scene(task: SceneTask) -> LoadedScene:
    """Loader for ``run_ingest``: parse the JSON, decode the image, check they agree."""
    meta = read_fmow_json(task.meta, task.category)
    image = decode_image(read_source(task.source), task.source)
    height, width = image.shape[1:]
    if (height, width) != (meta.height, meta.width):
        raise BadInput(
            "size_mismatch",
            f"image {task.source} is {width}x{height} px but its JSON says "
            f"{meta.width}x{meta.height}",
        )
    extra = {"box_id": meta.box_id, "utm": meta.utm, "box_xywh": _xywh(meta.box)}
    return LoadedScene(image, meta.box, meta.gsd, meta.timestamp, extra)


def _xywh(box: tuple[int, int, int, int]) -> list[int]:
    y0, x0, y1, x1 = box
    return [x0, y0, x1 - x0, y1 - y0]
