"""A loopback HTTP proxy in front of an S3 endpoint: counts requests, can add latency and faults.

Used by the tests (the S3 server's own request count, to compare with the reader's counters)
and by ``bench/train_throughput.py`` and ``bench/read_amplification.py`` (about 20 ms of added
latency per request, like a remote object store). Point a client's endpoint
(``AWS_ENDPOINT_URL``) at ``proxy.endpoint`` instead of the server's. It binds 127.0.0.1 only
and forwards every request unchanged (request line, headers including ``Host``, body), so
request signatures, which the client computed for the proxy's address, reach the server as
they were signed.

It runs on one asyncio event loop in a thread of its own (``python -m bench.http_proxy``: a
process of its own): the added latency is an ``asyncio.sleep``, not a blocked thread, so the
proxy costs the machine about 0.35 ms of CPU per request, where a thread-per-connection
server cost ~0.9 ms and took that CPU from the training loop it was measuring.

Faults: ``CountingProxy(upstream, faults=[FaultRule("503", 0.05), FaultRule("stall", 0.003),
FaultRule("404", 1.0, match="/c/0/3/")], seed=0)``. Each GET or HEAD whose path contains
``match`` (every one when None) meets the first rule whose seeded draw falls under its
``fraction``: ``"500"`` / ``"503"`` answer that status with an S3 error document (the
connection stays open), ``"404"`` answers ``NoSuchKey``, ``"reset"`` aborts the connection
(TCP RST, no answer), ``"stall"`` holds the request without an answer for ``stall_s`` (default
an hour: past any client timeout), then closes. ``faults()`` counts what was injected, by
kind. From the command line: ``--fault KIND:FRACTION[:MATCH]`` (repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

COUNTS_PATH = "/__proxy__/counts"  # answered by the proxy itself (JSON counters), not forwarded
FAULT_KINDS = ("500", "503", "404", "reset", "stall")
_REASONS = {"500": "Internal Server Error", "503": "Slow Down", "404": "Not Found"}
_CODES = {"500": "InternalError", "503": "SlowDown", "404": "NoSuchKey"}


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Inject ``kind`` (one of ``FAULT_KINDS``) into a ``fraction`` of the GET / HEAD requests
    whose path contains ``match`` (all when None), at most ``limit`` times (None: no limit);
    a ``"stall"`` holds its request for ``stall_s`` seconds without answering."""

    kind: str
    fraction: float
    match: str | None = None
    stall_s: float = 3600.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"FaultRule({self.kind!r}, {self.fraction}): kind must be one of "
                             f"{FAULT_KINDS} and fraction in [0, 1]")

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        """``KIND:FRACTION[:MATCH]`` (the command line's ``--fault``)."""
        kind, fraction, *match = text.split(":", 2)
        return cls(kind, float(fraction), match[0] if match else None)


def error_answer(kind: str, path: str) -> bytes:
    """An S3-style error response of status ``kind`` (``"500"``, ``"503"``, ``"404"``)."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{_CODES[kind]}</Code>'
            f"<Message>injected by bench.http_proxy</Message><Resource>{path}</Resource>"
            "</Error>").encode()
    return (f"HTTP/1.1 {kind} {_REASONS[kind]}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class HttpMessage:
    """One HTTP/1.1 request or response as read from a stream: its first line, headers (in
    order, as sent) and body (de-chunked when it came chunked)."""

    def __init__(self, first_line: bytes, headers: list[tuple[str, str]], body: bytes):
        self.first_line, self.headers, self.body = first_line, headers, body

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def encode(self, *, head_only: bool = False) -> bytes:
        """The message with ``Content-Length`` (never chunked); ``head_only``: keep a HEAD
        answer's own ``Content-Length`` and send no body."""
        lines = [self.first_line]
        for k, v in self.headers:
            if k.lower() in ("transfer-encoding", "content-length"):
                continue
            lines.append(f"{k}: {v}".encode("latin-1"))
        length = self.header("content-length") if head_only else str(len(self.body))
        if length is not None:
            lines.append(f"Content-Length: {length}".encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else self.body)


