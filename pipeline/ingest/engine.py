"""The ingest engine: raw images -> one pyramid per scene (dask, one task per scene) -> manifest.

A source (fMoW layout, plain folder) turns its input into ``SceneTask`` values and supplies a
*loader* that reads one task's pixels and metadata; ``run_ingest`` does the rest for every
source the same way:

- one dask task per scene, at most ``workers`` at once, so at most ``workers`` decoded scenes
  are in memory (a 9,000 x 9,000 RGB scene is 243 MB, plus its next level while writing);
- resumable and idempotent: a scene whose pyramid is complete (``pyramid_complete``) is skipped
  and its manifest row rebuilt from the pyramid's metadata; an incomplete one is rewritten from
  scratch by ``write_pyramid``. The manifest and rejects are written once, at the end, sorted,
  so a run killed half way and run again leaves exactly what an uninterrupted run leaves;
- bad input never stops the run: every failure of one scene (``BadInput`` from the loader, or
  any other error, e.g. a failed write) becomes a row of the rejects table with the input's
  path, a short ``kind`` and the reason;
- progress: a line on stderr every ``progress_s`` seconds with counts, rate and ETA.

Class labels: the caller passes the class list; a scene whose category is not in it is
rejected as ``unknown_category``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from pipeline.ingest.tiled import TIFF_SUFFIXES, TiledImage, open_tiled
from pipeline.store import storage

# Pillow's decompression-bomb guard (89 Mpx warns, 179 Mpx raises) stays on: fMoW's largest
# scenes (about 9,000 x 9,000 = 81 Mpx) pass; larger inputs are rejected with the reason.


class BadInput(ValueError):
    """An input that cannot be ingested.

    ``kind`` is a short category for counting (``missing_json``, ``malformed_json``,
    ``missing_image``, ``unreadable_image``, ``empty_image``, ``unknown_category``,
    ``size_mismatch``, ``bad_box``, ``checksum_mismatch``, ...); ``str(exc)`` is the full reason.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class SceneTask:
    """One scene to ingest (picklable: it travels to dask workers).

    Attributes:
        scene_id: unique id; the pyramid is written to ``<dst>/<scene_id>``.
        split: data split name.
        source: URI of the raw image (the manifest's ``source`` column).
        category: the expected class name (from the folder or the labels CSV).
        meta: URI of the metadata file (fMoW JSON), or None.
        reject: ``(kind, reason)`` when listing the input already found it unusable
            (e.g. an image without its JSON); the task then only records the reject.
        sha256: the source's expected SHA-256 (hex) from a published checksum file, or
            None (``pipeline.ingest.checksums``).
    """

    scene_id: str
    split: str
    source: str
    category: str
    meta: str | None = None
    reject: tuple[str, str] | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedScene:
    """A loader's result: level-0 pixels and the metadata that goes into the pyramid attrs.

    Attributes:
        image: (C, H, W) uint8, or a ``TiledImage`` (a TIFF read band by band while writing).
        box: labelled box ``(y0, x0, y1, x1)`` in level-0 px, half-open, or None.
        gsd: ground sample distance in metres, or None.
        timestamp: acquisition time as the source gives it, or None.
        extra: further JSON-serialisable metadata kept in the pyramid's scene attrs.
    """

    image: np.ndarray | TiledImage
    box: tuple[int, int, int, int] | None = None
    gsd: float | None = None
    timestamp: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


