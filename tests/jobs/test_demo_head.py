"""``jobs/demo.py``'s Ray head: loopback only, with a token file only its owner can read."""

from __future__ import annotations

import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs import demo
from pipeline.train.driver import write_token_file
from tests.sockets import is_loopback, listening, process_tree


def _status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_write_token_file_is_private_from_the_start(tmp_path):
    token = write_token_file(tmp_path)
    assert token.parent.parent == tmp_path and len(token.read_text()) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert write_token_file(tmp_path).read_text() != token.read_text()


def _once_the_raylet_listens(pid: int, timeout_s: float = 120) -> list:
    """``listening`` of the head's process tree once its raylet listens (the dashboard, which
    ``start_head`` waits for, can answer first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sockets = listening(process_tree(pid))
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p, *_ in sockets}
        if "raylet" in names or time.monotonic() > deadline:
            return sockets
        time.sleep(1)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")
@pytest.mark.ray
def test_demo_head_listens_on_loopback_only_and_uses_its_0600_token():
    work = Path(tempfile.mkdtemp(prefix="r13d-", dir="/tmp"))  # Ray's socket paths < 107 bytes
    token = write_token_file(work)
    head = None
    try:
        head, address = demo.start_head(work / "t", demo.ray_env(token))
        sockets = _once_the_raylet_listens(head.pid)
        assert len({pid for pid, *_ in sockets}) >= 3, sockets  # GCS, raylet, dashboard, agents
        exposed = [s for s in sockets if not is_loopback(s[2])]
        assert exposed == [], exposed
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # the head checks requests against this file's token, not Ray's shared default one
        assert _status(f"{address}/api/version", None) == 401
        assert _status(f"{address}/api/version", "0" * 64) in (401, 403)
        assert _status(f"{address}/api/version", token.read_text()) == 200
    finally:
        if head is not None:
            demo.stop_head(head)
        shutil.rmtree(work, ignore_errors=True)
