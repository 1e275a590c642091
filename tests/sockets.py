"""What a process tree listens on, read from /proc (Linux): for the loopback-only tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pipeline.stack.process import process_tree  # noqa: F401 - the tests import it from here


def _socket_owners(pids: list[int]) -> dict[int, int]:
    """Socket inode -> pid, for the open sockets of ``pids``."""
    owners = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners[int(link[8:-1])] = pid
    return owners


def _address(hex_address: str, v6: bool) -> tuple[str, int]:
    ip, port = hex_address.split(":")
    raw = bytes.fromhex(ip)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, protocol, ip, port)`` of every listening TCP and bound UDP socket of ``pids``."""
    owners = _socket_owners(pids)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            inode = int(fields[9])
            if inode not in owners or (proto.startswith("tcp") and fields[3] != "0A"):
                continue  # not ours, or a TCP socket that is not listening
            ip, port = _address(fields[1], proto.endswith("6"))
            found.append((owners[inode], proto, ip, port))
    return found


def is_loopback(ip: str) -> bool:
    return ip == "::1" or ip.removeprefix("::ffff:").startswith("127.")