async def read_message(reader: asyncio.StreamReader, *, has_body: bool = True) -> HttpMessage | None:
    """The next message on ``reader`` (None at a clean end of stream)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    first, *rest = head[:-4].split(b"\r\n")
    headers = []
    for line in rest:
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    message = HttpMessage(first, headers, b"")
    if not has_body:
        return message
    if (message.header("transfer-encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        message.body = b"".join(chunks)
    else:
        length = int(message.header("content-length") or 0)
        message.body = await reader.readexactly(length) if length else b""
    return message


class CountingProxy:
    """``CountingProxy(upstream, latency_s, faults).start()``; ``counts()`` by method,
    ``faults()`` by kind; ``stop()``.

    Args:
        upstream: ``http://host:port`` of the real endpoint.
        latency_s: seconds waited before forwarding each request (added latency, per request).
        faults: ``FaultRule``s, tried in order for each GET / HEAD (see the module docstring).
        seed: seed of the fault draws (one draw per rule per matching request).
    """

    def __init__(self, upstream: str, latency_s: float = 0.0, faults: Sequence[FaultRule] = (),
                 seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.latency_s = latency_s
        self.rules = list(faults)
        self._random = random.Random(seed)
        self._faults: Counter[str] = Counter()
        self._applied: Counter[int] = Counter()  # injections per rule (for ``limit``)
        self._counts: Counter[str] = Counter()
        self._bytes = self._ok_bytes = 0
        self._in_flight = self._most_in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ counters

    def counts(self) -> dict[str, int]:
        """Requests forwarded so far, by HTTP method, plus ``total``."""
        with self._lock:
            return {**self._counts, "total": sum(self._counts.values())}

    def faults(self) -> dict[str, int]:
        """Faults injected so far, by kind (``FAULT_KINDS``), plus ``total``."""
        with self._lock:
            return {**{k: self._faults[k] for k in FAULT_KINDS}, "total": sum(self._faults.values())}

    def _fault(self, method: str, path: str) -> FaultRule | None:
        """The rule this request meets, if any (counted)."""
        if method not in ("GET", "HEAD"):
            return None
        with self._lock:
            for i, rule in enumerate(self.rules):
                if rule.limit is not None and self._applied[i] >= rule.limit:
                    continue
                if (rule.match is None or rule.match in path) and self._random.random() < rule.fraction:
                    self._faults[rule.kind] += 1
                    self._applied[i] += 1
                    return rule
        return None

    async def _inject(self, rule: FaultRule, path: str, writer: asyncio.StreamWriter) -> bool:
        """Apply ``rule`` to a request; True when the connection may carry on."""
        if rule.kind == "reset":
            writer.transport.abort()
            return False
        if rule.kind == "stall":
            await asyncio.sleep(rule.stall_s)
            return False
        writer.write(error_answer(rule.kind, path))
        await writer.drain()
        return True

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
            self._faults.clear()
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

    # ------------------------------------------------------------------ serving

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection, with one upstream connection of its own, request by request."""
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (request := await read_message(reader)) is not None:
                method, path = request.first_line.decode("latin-1").split(" ")[:2]
                if path == COUNTS_PATH:
                    writer.write(self._counts_answer())
                    await writer.drain()
                    continue
                rule = self._fault(method, path)
                if rule is not None:
                    if await self._inject(rule, path, writer):
                        continue
                    break
                self._enter(1)
                try:
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    if upstream is None:
                        upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
                    upstream[1].write(request.encode())
                    await upstream[1].drain()
                    response = await read_message(upstream[0], has_body=method != "HEAD")
                finally:
                    self._enter(-1)
                if response is None:
                    break
                status = int(response.first_line.split(b" ")[1])
                self._record(method, len(response.body), status)
                writer.write(response.encode(head_only=method == "HEAD"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a client gone, or the proxy stopping (its end of every connection's task)
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()

    def _counts_answer(self) -> bytes:
        data = json.dumps({**self.counts(), "bytes": self.response_bytes(),
                           "faults": self.faults()}).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(data)).encode() + b"\r\n\r\n" + data)

    def start(self, port: int = 0) -> CountingProxy:
        """Listen on 127.0.0.1:``port`` (0: a free one) in a thread of its own."""
        loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(
            self._serve_client, "127.0.0.1", port, backlog=1024))
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, daemon=True, name="http-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        loop, server, self._loop, self._server = self._loop, self._server, None, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_shutdown(server), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> CountingProxy:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _shutdown(server: asyncio.base_events.Server) -> None:
    """Stop listening and end every open connection's task (on the proxy's loop)."""
    server.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.http_proxy UPSTREAM [--latency-ms 20] [--port P]
    [--fault KIND:FRACTION[:MATCH]]... [--seed S]``: run in its own process (so that it does
    not share a GIL with what it measures); prints its endpoint."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", action="append", type=FaultRule.parse, default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = CountingProxy(args.upstream, latency_s=args.latency_ms / 1000, faults=args.fault,
                          seed=args.seed).start(args.port)
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
