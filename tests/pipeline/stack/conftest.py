"""Fixtures for the stack's tests: a folder the ``postgres`` user can pass through."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def stack_dir():
    """A fresh folder under /tmp, mode 0711: PostgreSQL runs as ``postgres`` when the tests
    run as root and must reach its data folder (pytest's own temp folders are 0700); short,
    because Ray's socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="stk-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def group_sockets(*pids: int) -> list[tuple[int, str, str, int]]:
    """Listening sockets of the process trees under ``pids``."""
    from tests.sockets import listening, process_tree

    return listening([p for pid in pids for p in process_tree(pid)])
