"""The pyramid format: levels equal the in-memory pyramid, plain zarr reads it, complete last."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import zarr

from models.memory import build_pyramid
from models.memory import downsample2x as torch_downsample2x
from pipeline.store import pyramid, storage
from pipeline.store.pyramid import open_pyramid, pyramid_complete, write_pyramid
from pipeline.store.storage import join_uri
from tests.pipeline.scenes import textured


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 7, 9), (1, 1, 5), (3, 33, 2), (2, 1, 1)])
def test_downsample2x_equals_the_torch_reference(shape):
    img = textured(*shape, seed=sum(shape))
    ours = pyramid.downsample2x(img)
    np.testing.assert_array_equal(ours, torch_downsample2x(torch.from_numpy(img)).numpy())


def test_downsample2x_across_bands(monkeypatch):
    monkeypatch.setattr(pyramid, "_BAND_ROWS", 4)
    img = textured(3, 23, 17, seed=5)
    np.testing.assert_array_equal(
        pyramid.downsample2x(img), torch_downsample2x(torch.from_numpy(img)).numpy()
    )


def test_pyramid_shapes_table():
    assert pyramid.pyramid_shapes(1000, 300, 256) == [(1000, 300), (500, 150), (250, 75)]
    assert pyramid.pyramid_shapes(256, 100, 256) == [(256, 100)]
    assert pyramid.pyramid_shapes(257, 1, 256) == [(257, 1), (129, 1)]


def test_write_then_plain_zarr_reads_every_level(store_root):
    img = textured(3, 301, 517, seed=1)
    attrs = {"label": "airport", "source": "s3://raw/x.jpg", "boxes": [[10, 20, 30, 40]],
             "gsd": 0.5, "timestamp": "2017-01-02T03:04:05Z"}
    uri = write_pyramid(store_root, "scene-1", img, attrs, coarsest=64, chunk=16, shard=64)
    assert uri == join_uri(store_root, "scene-1")
    expected = build_pyramid(torch.from_numpy(img), coarsest=64)
    group = zarr.open_group(storage.open_store(uri, read_only=True), mode="r", zarr_format=3)
    assert sorted(group.array_keys()) == [str(i) for i in range(len(expected))]
    for i, level in enumerate(expected):
        array = group[str(i)]
        assert array.dtype == np.uint8
        assert array.metadata.dimension_names == ("c", "y", "x")
        assert array.chunks == (3, 16, 16) and array.shards == (3, 64, 64)
        np.testing.assert_array_equal(array[:], level.numpy())
    assert group.attrs["scene"] == attrs
    assert pyramid_complete(store_root, "scene-1")
    info = open_pyramid(uri)
    assert info.level_shapes == tuple(tuple(lv.shape) for lv in expected)
    assert (info.chunk_shape, info.shard_shape, info.complete) == ((3, 16, 16), (3, 64, 64), True)
    assert info.attrs == attrs


def test_ome_zarr_0_5_multiscales_metadata(tmp_path):
    uri = write_pyramid(str(tmp_path), "s", textured(3, 100, 70), {}, coarsest=20, chunk=8,
                        shard=32)
    ome = zarr.open_group(uri, mode="r", zarr_format=3).attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["channel", "space", "space"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    scales = [d["coordinateTransformations"][0] for d in ms["datasets"]]
    assert scales == [{"type": "scale", "scale": [1.0, f, f]} for f in (1.0, 2.0, 4.0, 8.0)]
    shifts = [d["coordinateTransformations"][1]["translation"] for d in ms["datasets"]]
    assert shifts == [[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 1.5, 1.5], [0.0, 3.5, 3.5]]


@pytest.mark.parametrize("shard", [32, 24, 40])  # 4, 3 and 5 chunks a side: Morton order
def test_shards_are_byte_identical_to_zarrs_own_write(shard):  # with and without skipped codes
    img = textured(3, 75, 131, seed=3)  # partial edge chunks, partial shards, empty chunks
    img[:, :shard, shard : 2 * shard] = 0  # one all-zero shard: zarr writes no object for it
    ours = write_pyramid(f"memory://bytes-ours-{shard}", "s", img, {}, coarsest=1000, chunk=8,
                         shard=shard)
    ref_store = storage.open_store(f"memory://bytes-ref-{shard}/s", read_only=False)
    group = zarr.open_group(ref_store, mode="w", zarr_format=3)
    from zarr.codecs import ZstdCodec

    shards = {"shape": (3, shard, shard), "index_location": pyramid.INDEX_LOCATION}
    group.create_array("0", data=img, chunks=(3, 8, 8), shards=shards, fill_value=0,
                       compressors=ZstdCodec(level=pyramid.ZSTD_LEVEL,
                                             checksum=pyramid.ZSTD_CHECKSUM),
                       dimension_names=("c", "y", "x"))
    ref = {u.split("/s/", 1)[1]: storage.read_bytes(u)
           for u in storage.list_prefix(f"memory://bytes-ref-{shard}/s/0/c")}
    got = {u.split("/s/", 1)[1]: storage.read_bytes(u) for u in storage.list_prefix(ours + "/0/c")}
    stored = [img[:, y : y + shard, x : x + shard].any()
              for y in range(0, 75, shard) for x in range(0, 131, shard)]
    assert sorted(got) == sorted(ref) and len(ref) == sum(stored) < len(stored)  # no all-zero
    assert got == ref


def test_morton_order_is_zarrs_z_order_of_the_chunk_grid():
    assert pyramid.morton_order(1) == ((0, 0),)
    assert pyramid.morton_order(2) == ((0, 0), (1, 0), (0, 1), (1, 1))  # y's bit below x's
    assert pyramid.morton_order(3) == ((0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1), (0, 2),
                                       (1, 2), (2, 2))  # codes outside the 3 x 3 grid skipped
    for n in (4, 5, 8, 13):
        order = pyramid.morton_order(n)
        assert sorted(order) == [(y, x) for y in range(n) for x in range(n)]


def test_writing_from_inside_a_running_event_loop(tmp_path):
    """An async caller (a notebook, an async job) can write: the store calls get their own
    loop in a helper thread instead of nesting ``asyncio.run``."""
    import asyncio

    img = textured(3, 70, 50, seed=5)

    async def write() -> str:
        return write_pyramid(str(tmp_path), "s", img, {}, coarsest=20, chunk=8, shard=16)

    uri = asyncio.run(write())
    assert pyramid_complete(str(tmp_path), "s")
    np.testing.assert_array_equal(zarr.open_group(uri, mode="r", zarr_format=3)["0"][:], img)


def test_crash_leaves_incomplete_and_rewrite_is_clean_and_identical(tmp_path, monkeypatch):
    img = textured(3, 200, 150, seed=4)
    root = str(tmp_path / "root")
    write_pyramid(root, "s", textured(3, 300, 300, seed=9), {"old": True}, coarsest=50,
                  chunk=16, shard=32)
    assert pyramid_complete(root, "s")
    real = pyramid._write_shards

    def crash_on_level_1(store, path, *args):
        if path == "1":
            raise OSError("disk full")
        return real(store, path, *args)

    monkeypatch.setattr(pyramid, "_write_shards", crash_on_level_1)
    with pytest.raises(OSError, match="disk full"):
        write_pyramid(root, "s", img, {"new": True}, coarsest=50, chunk=16, shard=32)
    assert not pyramid_complete(root, "s")
    assert not open_pyramid(join_uri(root, "s")).complete
    monkeypatch.setattr(pyramid, "_write_shards", real)
    write_pyramid(root, "s", img, {"new": True}, coarsest=50, chunk=16, shard=32)
    clean = str(tmp_path / "clean")
    write_pyramid(clean, "s", img, {"new": True}, coarsest=50, chunk=16, shard=32)
    assert pyramid_complete(root, "s")

    def objects(r):
        base = join_uri(r, "s")
        return {u[len(base):]: storage.read_bytes(u) for u in storage.list_prefix(base)}

    assert objects(root) == objects(clean)  # no stale shard of the bigger old scene


def test_every_level_records_its_empty_shards_and_stores_only_the_others(tmp_path):
    img = textured(3, 200, 150, seed=3)  # zero in rows 0-65, columns 0-36
    uri = write_pyramid(str(tmp_path), "s", img, {}, coarsest=40, chunk=16, shard=32)
    group = zarr.open_group(storage.open_store(uri, read_only=True), mode="r", zarr_format=3)
    level, stored = img, set(storage.list_prefix(uri))
    for index in range(open_pyramid(uri).num_levels):
        if index:
            level = pyramid.downsample2x(level)
        gy, gx = -(-level.shape[1] // 32), -(-level.shape[2] // 32)
        expected = {(sy, sx) for sy in range(gy) for sx in range(gx)
                    if not level[:, sy * 32 : sy * 32 + 32, sx * 32 : sx * 32 + 32].any()}
        record = group[str(index)].attrs["pipeline"]["empty_shards"]
        assert pyramid.decode_empty_shards(record, (gy, gx), "here") == expected
        for sy in range(gy):
            for sx in range(gx):
                key = join_uri(uri, str(index), "c", "0", str(sy), str(sx))
                assert (key in stored) == ((sy, sx) not in expected)
    assert pyramid.decode_empty_shards(group["0"].attrs["pipeline"]["empty_shards"], (7, 5),
                                       "here") == {(0, 0), (1, 0)}


def test_empty_shard_record_round_trip_and_rejects_a_wrong_grid():
    empty = np.zeros((3, 11), dtype=bool)
    empty[0, 0] = empty[2, 10] = empty[1, 7] = True
    record = pyramid.encode_empty_shards(empty)
    assert record == {"grid": [3, 11], "bits": "8000200080"}  # bits 0, 18, 32
    assert pyramid.decode_empty_shards(record, (3, 11), "x") == {(0, 0), (1, 7), (2, 10)}
    with pytest.raises(ValueError, match="scene s level 2: empty-shard record .* grid"):
        pyramid.decode_empty_shards(record, (3, 12), "scene s level 2")
    with pytest.raises(ValueError, match="scene s level 2: empty-shard record"):
        pyramid.decode_empty_shards({"grid": [3, 11], "bits": "zz"}, (3, 11), "scene s level 2")


def test_a_pyramid_of_an_older_format_counts_as_incomplete(tmp_path):
    """Format 1 had no empty-shard record, format 2 no chunk checksums: the ingest rewrites such
    a scene, not skips it."""
    uri = write_pyramid(str(tmp_path), "s", textured(3, 40, 40), {}, coarsest=40)
    assert pyramid_complete(str(tmp_path), "s")
    meta = join_uri(uri, "zarr.json")
    current = storage.read_bytes(meta)
    assert b'"format": 3' in current
    for older in (b'"format": 2', b'"format": 1'):
        storage.write_bytes(meta, current.replace(b'"format": 3', older))
        assert not pyramid_complete(str(tmp_path), "s")
    assert open_pyramid(uri).complete  # still readable (see the reader's rule for old scenes)


def test_missing_scene_is_not_complete(tmp_path):
    assert not pyramid_complete(str(tmp_path), "nothing")
    with pytest.raises(FileNotFoundError, match="nothing"):
        open_pyramid(join_uri(str(tmp_path), "nothing"))


@pytest.mark.parametrize("bad", [np.zeros((3, 0, 5), np.uint8), np.zeros((3, 4, 4), np.float32),
                                 np.zeros((4, 4), np.uint8)])
def test_bad_images_are_rejected_with_the_scene_named(tmp_path, bad):
    with pytest.raises(ValueError, match="scene 'bad-one'"):
        write_pyramid(str(tmp_path), "bad-one", bad, {})
    assert not pyramid_complete(str(tmp_path), "bad-one")


def test_write_memory_stays_near_one_copy_of_the_image(tmp_path, monkeypatch):
    # a 9,000 px scene spans 18 bands of 512 rows; scale the band to this smaller image
    monkeypatch.setattr(pyramid, "_BAND_ROWS", 96)
    img = textured(3, 1536, 2048, seed=2)  # 9.4 MB
    tracemalloc.start()
    try:
        write_pyramid(str(tmp_path), "big", img, {}, chunk=16, shard=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # level 1 (0.25x) + one band of uint16 temporaries + one band of encoded shards
    assert peak < 1.0 * img.nbytes, f"peak {peak / 1e6:.1f} MB for a {img.nbytes / 1e6:.1f} MB image"
