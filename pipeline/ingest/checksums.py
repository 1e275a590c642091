"""Source checksums: a file of SHA-256 sums, as a data provider publishes it, checked before a
scene is decoded.

A JPEG whose middle bytes are overwritten often still decodes (libjpeg sees valid entropy-coded
data, just the wrong one: about half of such files in ``bench/faults.py``'s
``ingest_rejects_unreadable``), so no decoder can tell it from the real image. Only a sum
published with the data can. The file has ``sha256sum``'s format, one line per file:
``<64 hex digits>  <path relative to the source root>`` (a ``*`` before the path, binary mode,
is allowed). With a checksum file, every scene's image must be listed and match; a mismatch or
an unlisted image becomes a reject (``checksum_mismatch``, ``checksum_missing``), nothing else
changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.ingest.engine import BadInput, LoadedScene, SceneTask
from pipeline.store import storage

LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def read_checksums(uri: str) -> dict[str, str]:
    """``{relative path: lower-case hex SHA-256}`` of a ``sha256sum`` file at ``uri``; a line
    that is neither blank nor a sum raises ``ValueError`` naming the file and line."""
    sums = {}
    text = storage.read_bytes(uri).decode("utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = LINE.match(line)
        if match is None:
            raise ValueError(f"{uri} line {number}: not '<sha256>  <path>': {line[:80]!r}")
        sums[match.group(2).strip().removeprefix("./")] = match.group(1).lower()
    return sums


def sha256_of(uri: str) -> str:
    """Hex SHA-256 of the object at ``uri``: local files are hashed as a stream (memory does
    not grow with the file), objects in a store are fetched whole."""
    parsed = storage.parse_uri(uri)
    if parsed.scheme == "file":
        with Path(parsed.root).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def with_checksums(tasks: Sequence[SceneTask], sums: dict[str, str],
                   relative: Callable[[str], str]) -> list[SceneTask]:
    """``tasks`` with the expected sum of each source (``relative(task.source)`` looked up in
    ``sums``); a source that is not listed becomes a ``checksum_missing`` reject."""
    out = []
    for task in tasks:
        key = relative(task.source)
        if task.reject is None and key not in sums:
            reason = f"{task.source} is not listed in the checksum file (as {key!r})"
            task = dataclasses.replace(task, reject=("checksum_missing", reason))
        out.append(dataclasses.replace(task, sha256=sums.get(key)))
    return out


def verify(task: SceneTask) -> None:
    """Raise ``BadInput("checksum_mismatch")`` when the source's SHA-256 is not the expected
    one (nothing to check when the task carries none)."""
    if task.sha256 is None:
        return
    got = sha256_of(task.source)
    if got != task.sha256:
        raise BadInput("checksum_mismatch", f"{task.source}: SHA-256 {got} but the checksum "
                       f"file says {task.sha256} (the file changed after its sum was published)")


def verifying(loader: Callable[[SceneTask], LoadedScene]) -> Callable[[SceneTask], LoadedScene]:
    """``loader`` that first checks the task's source against its sum (``verify``)."""
    return _Verifying(loader)


@dataclasses.dataclass(frozen=True)
class _Verifying:
    """A picklable wrapper (dask may send the loader to worker processes)."""

    loader: Callable[[SceneTask], LoadedScene]

    def __call__(self, task: SceneTask) -> LoadedScene:
        verify(task)
        return self.loader(task)