Loader = Callable[[SceneTask], LoadedScene]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one scene task ended with: ``status`` is written, skipped or rejected; ``row`` is
    the manifest row (written, skipped) or the rejects row (rejected)."""

    status: str
    row: dict[str, Any]
    pixels: int = 0  # level-0 pixels written (for the rate)


@dataclass(frozen=True, slots=True)
class IngestReport:
    """The result of ``run_ingest``: manifest rows, rejects rows and counts."""

    rows: tuple[dict[str, Any], ...]
    rejects: tuple[dict[str, Any], ...]
    counts: Mapping[str, int]  # written, skipped, rejected
    reject_kinds: Mapping[str, int]
    seconds: float
    nodes: int | None = None  # Ray nodes the scenes ran on (``scheduler="ray"``), else None

    @property
    def all_in(self) -> bool:
        return not self.rejects


# --------------------------------------------------------------------------- reading inputs


def read_source(uri: str, what: str = "image") -> bytes:
    """Bytes of a raw input; a missing file is ``BadInput(missing_<what>)``."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise BadInput(f"missing_{what}", f"missing {what} {uri}") from None


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """Decode JPEG/PNG/TIFF/... bytes with Pillow into (C, H, W) uint8 RGB.

    Greyscale, palette, alpha and 16-bit images are converted to 8-bit RGB (16-bit by
    keeping the high byte), so every pyramid has 3 channels. Raises ``BadInput`` for empty,
    truncated, corrupt or oversized files.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInput("empty_image", f"empty image file {uri} (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:  # Pillow's size guard runs here
            if img.format == "JPEG":
                check_jpeg(data, uri)
            img.load()
            if img.width < 1 or img.height < 1:
                raise BadInput("empty_image", f"image {uri} has no pixels ({img.size})")
            return _to_rgb_chw(img)
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput("too_large", f"image {uri} too large for Pillow's guard: {exc}") from None
    except UnidentifiedImageError:
        raise BadInput("unreadable_image", f"cannot decode image {uri}: unknown format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # no object reprs (memory addresses) in the reason: rejects must be reproducible
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(exc))
        raise BadInput("unreadable_image", f"cannot decode image {uri}: {reason}") from None


def open_image(uri: str) -> tuple[np.ndarray | TiledImage, dict[str, Any]]:
    """The pixels of the image at ``uri`` and its geo attributes (``tiled.geo_attrs``).

    A local TIFF that ``tiled.open_tiled`` can read window by window comes back as a
    ``TiledImage`` (nothing decoded yet: the pyramid writer pulls one row of tiles at a time);
    every other input is decoded whole by ``decode_image`` (attributes empty). ``BadInput``
    for missing or unreadable files.
    """
    parsed = storage.parse_uri(uri)
    if parsed.scheme == "file" and uri.lower().endswith(TIFF_SUFFIXES):
        try:
            opened = open_tiled(parsed.root)
        except FileNotFoundError:
            raise BadInput("missing_image", f"missing image {uri}") from None
        except Exception as exc:  # noqa: BLE001 - tifffile raises several kinds for bad files
            raise BadInput("unreadable_image", f"cannot read TIFF {uri}: {exc}") from None
        if opened is not None:
            return opened
    return decode_image(read_source(uri), uri), {}


def tiled_bands(image: TiledImage, uri: str) -> Iterator[np.ndarray]:
    """``image.bands()`` with a decoding failure turned into ``BadInput("unreadable_image")``
    naming ``uri`` (a truncated or corrupt tile is found only while writing)."""
    bands = image.bands()
    while True:
        try:
            band = next(bands)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - tifffile / codecs raise several kinds
            raise BadInput("unreadable_image", f"cannot decode TIFF {uri}: {exc}") from None
        yield band


def check_jpeg(data: bytes, uri: str) -> None:
    """``BadInput("unreadable_image")`` naming ``uri`` when libjpeg finds the JPEG corrupt.

    Pillow (and imagecodecs) decode a JPEG with corrupt entropy-coded bytes silently: libjpeg
    only *warns* ("Corrupt JPEG data: bad Huffman code", "premature end of data segment",
    "N extraneous bytes before marker") and fills in what it could not decode. simplejpeg's
    strict mode (libjpeg-turbo, bundled in its wheel) turns those warnings into errors. It
    decodes at 1/8 scale to grey: the entropy decoder (where the warnings come from) still
    reads every coefficient, the inverse DCT and colour conversion are skipped, so the check
    costs about 15 ms per Mpx (Pillow's full decode: about 36 ms). Pixels still come from
    Pillow, so pyramids are byte-identical to those ingested before the check.

    Not every corruption is a libjpeg warning: Huffman codes resynchronise, so garbage that
    decodes to valid codes and ends on a block boundary is not seen. Of 200 generated scenes
    (500-1,000 px) with 16-64 random bytes overwritten mid-file, 148 were caught (Pillow
    raised on 31); ``bench/faults.py --only ingest_rejects_unreadable`` measures it again.
    """
    import simplejpeg

    try:
        header = simplejpeg.decode_jpeg_header(data)
        colorspace = "CMYK" if header[2] in ("CMYK", "YCCK") else "GRAY"
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_factor=8, strict=True)
    except ValueError as exc:
        raise BadInput(
            "unreadable_image", f"corrupt JPEG {uri}: libjpeg reports {exc} (strict decode)"
        ) from None


def _to_rgb_chw(img: Any) -> np.ndarray:
    """(3, H, W) uint8 from a loaded Pillow image, one channel at a time (peak memory: the
    decoded image, the result and one channel; no full-size transposed copy)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = np.empty((3, img.height, img.width), dtype=np.uint8)
    for c in range(3):
        out[c] = np.asarray(img.getchannel(c))
    return out


# --------------------------------------------------------------------------- one scene


def scene_attrs(task: SceneTask, loaded: LoadedScene) -> dict[str, Any]:
    """The ``scene`` attributes stored in the pyramid (and read back when skipping)."""
    return {
        "scene_id": task.scene_id,
        "split": task.split,
        "category": task.category,
        "source": task.source,
        "box": list(loaded.box) if loaded.box is not None else None,
        "gsd": loaded.gsd,
        "timestamp": loaded.timestamp,
        **dict(loaded.extra),
    }


def manifest_row(
    attrs: Mapping[str, Any],
    uri: str,
    level_shapes: Sequence[Sequence[int]],
    classes: Sequence[str],
) -> dict[str, Any]:
    """A manifest row from a pyramid's scene attrs and its ``(C, H, W)`` level shapes."""
    c, h, w = level_shapes[0]
    return {
        "scene_id": attrs["scene_id"],
        "split": attrs["split"],
        "category": attrs["category"],
        "label": list(classes).index(attrs["category"]),
        "uri": uri,
        "height": h,
        "width": w,
        "channels": c,
        "num_levels": len(level_shapes),
        "level_shapes": json.dumps([[s[1], s[2]] for s in level_shapes]),
        "box": attrs.get("box"),
        "gsd": attrs.get("gsd"),
        "timestamp": attrs.get("timestamp"),
        "source": attrs["source"],
    }


def reject_row(task: SceneTask, kind: str, reason: str, path: str | None = None) -> dict[str, Any]:
    """A rejects-table row (``pipeline.store.manifest.REJECTS_SCHEMA``); ``path`` defaults to the
    task's image URI."""
    return {
        "scene_id": task.scene_id,
        "split": task.split,
        "path": path or task.source,
        "kind": kind,
        "reason": reason,
    }


def ingest_scene(
    task: SceneTask,
    loader: Loader,
    classes: Sequence[str],
    dst: str,
    coarsest: int,
) -> Outcome:
    """Ingest one scene; never raises for a problem of this scene (it becomes a reject).

    Skips the scene when its pyramid under ``dst`` is complete.
    """
    from pipeline.store import pyramid

    if task.reject is not None:
        return Outcome("rejected", reject_row(task, *task.reject))
    if task.category not in classes:
        reason = f"unknown category {task.category!r} (classes: {', '.join(classes)})"
        return Outcome("rejected", reject_row(task, "unknown_category", reason))
    try:
        if pyramid.pyramid_complete(dst, task.scene_id):
            info = pyramid.open_pyramid(storage.join_uri(dst, task.scene_id))
            return Outcome(
                "skipped", manifest_row(info.attrs, info.uri, info.level_shapes, classes)
            )
        loaded = loader(task)
        check_scene_size(loaded.image, task.source)
        attrs = scene_attrs(task, loaded)
        uri = write_scene(dst, task, loaded, attrs, coarsest)
        c, height, width = loaded.image.shape
        shapes = [(c, h, w) for h, w in pyramid.pyramid_shapes(height, width, coarsest)]
        return Outcome("written", manifest_row(attrs, uri, shapes, classes), height * width)
    except BadInput as exc:
        return Outcome("rejected", reject_row(task, exc.kind, str(exc), _bad_path(task, exc)))
    except Exception as exc:  # noqa: BLE001 - one scene's failure must not stop the run
        reason = f"{type(exc).__name__} while ingesting {task.source}: {exc}"
        return Outcome("rejected", reject_row(task, "error", reason))


def write_scene(dst: str, task: SceneTask, loaded: LoadedScene, attrs: dict[str, Any],
                coarsest: int) -> str:
    """Write the pyramid of ``loaded`` (a whole array, or a ``TiledImage`` band by band);
    return its URI."""
    from pipeline.store import pyramid

    image = loaded.image
    if isinstance(image, TiledImage):
        return pyramid.write_pyramid_rows(dst, task.scene_id, image.shape,
                                          tiled_bands(image, task.source), attrs,
                                          coarsest=coarsest)
    return pyramid.write_pyramid(dst, task.scene_id, image, attrs, coarsest=coarsest)


def check_scene_size(image: np.ndarray | TiledImage, uri: str) -> None:
    """``BadInput("too_small")`` naming ``uri`` when the (C, H, W) image is narrower or lower
    than ``pipeline.store.pyramid.MIN_SCENE_SIDE`` px: training could not read it."""
    from pipeline.store.pyramid import MIN_SCENE_SIDE

    _, h, w = image.shape
    if min(h, w) < MIN_SCENE_SIDE:
        raise BadInput("too_small", f"image {uri} is {w}x{h} px, smaller than {MIN_SCENE_SIDE} px "
                       "on a side (pipeline.store.pyramid.MIN_SCENE_SIDE): too small to train on")


def _bad_path(task: SceneTask, exc: BadInput) -> str:
    """The input a reject is about: the metadata file for JSON problems, else the image."""
    if task.meta is not None and exc.kind.endswith("json"):
        return task.meta
    return task.source


# --------------------------------------------------------------------------- the run


ETA_WINDOW_S = 30.0
"""The ETA counts the scenes finished in about the last this many seconds."""


class _Progress:
    """Counts outcomes as dask finishes tasks and prints a line every ``every_s`` seconds
    (``verbose``: also one line per scene: its status, id and where it went or why not).

    The line's rate is since the start; its ETA is the scenes left at the rate of the last
    ``ETA_WINDOW_S`` seconds of finished scenes (``?`` until two have finished), so neither
    the start before the first scene (20-35 s for 5,000 scenes on a loaded machine: an ETA of
    one to two days at the first line) nor the fast skips at the start of a resumed run
    distort it."""

    def __init__(self, total: int, every_s: float, out: TextIO | None, verbose: bool = False):
        self.total, self.every_s, self.out, self.verbose = total, every_s, out, verbose
        self.counts: Counter[str] = Counter()
        self.pixels = 0
        self.start = self.last = time.monotonic()
        self.recent: deque[tuple[float, int]] = deque()  # (time, done) of the last window

    def add(self, outcome: Outcome, now: float | None = None) -> None:
        self.counts[outcome.status] += 1
        self.pixels += outcome.pixels
        self._remember(time.monotonic() if now is None else now)
        if self.verbose and self.out is not None:
            row = outcome.row
            where = row.get("uri") or f"{row.get('kind')}: {row.get('reason')} ({row.get('path')})"
            print(f"[ingest] {outcome.status} {row.get('scene_id')}: {where}", file=self.out, flush=True)
        now = time.monotonic() if now is None else now
        if self.out is not None and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            print(self.line(now), file=self.out, flush=True)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def _remember(self, now: float) -> None:
        """Keep (now, done) and the samples of the last ``ETA_WINDOW_S`` s, plus the one
        before them (where the window starts)."""
        self.recent.append((now, self.done))
        while len(self.recent) > 2 and now - self.recent[1][0] >= ETA_WINDOW_S:
            self.recent.popleft()

    def eta(self, now: float) -> float:
        """Seconds left: the scenes left over the rate since the window's first finished
        scene; NaN (unknown: the line says ``eta ?``) while fewer than two have finished."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if len(self.recent) >= 2 and self.done > self.recent[0][1]:
            since, done_then = self.recent[0]
            return left * max(now - since, 1e-9) / (self.done - done_then)
        return float("nan")

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = self.eta(now)
        eta_text = "?" if math.isnan(eta) else f"{eta:.0f}"
        c = self.counts
        return (
            f"[ingest] {self.done}/{self.total} scenes | {c['written']} written, "
            f"{c['skipped']} skipped, {c['rejected']} rejected | {rate:.2f} scenes/s, "
            f"{self.pixels / elapsed / 1e6:.1f} Mpx/s | elapsed {elapsed:.0f} s, eta {eta_text} s"
        )


def run_ingest(
    tasks: Sequence[SceneTask],
    loader: Loader,
    classes: Sequence[str],
    dst: str,
    *,
    coarsest: int = 256,
    workers: int = 2,
    scheduler: str = "threads",
    progress_s: float = 5.0,
    out: TextIO | None = sys.stderr,
    verbose: bool = False,
) -> IngestReport:
    """Ingest ``tasks`` into pyramids under ``dst`` with dask (one task per scene).

    Args:
        tasks: the scenes; scene ids must be unique (duplicates are rejected).
        loader: reads one task's pixels and metadata (a module-level function, so that the
            ``processes`` scheduler can pickle it); raises ``BadInput`` for bad input.
        classes: the class list; index = label.
        dst: pyramid root URI.
        coarsest: long side in px of the coarsest pyramid level, at most.
        workers: scenes processed at once (bounds memory: one decoded scene per worker).
        scheduler: dask local scheduler, ``threads`` (default: decoding, downsampling and
            compression release the GIL), ``processes`` or ``sync``; or ``ray``: one Ray task
            per scene (1 CPU each, at most ``workers`` in flight, dealt to the nodes in turn)
            on the cluster at ``RAY_ADDRESS`` (default ``auto``: the one this machine
            belongs to), the same
            cluster that trains; ``src`` and ``dst`` must then be reachable from every node
            (S3, or a shared file system).
        progress_s: seconds between progress lines on ``out`` (None: quiet); verbose: per scene.

    Returns the rows and rejects (not yet written; see ``pipeline.store.manifest.write_manifest``).
    """
    start = time.monotonic()
    unique, duplicates = _dedupe(tasks)
    progress = _Progress(len(tasks), progress_s, out, verbose)
    for dup in duplicates:
        progress.add(dup)
    args = (loader, tuple(classes), dst, coarsest)
    nodes = None
    if scheduler == "ray":
        outcomes, nodes = _compute_on_ray(unique, args, workers, progress)
    else:
        outcomes = _compute_on_dask(unique, args, scheduler, workers, progress)
    outcomes += duplicates
    rows = tuple(o.row for o in outcomes if o.status != "rejected")
    rejects = tuple(o.row for o in outcomes if o.status == "rejected")
    return IngestReport(
        rows=rows,
        rejects=rejects,
        counts={s: progress.counts[s] for s in ("written", "skipped", "rejected")},
        reject_kinds=dict(sorted(Counter(r["kind"] for r in rejects).items())),
        seconds=time.monotonic() - start,
        nodes=nodes,
    )


def _compute_on_dask(unique: Sequence[SceneTask], args: tuple, scheduler: str, workers: int,
                     progress: _Progress) -> list[Outcome]:
    """``ingest_scene(task, *args)`` of every task, one dask task each, on a local scheduler."""
    import dask
    from dask.callbacks import Callback

    delayed = [dask.delayed(ingest_scene, pure=False)(t, *args, dask_key_name=f"scene-{i}")
               for i, t in enumerate(unique)]

    def posttask(key, result, dsk, state, worker_id):  # dask calls it in the driver
        if isinstance(result, Outcome):
            progress.add(result)

    with Callback(posttask=posttask):
        return list(dask.compute(*delayed, scheduler=scheduler, num_workers=workers))


def _ingest_on_node(task: SceneTask, *args: Any) -> tuple[Outcome, str]:
    """``ingest_scene`` in a Ray task; with the id of the node it ran on."""
    import ray

    return ingest_scene(task, *args), ray.get_runtime_context().get_node_id()


def _round_robin_over_nodes() -> list[Any]:
    """One soft node-affinity strategy per alive node with a CPU, for scenes dealt out in
    turn: every node gets scenes even when one node alone could keep up (Ray's own SPREAD
    left a second node idle while its workers started); soft, so a scene whose node died
    runs elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and n["Resources"].get("CPU", 0) >= 1)
    return [NodeAffinitySchedulingStrategy(node, soft=True) for node in nodes] or ["DEFAULT"]


