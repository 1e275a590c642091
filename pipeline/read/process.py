"""The attended-chunk reader in a child process, so that its CPU leaves the training loop's GIL.

``ZarrPixelSource`` fetches on a background event loop, but planning, decoding, cropping and
resizing (about 4.3 ms of CPU per sample, ``bench/reader_cpu.py``) still run in the training
process, where they take the GIL from the training loop. ``ProcessPixelSource`` runs the same
source in a child process (one per training worker, started on first use) and keeps the same
API: ``submit`` sends the request over a socket pair and returns a ``concurrent.futures.Future``
that a receiver thread completes when the child answers with the patches. Only the request
(keys, boxes, level, size) and the (B, K, C, h, w) float32 patches cross the process boundary.

The child is ``python -m pipeline.read.process FD``: it builds the inner source from a
picklable factory (the first message), serves requests concurrently and answers each with its
result and a snapshot of the inner source's counters, so ``counters()`` here is the inner
reader's, unchanged. The child exits when the socket closes (this object closed, or this process
gone). If the child dies, every pending and later future fails with a ``ReadError`` naming its
PID and exit status.

Like ``ZarrPixelSource``, the object pickles as its factory only, so it can be sent to Ray
workers; each process that uses it starts its own child.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.protocol import ClosableSource, CountingSource, ReadRequest
from pipeline.read.reader import ReadError

ROOT = Path(__file__).resolve().parents[2]
ASYNC_OPS = frozenset({"submit", "submit_view"})  # answered when the inner future completes
SYNC_OPS = frozenset({"level0_sizes", "counters", "reset_counters", "requests", "clear_cache"})


def _to_wire(value: Any) -> Any:
    """Tensors and ``ReadRequest``s as numpy (plain pickle, no shared-memory file handles)."""
    if isinstance(value, Tensor):
        return ("tensor", value.numpy())
    if isinstance(value, ReadRequest):
        return ("request", value.boxes.numpy(), value.level, tuple(value.size))
    return ("plain", value)


def _from_wire(value: Any) -> Any:
    kind, *rest = value
    if kind == "tensor":
        return torch.from_numpy(rest[0])
    if kind == "request":
        return ReadRequest(torch.from_numpy(rest[0]), rest[1], rest[2])
    return rest[0]


class ProcessPixelSource:
    """A ``PixelSource`` whose inner source (``factory()``) lives in a child process.

    Args:
        factory: picklable callable returning the inner source (e.g.
            ``pipeline.read.source.ZarrSourceFactory``); it is called in the child.
        start_timeout_s: how long to wait for the child to build its source.
    """

    def __init__(self, factory: Callable[[], Any], start_timeout_s: float = 120.0):
        self.factory = factory
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._child: _Child | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self.factory, "start_timeout_s": self.start_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _ensure_child(self) -> _Child:
        with self._lock:
            child = self._child
            if child is None or child.owner_pid != os.getpid() or child.failed is not None:
                if child is not None and child.owner_pid == os.getpid():
                    child.close()
                child = self._child = _Child(self.factory, self.start_timeout_s)
                weakref.finalize(self, child.close)  # dropped without close(): stop the child
            return child

    def _call(self, op: str, *args: Any) -> Future:
        keys = args[0] if args and isinstance(args[0], list) else []
        local = [k for k in keys if k.startswith("memory://")]
        if local:
            raise ValueError(f"{local[0]}: a memory:// store lives in one process and the reader "
                             "runs in a child process; use reader.process=false for memory:// data")
        return self._ensure_child().call(op, *args)

    # ------------------------------------------------------------------ PixelSource

    def submit(self, keys: Sequence[str], request: ReadRequest) -> Future:
        """Start ``read(keys, request)`` in the child; the future gives (B, K, C, h, w) float32."""
        return self._call("submit", [str(k) for k in keys], request)

    def submit_view(self, keys: Sequence[str], size: tuple[int, int]) -> Future:
        """Start ``view(keys, size)`` in the child."""
        return self._call("submit_view", [str(k) for k in keys], tuple(size))

    def read(self, keys: Sequence[str], request: ReadRequest) -> Tensor:
        return self.submit(keys, request).result()

    def view(self, keys: Sequence[str], size: tuple[int, int]) -> Tensor:
        return self.submit_view(keys, size).result()

    def level0_sizes(self, keys: Sequence[str]) -> Tensor:
        return self._call("level0_sizes", [str(k) for k in keys]).result()

    # ------------------------------------------------------------------ counters, lifecycle

    def counters(self) -> Any:
        """The inner source's counters as of its latest answer (no round trip)."""
        child = self._child
        if child is None or child.owner_pid != os.getpid():
            return self._call("counters").result()
        return child.counters

    def reset_counters(self) -> None:
        self._call("reset_counters").result()

    def requests(self) -> list:
        return self._call("requests").result()

    def clear_cache(self) -> None:
        self._call("clear_cache").result()

    @property
    def pid(self) -> int | None:
        """The child's PID (None before first use)."""
        return None if self._child is None else self._child.process.pid

    def close(self) -> None:
        """Stop the child (a later call starts a new one)."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None and child.owner_pid == os.getpid():
            child.close()


class _Child:
    """One child process, its socket and the receiver thread completing the futures."""

    def __init__(self, factory: Callable[[], Any], start_timeout_s: float):
        self.owner_pid = os.getpid()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.read.process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, cwd=str(ROOT),
        )
        theirs.close()
        self.sock = ours  # kept for shutdown(): it wakes the receiver blocked in recv()
        self.conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self.counters: Any = None
        self.failed: str | None = None
        ready: Future = Future()
        self._pending[-1] = ready
        self.conn.send(pickle.dumps(factory))
        self._thread = threading.Thread(target=self._receive, daemon=True,
                                        name=f"ProcessPixelSource-{self.process.pid}")
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.sock, self.conn, self.process)
        ready.result(timeout=start_timeout_s)

    def call(self, op: str, *args: Any) -> Future:
        future: Future = Future()
        if self.failed is not None:
            future.set_exception(ReadError(self.failed))
            return future
        request_id = next(self._ids)
        with self._pending_lock:
            self._pending[request_id] = future
        try:
            with self._send_lock:
                self.conn.send((request_id, op, [_to_wire(a) for a in args]))
        except OSError as err:
            self._fail(f"reader process {self.process.pid}: sending {op} failed: {err}")
        return future

    def _receive(self) -> None:
        while True:
            try:
                request_id, ok, value, counters = self.conn.recv()
            except (EOFError, OSError):
                code = self.process.wait()
                self._fail(f"reader process {self.process.pid} exited with status {code}")
                return
            if counters is not None:
                self.counters = counters
            with self._pending_lock:
                future = self._pending.pop(request_id, None)
            if future is None:
                continue
            if ok:
                future.set_result(_from_wire(value))
            else:
                future.set_exception(value)

    def _fail(self, message: str) -> None:
        self.failed = message
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ReadError(message))

    def close(self) -> None:
        self._finalizer()
        self._thread.join(timeout=10)
        self.conn.close()


def _stop(sock: socket.socket, conn: Connection, process: subprocess.Popen) -> None:
    """Shut the socket down (the child exits on EOF); kill the child if it lingers."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------- the child


