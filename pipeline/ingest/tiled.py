"""Tiled (Big)TIFF / GeoTIFF sources read window by window, never whole (``tifffile``).

A local TIFF whose first page stores its pixels in tiles or strips, interleaved (planar
configuration 1), 8- or 16-bit, with 1, 3 or 4 samples, opens as a ``TiledImage``: its shape,
and ``bands()``, which decodes one row of tiles (or one strip) at a time and yields it as
(3, rows, W) uint8 -- the same conversion as ``engine.decode_image`` (grey broadcast to RGB,
alpha dropped, 16-bit by keeping the high byte). ``pipeline.store.pyramid.write_pyramid_rows``
turns those bands into a pyramid, so an ingest's peak memory is one row of tiles plus one
shard row per level, whatever the image's size. Anything else (JPEG, PNG, a TIFF on S3, a
planar or palette TIFF) keeps the decode-whole path (``engine.decode_image``).

GeoTIFF: the model pixel scale, tiepoint and GeoKeys become scene attributes
(``geo_attrs``): a GDAL-order ``geotransform``, the EPSG code when the keys give one, and the
ground sample distance (``gsd``, metres) when the raster is projected in metres.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
_METRE = 9001  # EPSG unit code of the metre (GeoKey ProjLinearUnits)


@dataclass(frozen=True, slots=True)
class TiledImage:
    """A TIFF read band by band (picklable: a path and the facts of its first page).

    Attributes:
        path: local file path.
        shape: (C, H, W) of the pixels ``bands`` yields (C = 3).
        segment: (rows, cols) of one tile, or of one strip (cols = W).
    """

    path: str
    shape: tuple[int, int, int]
    segment: tuple[int, int]

    def bands(self) -> Iterator[np.ndarray]:
        """(3, rows, W) uint8 bands top to bottom, one row of segments each (memory: one band
        and one segment)."""
        import tifffile

        _, h, w = self.shape
        with tifffile.TiffFile(self.path) as tif:
            page = tif.pages.first
            seg_h, seg_w = self.segment
            across = -(-w // seg_w)
            for ty in range(-(-h // seg_h)):
                rows = min(seg_h, h - ty * seg_h)
                band = np.zeros((3, rows, w), dtype=np.uint8)
                for tx in range(across):
                    tile = _decode_segment(tif, page, ty * across + tx)
                    x0 = tx * seg_w
                    cols = min(seg_w, w - x0)
                    band[:, :, x0 : x0 + cols] = tile[:, :rows, :cols]
                yield band


def _decode_segment(tif: Any, page: Any, index: int) -> np.ndarray:
    """Segment ``index`` of ``page`` decoded as (3, rows, cols) uint8 (rows, cols of the
    segment as stored, edge segments possibly padded)."""
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    if count:
        tif.filehandle.seek(offset)
        data = tif.filehandle.read(count)
    else:
        data = None  # a sparse (never written) segment: tifffile fills it with zeros
    segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
    if segment is None:
        segment = np.zeros(shape, dtype=page.dtype)
    return to_rgb_uint8(segment.reshape(segment.shape[-3:]))


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """(rows, cols, samples) uint8/uint16 -> (3, rows, cols) uint8: grey broadcast to RGB,
    a fourth (alpha) sample dropped, 16-bit by keeping the high byte (as
    ``engine.decode_image``)."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.shape[-1] == 1:
        return np.ascontiguousarray(np.broadcast_to(pixels[..., 0], (3, *pixels.shape[:2])))
    return np.ascontiguousarray(pixels[..., :3].transpose(2, 0, 1))


def open_tiled(path: str) -> tuple[TiledImage, dict[str, Any]] | None:
    """``(TiledImage, geo attributes)`` for a TIFF at local ``path`` that can be read band by
    band, or None when it cannot (the caller decodes it whole). Raises what ``tifffile``
    raises for a file that is not a TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if not _windowable(page):
            return None
        h, w = int(page.imagelength), int(page.imagewidth)
        segment = ((int(page.tilelength), int(page.tilewidth)) if page.is_tiled
                   else (int(page.rowsperstrip or h), w))
        return TiledImage(path, (3, h, w), segment), geo_attrs(page)


def _windowable(page: Any) -> bool:
    """Whether ``page`` is one interleaved image of 1, 3 or 4 samples of 8 or 16 bits, whose
    segments ``_decode_segment`` can place (no palette, no depth, no planar layout) and whose
    compression ``tifffile`` decodes here (none, deflate, LZMA; JPEG, LZW, packbits, WebP, ...
    need ``imagecodecs``, not installed: such files are decoded whole by Pillow)."""
    import tifffile

    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except (KeyError, ImportError):
        return False
    return (page.dtype in (np.uint8, np.uint16)
            and page.samplesperpixel in (1, 3, 4)
            and page.imagedepth == 1
            and page.photometric != tifffile.PHOTOMETRIC.PALETTE
            and (page.samplesperpixel == 1 or page.planarconfig == tifffile.PLANARCONFIG.CONTIG)
            and len(page.dataoffsets) > 0)


def geo_attrs(page: Any) -> dict[str, Any]:
    """GeoTIFF facts of ``page`` as JSON-ready scene attributes (empty for a plain TIFF).

    ``geotransform``: GDAL order ``[x0, dx, 0, y0, 0, -dy]`` from the model pixel scale
    (tag 33550) and the first tiepoint (33922), or the model transformation (34264);
    ``epsg``: the projected or geographic CRS code from the GeoKeys; ``gsd``: the pixel size in
    metres, only when the raster is projected and its linear unit is the metre (or unset).
    """
    tags = page.tags
    out: dict[str, Any] = {}
    scale = tags.get(33550)
    tie = tags.get(33922)
    matrix = tags.get(34264)
    if scale is not None and tie is not None:
        (sx, sy, *_), (i, j, _, x, y, *_) = scale.value, tie.value
        out["geotransform"] = [float(v) for v in (x - i * sx, sx, 0, y + j * sy, 0, -sy)]
    elif matrix is not None:
        m = [float(v) for v in matrix.value]
        out["geotransform"] = [m[3], m[0], m[1], m[7], m[4], m[5]]
    keys = (page.geotiff_tags or {}) if 34735 in tags else {}
    epsg = keys.get("ProjectedCSTypeGeoKey") or keys.get("GeographicTypeGeoKey")
    if epsg is not None and int(epsg) not in (0, 32767):
        out["epsg"] = int(epsg)
    projected = int(keys.get("GTModelTypeGeoKey", 0) or 0) == 1
    unit = keys.get("ProjLinearUnitsGeoKey")
    if projected and "geotransform" in out and (unit is None or int(unit) == _METRE):
        gt = out["geotransform"]
        out["gsd"] = float((abs(gt[1]) + abs(gt[5])) / 2)
    return out
