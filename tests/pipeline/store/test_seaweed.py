"""SeaweedFS (``pipeline.store.seaweed``) as a loopback S3 server: it listens on 127.0.0.1 only,
serves writes and range reads through ``pipeline.store.storage``, and ``stop()`` leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import obstore
import pytest

from pipeline.store import storage
from pipeline.store.seaweed import listening_addresses, start_seaweed
from tests.s3 import SeaweedS3Server, seaweed_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.s3


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group ``pgid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            out.append(int(stat.parent.name))
    return out


def test_listens_on_loopback_only_on_the_ports_it_was_given(seaweed_server: SeaweedS3Server):  # noqa: F811
    server = seaweed_server.server
    addresses = listening_addresses(server.pid)
    assert addresses, "weed holds no listening socket"
    assert {host for host, _ in addresses} == {"127.0.0.1"}, addresses
    assert {port for _, port in addresses} == set(server.ports.values())
    assert server.endpoint == f"http://127.0.0.1:{server.ports['s3']}"


def test_write_list_and_range_read_through_storage(seaweed_server: SeaweedS3Server):  # noqa: F811
    assert os.environ["AWS_ENDPOINT_URL"] == seaweed_server.endpoint
    bucket = seaweed_server.new_bucket("sw")
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.write_bytes(f"{bucket}/a/obj.bin", data)
    assert storage.read_bytes(f"{bucket}/a/obj.bin") == data
    assert storage.exists(f"{bucket}/a/obj.bin") and not storage.exists(f"{bucket}/a/nope")
    assert storage.list_prefix(f"{bucket}/a") == [f"{bucket}/a/obj.bin"]
    store = storage._s3_store(bucket.removeprefix("s3://"), "")
    assert obstore.get_range(store, "a/obj.bin", start=1000, end=1100).to_bytes() == data[1000:1100]
    ranges = obstore.get_ranges(store, "a/obj.bin", starts=[0, 500_000], ends=[10, 500_020])
    assert [r.to_bytes() for r in ranges] == [data[0:10], data[500_000:500_020]]
    storage.delete_prefix(f"{bucket}/a")
    assert storage.list_prefix(f"{bucket}/a") == []


def test_an_invalid_bucket_name_fails_at_once(seaweed_server: SeaweedS3Server):  # noqa: F811
    with pytest.raises(ValueError, match="refuses bucket name 'ab'"):
        seaweed_server.server.make_bucket("ab")


def test_start_with_buckets_then_stop_leaves_no_process(tmp_path):
    server = start_seaweed(tmp_path / "sw", access_key="ak-test", secret_key="sk-test",
                           buckets=("made-at-start",), log_path=tmp_path / "weed.log")
    try:
        assert _group_members(server.pid) == [server.pid]
        store = obstore.store.S3Store("made-at-start", endpoint=server.endpoint,
                                      access_key_id="ak-test", secret_access_key="sk-test",
                                      region="us-east-1", client_options={"allow_http": True})
        obstore.put(store, "k", b"v")
        assert obstore.get(store, "k").bytes().to_bytes() == b"v"
        wrong = obstore.store.S3Store("made-at-start", endpoint=server.endpoint,
                                      access_key_id="ak-test", secret_access_key="wrong",
                                      region="us-east-1", client_options={"allow_http": True})
        with pytest.raises(Exception, match="(?i)signature|denied|403"):
            obstore.get(wrong, "k").bytes()
    finally:
        server.stop(timeout_s=0)  # the kill the test session uses (a 2 s grace also ends in it)
    assert _group_members(server.pid) == []
    assert not Path(f"/proc/{server.pid}").exists()
    assert not [p for port in server.ports.values() for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]
    assert (tmp_path / "weed.log").stat().st_size > 0
    server.stop()  # idempotent