def _reply(conn: Connection, lock: threading.Lock, source: Any, request_id: int,
           ok: bool, value: Any) -> None:
    if ok:
        value = _to_wire(value)
    else:
        try:
            pickle.dumps(value)
        except Exception:
            value = ReadError(f"{type(value).__name__}: {value}")
    counters = source.counters() if isinstance(source, CountingSource) else None
    with lock:
        try:
            conn.send((request_id, ok, value, counters))
        except OSError:
            pass  # the parent is gone; the main loop sees EOF and exits


def serve(fd: int) -> None:
    """The child's main loop: build the source, then answer requests until the socket closes."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    conn = Connection(fd)
    lock = threading.Lock()
    source = pickle.loads(conn.recv())()
    _reply(conn, lock, source, -1, True, None)
    while True:
        try:
            request_id, op, args = conn.recv()
        except (EOFError, OSError):
            break
        args = [_from_wire(a) for a in args]
        if op not in ASYNC_OPS | SYNC_OPS:
            _reply(conn, lock, source, request_id, False, ValueError(f"unknown operation {op!r}"))
            continue
        try:
            result = getattr(source, op)(*args)
        except Exception as err:
            _reply(conn, lock, source, request_id, False, err)
            continue
        if op in ASYNC_OPS:
            result.add_done_callback(
                lambda f, i=request_id: _reply(conn, lock, source, i, f.exception() is None,
                                               f.exception() or f.result()))
        else:
            _reply(conn, lock, source, request_id, True, result)
    if isinstance(source, ClosableSource):
        source.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
