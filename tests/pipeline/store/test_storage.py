"""Storage by URI: the same behaviour on files, memory and S3 (``tests/s3.py``: SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import zarr

from pipeline.store import storage
from pipeline.store.storage import join_uri, parse_uri


def test_parse_uri_table(tmp_path):
    assert parse_uri("s3://bucket/a/b/") == storage.ParsedUri("s3", "bucket", "a/b")
    assert parse_uri("s3://bucket") == storage.ParsedUri("s3", "bucket", "")
    assert parse_uri("memory://m/x") == storage.ParsedUri("memory", "m", "x")
    assert parse_uri(f"file://{tmp_path}/d") == storage.ParsedUri("file", f"{tmp_path}/d", "")
    assert parse_uri(str(tmp_path)) == storage.ParsedUri("file", str(tmp_path), "")
    with pytest.raises(ValueError, match="unsupported storage scheme 'gs'"):
        parse_uri("gs://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        parse_uri("s3:///x")


def test_join_uri_table():
    assert join_uri("s3://b", "x", "y.json") == "s3://b/x/y.json"
    assert join_uri("s3://b/", "/x/") == "s3://b/x"
    assert join_uri("/data/pyr", "scene") == "/data/pyr/scene"
    assert join_uri("/", "scene") == "/scene"
    assert join_uri("memory://m") == "memory://m"


def test_s3_options_follow_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert storage.s3_options_from_env() == {
        "endpoint": "http://127.0.0.1:9",
        "region": "eu-west-1",
        "access_key_id": "k",
        "secret_access_key": "s",
        "client_options": {"allow_http": True, "timeout": timedelta(seconds=20),
                           "connect_timeout": timedelta(seconds=5)},
        "retry_config": storage.OBJECT_RETRY,
    }
    assert storage.OBJECT_RETRY["max_retries"] == storage.OBJECT_MAX_RETRIES


def test_whole_objects_round_trip(store_root):
    a, b = join_uri(store_root, "dir", "a.json"), join_uri(store_root, "dir", "sub", "b.bin")
    assert not storage.exists(a)
    assert storage.list_prefix(store_root) == []
    storage.write_bytes(a, b'{"x": 1}')
    storage.write_bytes(b, bytes(range(256)))
    assert storage.exists(a) and storage.exists(b)
    assert storage.read_bytes(a) == b'{"x": 1}'
    assert storage.read_bytes(b) == bytes(range(256))
    listed = storage.list_prefix(join_uri(store_root, "dir"))
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["a.json", "b.bin"]
    assert listed == [a, b]
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(join_uri(store_root, "missing.bin"))
    storage.delete_prefix(join_uri(store_root, "dir"))
    assert storage.list_prefix(store_root) == []


def test_prefix_listing_is_by_path_segment(store_root):
    storage.write_bytes(join_uri(store_root, "ab", "x"), b"1")
    storage.write_bytes(join_uri(store_root, "a", "y"), b"2")
    assert storage.list_prefix(join_uri(store_root, "a")) == [join_uri(store_root, "a", "y")]


def test_zarr_store_round_trip_and_read_only(store_root):
    data = np.arange(3 * 40 * 50, dtype=np.uint8).reshape(3, 40, 50)
    store = storage.open_store(join_uri(store_root, "g"), read_only=False)
    group = zarr.open_group(store, mode="w", zarr_format=3)
    group.create_array("a", data=data, chunks=(3, 16, 16))
    again = zarr.open_group(storage.open_store(join_uri(store_root, "g"), read_only=True),
                            mode="r", zarr_format=3)
    np.testing.assert_array_equal(again["a"][:], data)
    ro = storage.open_store(join_uri(store_root, "g"), read_only=True)
    with pytest.raises(ValueError):
        zarr.open_group(ro, mode="r", zarr_format=3)["a"][:] = 0
    # the zarr keys are plain objects under the URI, visible to the whole-object helpers
    assert join_uri(store_root, "g", "a", "zarr.json") in storage.list_prefix(store_root)
