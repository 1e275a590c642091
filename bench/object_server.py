"""A small S3-compatible object server for benchmarks: GET (whole, ``bytes=a-b``, ``bytes=a-``,
``bytes=-n``) and HEAD of path-style ``/bucket/key`` objects stored as files under ``--root``
(``ROOT/bucket/key``), each answered after ``--latency-ms`` of added latency.

    python bench/object_server.py --root DIR [--latency-ms 20] [--port 0]   # prints its endpoint

Why it exists: moto's server, which the tests use, spends about 6 ms of CPU per request; on a
2-core machine it then competes with the training loop it serves and caps a benchmark at about
150 requests/s, which measures moto, not the data path. This server spends a fraction of a
millisecond per request (one asyncio loop, files read with ``os.pread``), so the benchmark sees
what a remote object store looks like from the client: the added latency and the client's own
CPU. It accepts any signature (as moto does by default), answers unknown keys with S3's
``NoSuchKey`` 404, and serves ``bench.http_proxy.COUNTS_PATH`` with its request counters.
Loopback only; read-only (objects are put there as files). Not for anything but benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bench.http_proxy import COUNTS_PATH

ROOT = Path(__file__).resolve().parents[1]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a ``Range: bytes=...`` header for an object of ``size`` bytes; None
    for no header. Raises ``ValueError`` for a range it cannot satisfy (answered with 416)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError(f"unsupported range {header!r}")
    first, _, last = spec.strip().partition("-")
    if first == "":
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= end:
        raise ValueError(f"range {header!r} outside an object of {size} bytes")
    return start, end


class ObjectServer:
    """The asyncio server; ``counts`` holds requests by method and response body bytes."""

    def __init__(self, root: Path, latency_s: float):
        self.root, self.latency_s = root.resolve(), latency_s
        self.counts: Counter[str] = Counter()

    def _path(self, target: str) -> Path | None:
        path = (self.root / unquote(urlsplit(target).path).lstrip("/")).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def respond(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request."""
        if target == COUNTS_PATH:
            body = json.dumps({**self.counts, "total": sum(self.counts[m] for m in ("GET", "HEAD"))})
            return 200, {"Content-Type": "application/json"}, body.encode()
        self.counts[method] += 1
        if method not in ("GET", "HEAD"):
            return 405, {}, b""
        path = self._path(target)
        if path is None:
            body = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
            return 404, {"Content-Type": "application/xml"}, body
        stat = path.stat()
        meta = {"Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
                "ETag": '"' + hashlib.md5(f"{stat.st_mtime_ns}-{stat.st_size}".encode()).hexdigest() + '"',
                "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        try:
            span = parse_range(headers.get("range"), stat.st_size)
        except ValueError:
            return 416, {"Content-Range": f"bytes */{stat.st_size}"}, b""
        start, end = span or (0, stat.st_size)
        if span is not None:
            meta["Content-Range"] = f"bytes {start}-{end - 1}/{stat.st_size}"
        status = 206 if span is not None else 200
        if method == "HEAD":
            return status, {**meta, "Content-Length": str(end - start)}, b""
        fd = os.open(path, os.O_RDONLY)
        try:
            body = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        self.counts["bytes"] += len(body)
        return status, meta, body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one keep-alive connection."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                if self.latency_s and target != COUNTS_PATH:
                    await asyncio.sleep(self.latency_s)
                status, out, body = self.respond(method, target, headers)
                out.setdefault("Content-Length", str(len(body)))
                writer.write((f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in out.items())
                              + "\r\n").encode("latin-1") + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(root: Path, latency_s: float, port: int) -> None:
    server = ObjectServer(root, latency_s)
    tcp = await asyncio.start_server(server.handle, "127.0.0.1", port, limit=1 << 20)
    print(f"http://127.0.0.1:{tcp.sockets[0].getsockname()[1]}", flush=True)
    async with tcp:
        await tcp.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="directory holding bucket/key files")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.root, args.latency_ms / 1000, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
