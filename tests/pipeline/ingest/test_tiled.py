"""Tiled TIFF sources: read band by band, the same pyramid as the decode-whole path, bounded
memory, GeoTIFF attributes kept, corrupt tiles rejected."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from pipeline.ingest.engine import (
    SceneTask,
    TiledImage,
    decode_image,
    open_image,
    read_source,
    run_ingest,
)
from pipeline.ingest.folder import load_folder_scene
from pipeline.store import pyramid, storage
from pipeline.store.pyramid import open_pyramid, write_pyramid
from pipeline.synth.large_scene import write_large_scene
from tests.pipeline.scenes import textured


def _objects(root: str, scene_id: str) -> dict[str, bytes]:
    base = storage.join_uri(root, scene_id)
    return {u[len(base):]: storage.read_bytes(u) for u in storage.list_prefix(base)}


def _ingest(path: str, dst: str, coarsest: int = 64):
    task = SceneTask("s", "train", path, "a")
    return run_ingest([task], load_folder_scene, ("a",), dst, coarsest=coarsest, out=None)


def test_a_3000_px_tiled_geotiff_gives_the_decode_whole_pyramid_byte_for_byte(tmp_path):
    path = str(tmp_path / "scene.tif")
    write_large_scene(path, 3000, tile=256, objects=8, seed=3, gsd=0.5)
    image, geo = open_image(path)
    assert isinstance(image, TiledImage) and image.shape == (3, 3000, 3000)
    report = _ingest(path, str(tmp_path / "tiled"))
    assert report.counts["written"] == 1, report.rejects
    whole = decode_image(read_source(path), path)  # Pillow decodes the whole file
    write_pyramid(str(tmp_path / "whole"), "s", whole, {}, coarsest=64)
    ours, theirs = _objects(str(tmp_path / "tiled"), "s"), _objects(str(tmp_path / "whole"), "s")
    shards = {k for k in ours if k != "/zarr.json"}
    assert len(shards) > 500 and {k: ours[k] for k in shards} == {k: theirs[k] for k in shards}
    attrs = open_pyramid(storage.join_uri(str(tmp_path / "tiled"), "s")).attrs
    assert attrs["gsd"] == 0.5 and attrs["epsg"] == 32633
    assert attrs["geotransform"] == [500000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5]
    assert report.rows[0]["gsd"] == 0.5 and report.rows[0]["height"] == 3000


@pytest.mark.parametrize("kind", ["grey16_strips", "rgba_tiles", "rgb_odd_strips"])
def test_other_tiff_layouts_match_pillows_decode(tmp_path, kind):
    rgb = textured(3, 301, 277, seed=7).transpose(1, 2, 0)
    path = str(tmp_path / f"{kind}.tif")
    if kind == "grey16_strips":
        grey = rgb[..., 0].astype(np.uint16) * 257 + np.arange(277, dtype=np.uint16)
        tifffile.imwrite(path, grey, rowsperstrip=32, photometric="minisblack")
    elif kind == "rgba_tiles":
        alpha = np.full((*rgb.shape[:2], 1), 200, np.uint8)
        tifffile.imwrite(path, np.concatenate([rgb, alpha], -1), tile=(64, 48),
                         photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
    else:
        tifffile.imwrite(path, rgb, rowsperstrip=37, photometric="rgb")
    image, geo = open_image(path)
    assert isinstance(image, TiledImage) and geo == {}
    bands = list(image.bands())
    np.testing.assert_array_equal(np.concatenate(bands, axis=1), decode_image(read_source(path), path))


def test_a_tiff_whose_compression_tifffile_cannot_decode_here_is_decoded_whole(tmp_path):
    from PIL import Image

    rgb = textured(3, 120, 90, seed=1).transpose(1, 2, 0)
    path = str(tmp_path / "lzw.tif")
    Image.fromarray(rgb).save(path, compression="tiff_lzw")
    image, geo = open_image(path)
    assert isinstance(image, np.ndarray) and geo == {}
    np.testing.assert_array_equal(image, rgb.transpose(2, 0, 1))


def _ingest_peak(tmp_path, side: int) -> int:
    """Peak bytes traced (numpy reports to tracemalloc) while ingesting a ``side`` px TIFF."""
    path = str(tmp_path / f"big{side}.tif")
    write_large_scene(path, side, tile=256)
    tracemalloc.start()
    try:
        report = _ingest(path, str(tmp_path / f"out{side}"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.counts["written"] == 1, report.rejects
    return peak


def test_ingest_memory_stays_far_below_the_image_and_grows_with_the_width_only(tmp_path):
    small, big = _ingest_peak(tmp_path, 2048), _ingest_peak(tmp_path, 4096)
    raw = 3 * 4096 * 4096  # 50 MB: holding it whole (or level 1, 12.6 MB) breaks the bound
    # a row of tiles (3 MB), its uint16 downsampling temporaries (3 MB), shard rows
    assert big < raw / 4, f"peak {big / 1e6:.1f} MB for a {raw / 1e6:.0f} MB image"
    # 4x the pixels, 2x the width: memory follows the width (bands), not the area
    assert big < 2.6 * small, f"peak {small / 1e6:.1f} MB at 2048 px, {big / 1e6:.1f} at 4096"


def test_write_pyramid_rows_from_bands_of_any_height_equals_the_whole_array(tmp_path):
    img = textured(3, 203, 150, seed=11)
    write_pyramid(str(tmp_path / "whole"), "s", img, {"k": 1}, coarsest=20, chunk=8, shard=24)
    cuts = [0, 1, 30, 31, 90, 150, 203]
    bands = (img[:, a:b] for a, b in zip(cuts, cuts[1:], strict=False))
    pyramid.write_pyramid_rows(str(tmp_path / "rows"), "s", img.shape, bands, {"k": 1},
                               coarsest=20, chunk=8, shard=24)
    assert _objects(str(tmp_path / "rows"), "s") == _objects(str(tmp_path / "whole"), "s")


def test_too_few_rows_fail_and_leave_the_scene_incomplete(tmp_path):
    img = textured(3, 100, 60, seed=2)
    with pytest.raises(ValueError, match="bands held 64 rows, expected 100"):
        pyramid.write_pyramid_rows(str(tmp_path), "s", img.shape, [img[:, :64]], {},
                                   coarsest=20, chunk=8, shard=16)
    assert not pyramid.pyramid_complete(str(tmp_path), "s")


def test_a_corrupt_tile_is_rejected_as_unreadable_and_the_run_goes_on(tmp_path):
    path = str(tmp_path / "bad.tif")
    write_large_scene(path, 600, tile=128)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[7]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 16)
    report = _ingest(path, str(tmp_path / "out"))
    assert report.counts["rejected"] == 1
    reject = report.rejects[0]
    assert reject["kind"] == "unreadable_image" and path in reject["reason"]
    assert not pyramid.pyramid_complete(str(tmp_path / "out"), "s")
