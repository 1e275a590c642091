"""Process groups we started, found again and stopped by id; free ports; waiting for HTTP.

A stack server runs in its own process group (``start_new_session``). A later process (``jobs/
stack.py down``) has no ``Popen`` of it, only the group id and the leader's start time from the
state file, so ``stop_group`` decides from ``/proc`` whether the group is still ours: while any
member of a group lives, Linux does not hand its id to a new process; once every member is gone
the id may be reused, and then a live leader with another start time says "not ours".
Zombies count as gone (they hold no port and no file; PID 1 of a container may never reap them).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Group:
    """A process group we started: ``pgid`` (= the leader's pid) and the leader's start time
    (clock ticks since boot, field 22 of ``/proc/<pid>/stat``)."""

    pgid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> Group:
        """The group led by ``pid`` (started with ``start_new_session``)."""
        return cls(pid, int(_stat(pid)[19]))

    def members(self) -> list[int]:
        """Live (not zombie) processes of the group, or [] when it is not ours any more."""
        leader = _stat_or_none(self.pgid)
        if leader is not None and leader[0] != "Z" and int(leader[19]) != int(self.start_time):
            return []  # the id was reused by somebody else's new group
        return [pid for pid, fields in _all_stats() if fields[2] == self.pgid and fields[0] != "Z"]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every live member (not ``killpg``: that needs no check of ours)."""
        for pid in self.members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def stop_group(group: Group, first: int = signal.SIGTERM, timeout_s: float = 30.0) -> bool:
    """Signal ``group`` with ``first``, SIGKILL what is left after ``timeout_s`` and wait until
    no live member remains (10 s more); then end what the group had started in process groups
    of their own (Ray puts each worker in its own group; a raylet killed before it reaped them
    leaves them behind). True when all of it is gone. Safe when already gone."""
    members = group.members()
    if not members:
        return True
    tree = _descendants(members)
    group.signal(first)
    gone = wait_gone(group, timeout_s)
    if not gone:
        group.signal(signal.SIGKILL)
        gone = wait_gone(group, 10.0)
    return _end_leftovers(tree) and gone


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc): whose sockets to list, what to stop."""
    return [root] + [pid for pid, _ in _descendants([root])]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the live processes ``pids`` (from /proc;
    processes already gone count 0)."""
    ticks = 0
    for pid in pids:
        fields = _stat_or_none(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(roots: list[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every process below ``roots`` (from /proc), roots excluded."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in _all_stats():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            fields = _stat_or_none(child)
            if fields is not None:
                found.append((child, int(fields[19])))
                todo.append(child)
    return [f for f in found if f[0] not in roots]


def _end_leftovers(tree: list[tuple[int, int]], timeout_s: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL, the processes of ``tree`` still alive (same start time)."""
    def alive() -> list[int]:
        out = []
        for pid, start in tree:
            fields = _stat_or_none(pid)
            if fields is not None and fields[0] != "Z" and int(fields[19]) == start:
                out.append(pid)
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while alive() and time.monotonic() < deadline:
            _reap()
            time.sleep(0.2)
        if not alive():
            return True
    return False


def wait_gone(group: Group, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``group`` to have no live member; True if it has none."""
    deadline = time.monotonic() + timeout_s
    while group.members():
        if time.monotonic() > deadline:
            return False
        _reap()
        time.sleep(0.2)
    return True


def _reap() -> None:
    """Reap our own exited children (so a stopped server does not linger as a zombie of ours)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _stat(pid: int) -> list[str]:
    """Fields of ``/proc/<pid>/stat`` after the command name: [state, ppid, pgrp, ...]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()


def _stat_or_none(pid: int) -> list[str] | None:
    try:
        return _stat(pid)
    except (OSError, IndexError):
        return None


def _all_stats() -> list[tuple[int, list[int | str]]]:
    """(pid, [state, ppid, pgrp]) of every process, pgrp as int."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_or_none(int(entry))
            if fields is not None:
                out.append((int(entry), [fields[0], int(fields[1]), int(fields[2])]))
    return out


def free_port_range(count: int, low: int = 20000, high: int = 60000) -> int:
    """First port of ``count`` consecutive TCP ports all free on 127.0.0.1 now (Ray's worker
    port range), tried at random places between ``low`` and ``high``."""
    import random

    for _ in range(200):
        first = random.randrange(low, high - count)
        socks = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found between {low} and {high}")


def wait_http(url: str, deadline: float, alive: Callable[[], bool], what: str) -> None:
    """Poll ``url`` every 0.5 s until it answers (any HTTP status) or ``deadline`` (monotonic)
    passes; ``alive()`` False (the server exited) fails at once. Raises RuntimeError."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token, ...): it is up
        except OSError as err:
            last = repr(err)
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer on {url} in time ({last})")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"


def progress(message: str) -> float:
    """Print ``message`` (no newline) on stderr and return the start time for ``done``."""
    import sys

    print(message + " ...", end="", file=sys.stderr, flush=True)
    return time.monotonic()


def done(start: float, word: str = "ok") -> None:
    """End a ``progress`` line: `` ok (3.1 s)``."""
    import sys

    print(f" {word} ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)


def done_line(message: str, start: float, word: str = "ok") -> None:
    """``message ... ok (3.1 s)`` as one line on stderr, printed when the step is done (steps
    running side by side, as in the stack's start, do not cut into each other's lines)."""
    import sys

    print(f"{message} ... {word} ({time.monotonic() - start:.1f} s)", file=sys.stderr,
          flush=True)