def _compute_on_ray(unique: Sequence[SceneTask], args: tuple, workers: int,
                    progress: _Progress) -> tuple[list[Outcome], int]:
    """``ingest_scene(task, *args)`` of every task as Ray tasks on the cluster at
    ``RAY_ADDRESS`` (at most ``workers`` in flight, so memory stays bounded); the outcomes in
    task order and how many nodes ran them."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING",
                 log_to_driver=False, configure_logging=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(_ingest_on_node)
    placements = _round_robin_over_nodes()
    shared = [ray.put(a) for a in args]
    outcomes: list[Outcome | None] = [None] * len(unique)
    nodes, pending, queue = set(), {}, list(enumerate(unique))[::-1]
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                i, task = queue.pop()
                where = placements[i % len(placements)]
                pending[remote.options(scheduling_strategy=where).remote(task, *shared)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            outcome, node = ray.get(done[0])
            outcomes[pending.pop(done[0])] = outcome
            nodes.add(node)
            progress.add(outcome)
    finally:
        if started:
            ray.shutdown()
    return outcomes, len(nodes)


def _dedupe(tasks: Sequence[SceneTask]) -> tuple[list[SceneTask], list[Outcome]]:
    """Keep the first task of each scene id; later ones become ``duplicate`` rejects."""
    seen: set[str] = set()
    unique, duplicates = [], []
    for task in tasks:
        if task.scene_id in seen:
            reason = f"duplicate scene id {task.scene_id!r} (first one kept)"
            duplicates.append(Outcome("rejected", reject_row(task, "duplicate", reason)))
        else:
            seen.add(task.scene_id)
            unique.append(task)
    return unique, duplicates


def summary(report: IngestReport, manifest_uri: str | None = None, show: int = 20) -> str:
    """A few lines for people: counts, reject kinds, the first ``show`` rejected inputs with
    their reasons (the rest are in the rejects table), time, where the manifest is."""
    from pipeline.store.manifest import paths_for

    c = report.counts
    lines = [
        f"[ingest] done in {report.seconds:.1f} s: {sum(c.values())} scenes, "
        f"{c['written']} written, {c['skipped']} skipped (already complete), "
        f"{c['rejected']} rejected"
    ]
    if report.nodes is not None:
        lines.append(f"[ingest] ran as Ray tasks on {report.nodes} node(s)")
    if report.reject_kinds:
        kinds = ", ".join(f"{k} {n}" for k, n in report.reject_kinds.items())
        lines.append(f"[ingest] rejects by kind: {kinds}")
    lines += [f"[ingest] rejected {r['path']} ({r['kind']}): {r['reason']}"
              for r in report.rejects[:show]]
    if len(report.rejects) > show:
        where = paths_for(manifest_uri).rejects_csv if manifest_uri else "the rejects table"
        lines.append(f"[ingest] ... and {len(report.rejects) - show} more rejects: {where}")
    if manifest_uri:
        lines.append(f"[ingest] manifest: {manifest_uri}")
    return "\n".join(lines)


def add_engine_options(parser: Any, unit: str = "scenes") -> None:
    """Command-line options of the ingest engine shared by every ingest job (argparse)."""
    parser.add_argument("--manifest", help="manifest URI (default: <dst>/manifest.parquet)")
    parser.add_argument("--workers", type=int, default=2, help=f"{unit} processed at once")
    parser.add_argument("--coarsest", type=int, default=256, help="max long side of the last level")
    parser.add_argument("--scheduler", choices=("threads", "processes", "sync", "ray"),
                        default="threads", help="dask's local schedulers, or ray: one Ray task "
                        "per scene on the cluster at RAY_ADDRESS (default auto)")
    parser.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--verbose", action="store_true", help="also a line per scene")


def check_engine_options(parser: Any, args: Any) -> None:
    """Reject engine options out of range through ``parser.error`` (exit 2)."""
    if args.workers < 1 or args.coarsest < 1:
        parser.error("--workers and --coarsest must be >= 1")

