"""A loopback HTTP proxy in front of an S3 endpoint: counts requests, can add latency.

Used by the tests (the S3 server's own request count, to compare with the reader's counters:
moto keeps no request log) and by ``bench/train_throughput.py`` (about 20 ms of added latency
per request, like a real object store). Point a client's endpoint (``AWS_ENDPOINT_URL``) at
``proxy.endpoint`` instead of the server's. It binds 127.0.0.1 only and forwards every request
unchanged (path, query, headers including ``Host``, body), so request signatures, which the
client computed for the proxy's address, reach the server as they were signed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

COUNTS_PATH = "/__proxy__/counts"  # answered by the proxy itself (JSON counters), not forwarded
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length"}


class _Server(ThreadingHTTPServer):
    """The standard threading server with a listen backlog of 1024 instead of 5: a client that
    opens many connections at once (a reader with 64 requests in flight) would otherwise see
    dropped SYNs and stall about a second on retransmits, which the benches would count as
    latency of the store."""

    request_queue_size = 1024
    daemon_threads = True


class CountingProxy:
    """``CountingProxy(upstream, latency_s).start()``; ``counts()`` by method; ``stop()``.

    Args:
        upstream: ``http://host:port`` of the real endpoint.
        latency_s: seconds slept before forwarding each request (added latency, per request).
    """

    def __init__(self, upstream: str, latency_s: float = 0.0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.latency_s = latency_s
        self._counts: Counter[str] = Counter()
        self._bytes = self._ok_bytes = 0
        self._in_flight = self._most_in_flight = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def counts(self) -> dict[str, int]:
        """Requests forwarded so far, by HTTP method, plus ``total``."""
        with self._lock:
            return {**self._counts, "total": sum(self._counts.values())}

    def response_bytes(self, *, ok_only: bool = False) -> int:
        """Body bytes returned to clients so far (``ok_only``: of 2xx answers only, not the
        error documents of 404s)."""
        with self._lock:
            return self._ok_bytes if ok_only else self._bytes

    def most_in_flight(self) -> int:
        """The most requests the proxy held at once (waiting out the latency or upstream)."""
        with self._lock:
            return self._most_in_flight

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._bytes = self._ok_bytes = 0
            self._most_in_flight = self._in_flight

    def _enter(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self._most_in_flight = max(self._most_in_flight, self._in_flight)

    def _record(self, method: str, nbytes: int, status: int) -> None:
        with self._lock:
            self._counts[method] += 1
            self._bytes += nbytes
            self._ok_bytes += nbytes if 200 <= status < 300 else 0

    def start(self, port: int = 0) -> CountingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self) -> None:
                body = self._body()
                if self.path == COUNTS_PATH:  # the proxy's own counters, for other processes
                    data = json.dumps({**proxy.counts(), "bytes": proxy.response_bytes()}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                proxy._enter(1)
                try:
                    self._relay(body)
                finally:
                    proxy._enter(-1)

            def _relay(self, body: bytes) -> None:
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                conn = proxy._local  # one upstream connection per client connection (thread)
                upstream = getattr(conn, "c", None)
                if upstream is None:
                    upstream = conn.c = http.client.HTTPConnection(
                        proxy.upstream_host, proxy.upstream_port, timeout=60
                    )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    upstream.close()
                    conn.c = None
                    raise
                proxy._record(self.command, len(data), response.status)
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = _Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> CountingProxy:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.http_proxy UPSTREAM [--latency-ms 20] [--port P]``: run in its own
    process (so that it does not share a GIL with what it measures); prints its endpoint."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = CountingProxy(args.upstream, latency_s=args.latency_ms / 1000).start(args.port)
    print(proxy.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
