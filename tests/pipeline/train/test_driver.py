"""The driver's private Ray: it listens on loopback only, and its token file is 0600."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from tests.sockets import is_loopback, listening, process_tree


def test_listening_sees_a_socket_on_every_interface():
    """The check itself: a socket bound to 0.0.0.0 is found and is not loopback."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        found = [x for x in listening([os.getpid()]) if x[3] == port]
    assert found == [(os.getpid(), "tcp", "0.0.0.0", port)]
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and is_loopback("::ffff:127.0.0.1")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")
@pytest.mark.ray
def test_private_ray_listens_on_loopback_only_and_its_token_file_is_0600(monkeypatch):
    """Every port of the processes ``start_ray`` starts (GCS, raylet, agents, metrics, driver,
    a worker) is bound to loopback, and the token file Ray uses is readable by its owner only.

    Ray decides its default node address when it is first imported: a driver that imports
    ``ray.train`` before ``start_ray`` runs got the machine's address (and a metrics port on
    every interface). That is simulated here; on a machine with no interface but loopback the
    first assertion cannot tell.
    """
    import ray
    from ray._private import ray_constants

    from pipeline.train.driver import start_ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                 "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "")  # recorded: what start_ray sets is undone afterwards
        monkeypatch.delenv(name)
    temp_dir = tempfile.mkdtemp(prefix="r13-", dir="/tmp")  # Ray's socket paths stay < 107 bytes
    started = False
    try:
        started = start_ray(temp_dir=temp_dir, num_cpus=1)
        assert started

        @ray.remote(num_cpus=1)
        def worker_pid() -> int:
            return os.getpid()

        worker = ray.get(worker_pid.remote())
        tree = process_tree(os.getpid())
        assert worker in tree
        sockets = listening(tree)
        assert len({pid for pid, *_ in sockets}) >= 4, sockets  # GCS, raylet, agents, driver
        exposed = [(*s, Path(f"/proc/{s[0]}/comm").read_text().strip()) for s in sockets
                   if not is_loopback(s[2])]
        assert exposed == [], "\n".join(map(str, exposed))
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        assert os.environ.get("RAY_AUTH_MODE") == "token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, token
        assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0, token.parent
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_second_private_instance_gets_a_fresh_token_when_the_first_ones_folder_is_gone(
        tmp_path, monkeypatch):
    """A token this process wrote for an earlier instance is not reused: its folder may have
    been deleted (a test's temp dir), and Ray's GCS then never starts. A path the user set is
    left alone."""
    import shutil

    from pipeline.train import driver

    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(driver, "_reload_ray_auth", lambda: None)
    first = driver.private_token(tmp_path / "a")
    shutil.rmtree(first.parent)
    second = driver.private_token(tmp_path / "b")
    assert second is not None and second != first and second.exists()
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(second)
    user = tmp_path / "mine"
    user.write_text("x" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(user))
    assert driver.private_token(tmp_path / "c") is None


def test_a_local_start_that_times_out_is_cleaned_up_and_started_again():
    """Ray's node gets a hard-coded 30 s to register; the first start that misses it leaves
    its processes behind: they are killed and the start is tried again. Other errors, and a
    last attempt that times out too, are raised."""
    import subprocess

    from pipeline.train.driver import RAY_START_TIMEOUT, child_pids, init_local

    class FakeRay:
        def __init__(self, failures, error=RAY_START_TIMEOUT):
            self.failures, self.error, self.calls, self.left = failures, error, [], []

        def init(self, **kwargs):
            self.calls.append(kwargs)
            if len(self.calls) <= self.failures:
                self.left.append(subprocess.Popen(["sleep", "60"]))  # a GCS left behind
                raise Exception(f"The current node {self.error}. This could happen ...")

        def shutdown(self):
            pass

    ray = FakeRay(failures=1)
    init_local(ray, {"address": "local"})
    assert ray.calls == [{"address": "local"}] * 2
    assert ray.left[0].poll() is not None, "the failed start's process was not stopped"
    assert ray.left[0].pid not in child_pids()

    for fake in (FakeRay(failures=3), FakeRay(failures=1, error="failed to bind a port")):
        with pytest.raises(Exception, match="timed out during startup|failed to bind"):
            init_local(fake, {}, attempts=3)
        assert len(fake.calls) == min(fake.failures, 3)
        for proc in fake.left:
            proc.kill()
            proc.wait()
