"""A generated sample in the fMoW-rgb layout, for demos and tests (nothing is downloaded).

Each scene is a large textured "satellite" image (fields, roads, small buildings) whose class
is decided only by a few tiny objects at one site, among distractors of the same colour and
size scattered over the scene:

- every object is a rectangle of 24-48 px a side (well under 1 % of the scene), placed on the
  8 px grid, painted in two tones of one colour (``OBJECT_TONES``);
- a class object's tones follow its class's pattern (``PATTERNS``: stripes, checks, diagonals
  of period 8 px); a distractor's tones are random 4 px cells, two of every four on;
- every pattern covers exactly half of each 8x8 block, so after an 8x area-average (pyramid
  level 3) all objects, of every class and distractors alike, become the same flat colour: the
  class cannot be read from a low-resolution view, only from patches at level 0-2
  (at level 0 and 1 the pattern is plain in a 64 px patch);
- scene sides default to 1,000-2,000 px with the long side above 1,024, so a pyramid whose
  coarsest level has a long side of at most 256 px goes at least 8x down; a few scenes are large
  (4,000-8,000 px).

Deterministic by seed: scene ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``, so a scene does not depend on the others or on the worker count.
``bad_inputs`` adds broken scenes (truncated, corrupt or empty images; missing or malformed
JSON; a missing image; an unknown category) beside the good ones, for testing the ingest.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PERIOD = 8  # px at level 0: one repeat of every class pattern
PATTERNS = ("hstripes", "vstripes", "checks", "diagonal", "antidiagonal")
# bright, dark: the one colour of all objects. Channel differences are multiples of 64, so
# every 2x2 rounded mean down to level 3 is exact and all objects become the same flat colour.
OBJECT_TONES = ((230, 100, 92), (102, 36, 28))
OBJECT_GAP = 8  # px of background kept between objects
BAD_KINDS = (
    "truncated_image",
    "corrupt_image",
    "empty_image",
    "missing_json",
    "malformed_json",
    "missing_image",
    "unknown_category",
)
UNKNOWN_CATEGORY = "ufo_landing_site"  # not an fMoW category


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """What to generate.

    Attributes:
        splits: (split name, number of good scenes) pairs.
        classes: category names (fMoW names), at most ``len(PATTERNS)``; class ``k`` gets
            pattern ``PATTERNS[k]`` in the given order.
        size_range: (min, max) px of each side of an ordinary scene.
        min_long_side: px; the long side of an ordinary scene is at least this (see module doc).
        large_size_range: (min, max) px of each side of a large scene.
        large_fraction: share of each split's scenes that are large (rounded, spread evenly).
        class_objects: (min, max) class objects per scene, all at one site.
        distractors: (min, max) distractor objects per scene.
        object_sides: allowed object sides in px (multiples of ``PERIOD``).
        bad_inputs: broken scenes to add, spread over splits and ``BAD_KINDS`` in turn.
        seed: master seed.
        jpeg_quality: Pillow JPEG quality of the images.
    """

    splits: tuple[tuple[str, int], ...] = (("train", 100), ("val", 30))
    classes: tuple[str, ...] = ("airport", "dam", "port", "stadium")
    size_range: tuple[int, int] = (1000, 2000)
    min_long_side: int = 1025
    large_size_range: tuple[int, int] = (4000, 8000)
    large_fraction: float = 0.03
    class_objects: tuple[int, int] = (2, 4)
    distractors: tuple[int, int] = (4, 8)
    object_sides: tuple[int, ...] = (24, 32, 40, 48)
    bad_inputs: int = 0
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not 1 <= len(self.classes) <= len(PATTERNS) or len(set(self.classes)) != len(
            self.classes
        ):
            raise ValueError(f"classes must be 1-{len(PATTERNS)} distinct names: {self.classes}")
        if any(s % PERIOD or s <= 0 for s in self.object_sides):
            raise ValueError(f"object_sides must be positive multiples of {PERIOD}")
        lo, hi = self.size_range
        if not 0 < lo <= hi or self.min_long_side > hi:
            raise ValueError(
                f"size_range {self.size_range} must be increasing and reach min_long_side "
                f"{self.min_long_side}"
            )
        if min(self.size_range) < 6 * max(self.object_sides):
            raise ValueError("size_range is too small for the objects (need 6x the largest)")
        if not 0.0 <= self.large_fraction <= 1.0 or self.bad_inputs < 0:
            raise ValueError("large_fraction must be in [0, 1] and bad_inputs >= 0")


@dataclass(frozen=True, slots=True)
class SampleObject:
    """One painted object: ``(y0, x0, y1, x1)`` level-0 px, half-open; ``kind`` is a pattern
    name for a class object or ``"distractor"``."""

    y0: int
    x0: int
    y1: int
    x1: int
    kind: str


@dataclass(frozen=True, slots=True)
class SampleScene:
    """The plan of one scene: everything but the pixels.

    ``box`` is the labelled box ``(y0, x0, y1, x1)`` around the class objects (level-0 px);
    ``bad`` names the kind of breakage, or is None for a good scene.
    """

    split: str
    index: int
    category: str
    loc: int
    t: int
    height: int
    width: int
    objects: tuple[SampleObject, ...]
    box: tuple[int, int, int, int]
    bad: str | None = None

    @property
    def stem(self) -> str:
        return f"{self.category}_{self.loc}_{self.t}"

    @property
    def folder(self) -> str:
        """``<split>/<category>/<category>_<loc>``: the site folder, relative to the root."""
        return f"{self.split}/{self.category}/{self.category}_{self.loc}"

    @property
    def image_path(self) -> str:
        return f"{self.folder}/{self.stem}_rgb.jpg"

    @property
    def json_path(self) -> str:
        return f"{self.folder}/{self.stem}_rgb.json"


# --------------------------------------------------------------------------- patterns


def pattern_mask(kind: str, height: int, width: int) -> np.ndarray:
    """(height, width) bool: which pixels of an object of a class pattern take the bright tone.

    Every pattern is on for exactly half of each ``PERIOD`` x ``PERIOD`` block aligned with
    the object's corner.
    """
    y, x = np.mgrid[0:height, 0:width]
    half = PERIOD // 2
    if kind == "hstripes":
        on = (y // half) % 2
    elif kind == "vstripes":
        on = (x // half) % 2
    elif kind == "checks":
        on = (y // half + x // half) % 2
    elif kind == "diagonal":
        on = ((x + y) // half) % 2
    elif kind == "antidiagonal":
        on = ((x - y) // half) % 2
    else:
        raise ValueError(f"unknown pattern {kind!r}; known: {PATTERNS}")
    return on.astype(bool)


def distractor_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width) bool: random 4 px cells, exactly two of the four in each 8x8 block on."""
    half = PERIOD // 2
    by, bx = -(-height // PERIOD), -(-width // PERIOD)
    cells = np.zeros((by, bx, 4), dtype=bool)
    cells[..., :2] = True
    cells = rng.permuted(cells, axis=2).reshape(by, bx, 2, 2)
    cells = cells.transpose(0, 2, 1, 3).reshape(by * 2, bx * 2)
    return np.repeat(np.repeat(cells, half, 0), half, 1)[:height, :width]


def object_pixels(mask: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 of an object: bright tone where ``mask``, dark elsewhere."""
    bright, dark = (np.array(t, dtype=np.uint8) for t in OBJECT_TONES)
    return np.where(mask[..., None], bright, dark)


# --------------------------------------------------------------------------- planning


def scene_rng(spec: SampleSpec, split: str, index: int) -> np.random.Generator:
    """The generator of one scene, from ``(seed, split, index)`` only."""
    return np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])


def plan_split(
    spec: SampleSpec, split: str, count: int, bad: tuple[str, ...] = ()
) -> list[SampleScene]:
    """Plans of ``count`` good scenes of ``split`` followed by one broken scene per ``bad``."""
    n_large = round(count * spec.large_fraction)
    large = {int((j + 0.5) * count / n_large) for j in range(n_large)} if n_large else set()
    scenes, per_class = [], {c: 0 for c in (*spec.classes, UNKNOWN_CATEGORY)}
    for index in range(count + len(bad)):
        kind = bad[index - count] if index >= count else None
        if kind == "unknown_category":
            category = UNKNOWN_CATEGORY
        else:
            category = spec.classes[index % len(spec.classes)]
        j = per_class[category]
        per_class[category] += 1
        # two views (t = 0, 1) per site, as fMoW has several images of one location
        scenes.append(plan_scene(spec, split, index, category, j // 2, j % 2, index in large, kind))
    return scenes


def plan_scene(
    spec: SampleSpec,
    split: str,
    index: int,
    category: str,
    loc: int,
    t: int,
    large: bool,
    bad: str | None = None,
) -> SampleScene:
    """Size and object layout of one scene (pure; deterministic by ``(seed, split, index)``)."""
    rng = scene_rng(spec, split, index)
    height, width = _scene_size(spec, rng, large)
    pattern = PATTERNS[spec.classes.index(category)] if category in spec.classes else PATTERNS[0]
    taken: list[SampleObject] = []
    n_class = int(rng.integers(spec.class_objects[0], spec.class_objects[1] + 1))
    site = _site(rng, height, width, max(spec.object_sides))
    for _ in range(n_class):
        _place(rng, spec, taken, site, pattern)
    box = _union_box([o for o in taken if o.kind != "distractor"], height, width)
    n_distractors = int(rng.integers(spec.distractors[0], spec.distractors[1] + 1))
    for _ in range(n_distractors):
        _place(rng, spec, taken, (0, 0, height, width), "distractor")
    return SampleScene(split, index, category, loc, t, height, width, tuple(taken), box, bad)


def _scene_size(spec: SampleSpec, rng: np.random.Generator, large: bool) -> tuple[int, int]:
    lo, hi = spec.large_size_range if large else spec.size_range
    height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    if max(height, width) < spec.min_long_side:
        long_side = int(rng.integers(spec.min_long_side, max(hi, spec.min_long_side) + 1))
        height, width = (long_side, width) if height >= width else (height, long_side)
    return height, width


def _site(
    rng: np.random.Generator, height: int, width: int, side: int
) -> tuple[int, int, int, int]:
    """A square region of about 6 object sides where the class objects go."""
    span = 6 * side
    y0 = int(rng.integers(PERIOD, max(height - span - PERIOD, PERIOD + 1)))
    x0 = int(rng.integers(PERIOD, max(width - span - PERIOD, PERIOD + 1)))
    return (y0, x0, min(y0 + span, height - PERIOD), min(x0 + span, width - PERIOD))


def _place(
    rng: np.random.Generator,
    spec: SampleSpec,
    taken: list[SampleObject],
    region: tuple[int, int, int, int],
    kind: str,
) -> None:
    """Add one object on the 8 px grid inside ``region``, apart from the others (100 tries)."""
    ry0, rx0, ry1, rx1 = region
    for _ in range(100):
        h, w = (int(v) for v in rng.choice(spec.object_sides, size=2))
        if ry1 - ry0 < h + 2 * PERIOD or rx1 - rx0 < w + 2 * PERIOD:
            return
        y0 = int(rng.integers(ry0 // PERIOD + 1, (ry1 - h) // PERIOD)) * PERIOD
        x0 = int(rng.integers(rx0 // PERIOD + 1, (rx1 - w) // PERIOD)) * PERIOD
        obj = SampleObject(y0, x0, y0 + h, x0 + w, kind)
        if all(_apart(obj, other) for other in taken):
            taken.append(obj)
            return


def _apart(a: SampleObject, b: SampleObject) -> bool:
    g = OBJECT_GAP
    return a.y1 + g <= b.y0 or b.y1 + g <= a.y0 or a.x1 + g <= b.x0 or b.x1 + g <= a.x0


def _union_box(objs: list[SampleObject], height: int, width: int) -> tuple[int, int, int, int]:
    """The labelled box: the class objects' union padded by 8 px, clipped to the scene."""
    if not objs:
        raise RuntimeError("no class object fits in the scene; enlarge size_range")
    pad = PERIOD
    return (
        max(min(o.y0 for o in objs) - pad, 0),
        max(min(o.x0 for o in objs) - pad, 0),
        min(max(o.y1 for o in objs) + pad, height),
        min(max(o.x1 for o in objs) + pad, width),
    )


# --------------------------------------------------------------------------- rendering

_SOIL, _GRASS, _CROP = (152, 132, 100), (78, 98, 58), (120, 128, 70)
_ROAD, _ROOFS = (128, 126, 120), ((190, 190, 185), (96, 100, 110), (160, 150, 130), (60, 70, 60))
_BAND = 1024  # rows rendered at a time, to bound the float temporaries of an 8k scene


def render_scene(spec: SampleSpec, scene: SampleScene) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a planned scene (deterministic by the scene's seed)."""
    rng = scene_rng(spec, scene.split, scene.index + 1_000_003)  # separate from the plan's
    image = _background(rng, scene.height, scene.width)
    pil = Image.fromarray(image)
    _draw_clutter(rng, pil, scene.height, scene.width)
    image = np.asarray(pil).copy()
    for obj in scene.objects:
        h, w = obj.y1 - obj.y0, obj.x1 - obj.x0
        mask = (
            distractor_mask(rng, h, w) if obj.kind == "distractor" else pattern_mask(obj.kind, h, w)
        )
        image[obj.y0 : obj.y1, obj.x0 : obj.x1] = object_pixels(mask)
    _add_grain(rng, image)
    return image


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Soil/grass blend of a smooth field, tinted by blocky crop parcels (16 px cells)."""
    cell = 96
    field = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
    parcels = _parcels(rng, height, width)
    fy = np.arange(height, dtype=np.float32) / np.float32(cell)
    fx = np.arange(width, dtype=np.float32) / np.float32(cell)
    x0 = fx.astype(np.int64)
    wx = (fx - x0.astype(np.float32))[None, :]
    px = np.arange(width) // 16
    out = np.empty((height, width, 3), dtype=np.uint8)
    for r0 in range(0, height, _BAND):
        r1 = min(r0 + _BAND, height)
        y0 = fy[r0:r1].astype(np.int64)
        wy = (fy[r0:r1] - y0.astype(np.float32))[:, None]
        rows = field[y0] * (1 - wy) + field[y0 + 1] * wy  # (band, Wc)
        f = rows[:, x0] * (1 - wx) + rows[:, x0 + 1] * wx  # (band, W) float32 in [0, 1]
        p = parcels[np.arange(r0, r1) // 16][:, px] * np.float32(0.5)
        for c in range(3):
            base = np.float32(_GRASS[c]) + np.float32(_SOIL[c] - _GRASS[c]) * f
            base += p * (np.float32(_CROP[c]) - base)
            out[r0:r1, :, c] = base.astype(np.uint8)  # already within [0, 255]
    return out


def _parcels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(ceil(H/16), ceil(W/16)) float32 in [0, 1]: crop parcels (random quadrilaterals)."""
    ph, pw = -(-height // 16), -(-width // 16)
    canvas = Image.new("L", (pw, ph), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(max(1, ph * pw // 400)):
        cy, cx = rng.random() * ph, rng.random() * pw
        r = 3 + rng.random() * 12
        pts = [(cx + r * np.cos(a) * (0.6 + 0.8 * rng.random()),
                cy + r * np.sin(a) * (0.6 + 0.8 * rng.random()))
               for a in np.sort(rng.random(4)) * 2 * np.pi]  # fmt: skip
        draw.polygon(pts, fill=int(80 + rng.random() * 175))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _draw_clutter(rng: np.random.Generator, pil: Image.Image, height: int, width: int) -> None:
    """Roads and small buildings: texture in colours unlike the objects'."""
    draw = ImageDraw.Draw(pil)
    for _ in range(2 + height * width // 2_000_000):
        horizontal = rng.random() < 0.5
        a, b = rng.random(2)
        p0 = (0, a * height) if horizontal else (a * width, 0)
        p1 = (width, b * height) if horizontal else (b * width, height)
        draw.line([p0, p1], fill=_ROAD, width=int(rng.integers(6, 15)))
    for _ in range(height * width // 40_000):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = (int(v) for v in rng.integers(10, 60, size=2))
        roof = _ROOFS[int(rng.integers(0, len(_ROOFS)))]
        draw.rectangle([x, y, x + w, y + h], fill=roof)


GRAIN = 3  # grey levels of luminance noise: texture that costs little in JPEG and zstd size


def _add_grain(rng: np.random.Generator, image: np.ndarray) -> None:
    """Add uniform luminance grain of +-``GRAIN`` grey levels in place, band by band."""
    for r0 in range(0, image.shape[0], _BAND):
        band = image[r0 : r0 + _BAND]
        noise = rng.integers(-GRAIN, GRAIN + 1, size=band.shape[:2], dtype=np.int16)[..., None]
        band[...] = np.clip(band.astype(np.int16) + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- files


def scene_json(scene: SampleScene) -> dict:
    """The fMoW-style JSON of a scene (boxes as ``[x, y, w, h]``), with real fMoW's quirks:
    some files hold ``bounding_boxes`` as a single object, some list a ``false_detection``
    box before the labelled one."""
    y0, x0, y1, x1 = scene.box
    boxes: list[dict] | dict = [
        {"box": [x0, y0, x1 - x0, y1 - y0], "category": scene.category, "ID": scene.index}
    ]
    distractors = [o for o in scene.objects if o.kind == "distractor"]
    if scene.index % 7 == 5 and distractors:
        d = distractors[0]
        boxes.insert(0, {"box": [d.x0, d.y0, d.x1 - d.x0, d.y1 - d.y0],
                         "category": "false_detection", "ID": 100_000 + scene.index})  # fmt: skip
    if scene.index % 5 == 3 and len(boxes) == 1:
        boxes = boxes[0]
    day = 1 + scene.index % 28
    month = 1 + (scene.index // 28) % 12
    return {
        "bounding_boxes": boxes,
        "gsd": round(0.3 + 0.05 * (scene.index % 20), 3),
        "img_filename": f"{scene.stem}_rgb.jpg",
        "img_height": scene.height,
        "img_width": scene.width,
        "timestamp": f"{2014 + scene.t + scene.index % 3}-{month:02d}-{day:02d}T10:{scene.index % 60:02d}:00Z",
        "utm": f"{1 + scene.loc % 60}N",
        "cloud_cover": 0,
        "country_code": "XYZ",
        "scan_direction": "FORWARD",
        "off_nadir_angle_dbl": 12.5,
        "sun_elevation_dbl": 48.0,
        "spatial_reference": "WGS84",
    }


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of (H, W, 3) uint8."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def overwrite_middle(data: bytes, seed: int, count: tuple[int, int] = (16, 64)) -> bytes:
    """``data`` with ``count[0]``-``count[1]`` bytes in its middle overwritten by random ones
    (seeded): for a JPEG, garbage inside the entropy-coded scan that Pillow decodes silently.
    The length and everything else stay as they were."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(count[0], count[1] + 1))
    start = len(data) // 2 - n // 2
    return data[:start] + rng.bytes(n) + data[start + n :]


def scene_files(spec: SampleSpec, scene: SampleScene) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the files of one scene, broken as ``scene.bad`` says."""
    image = encode_jpeg(render_scene(spec, scene), spec.jpeg_quality)
    meta = json.dumps(scene_json(scene), indent=1).encode()
    bad = scene.bad
    if bad == "truncated_image":
        image = image[: len(image) * 6 // 10]
    elif bad == "corrupt_image":
        noise = scene_rng(spec, scene.split, scene.index).bytes(len(image) - 20)
        image = image[:20] + noise
    elif bad == "empty_image":
        image = b""
    elif bad == "malformed_json":
        meta = meta[: len(meta) // 2]
    files = []
    if bad != "missing_image":
        files.append((scene.image_path, image))
    if bad != "missing_json":
        files.append((scene.json_path, meta))
    return files


def plan_sample(spec: SampleSpec) -> list[SampleScene]:
    """Plans of every scene of every split (good ones first in each split, then broken ones)."""
    bad_per_split: dict[str, list[str]] = {name: [] for name, _ in spec.splits}
    for j in range(spec.bad_inputs):
        name = spec.splits[j % len(spec.splits)][0]
        bad_per_split[name].append(BAD_KINDS[j % len(BAD_KINDS)])
    scenes = []
    for name, count in spec.splits:
        scenes.extend(plan_split(spec, name, count, tuple(bad_per_split[name])))
    return scenes


def _write_scene(spec: SampleSpec, scene: SampleScene, out_uri: str) -> int:
    from pipeline.store import storage

    total = 0
    for rel, data in scene_files(spec, scene):
        storage.write_bytes(storage.join_uri(out_uri, rel), data)
        total += len(data)
    return total


def generate_sample(
    out_uri: str, spec: SampleSpec, *, workers: int = 1
) -> Iterator[tuple[SampleScene, int]]:
    """Write the sample under ``out_uri`` (local path or storage URI), yielding
    ``(scene, bytes written)`` as each scene is done, in plan order.

    ``workers`` > 1 renders scenes in that many processes; the files are the same either way.
    """
    scenes = plan_sample(spec)
    if workers <= 1:
        for scene in scenes:
            yield scene, _write_scene(spec, scene, out_uri)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_scene, spec, s, out_uri) for s in scenes]
        for scene, fut in zip(scenes, futures, strict=True):
            yield scene, fut.result()
