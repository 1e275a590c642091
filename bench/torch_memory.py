"""Peak bytes torch allocates on the CPU while a function runs, from the profiler's memory
events (``peak_cpu_bytes``), shared by ``bench/scale.py`` and ``bench/learning.py``.

torch 2.13's profiler (kineto) prints two ``USDT: ... SyncActivityProfilerHandler`` lines to
the process's stderr (file descriptor 2, below Python) on every start and stop: hundreds of
lines in a bench. They are dropped; anything else written to stderr meanwhile is passed on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

PROFILER_NOISE = "ActivityProfilerHandler"  # the marker of kineto's start / stop lines


@contextlib.contextmanager
def without_profiler_lines() -> Iterator[None]:
    """Run the body with fd 2 captured; then write back every line but kineto's."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if PROFILER_NOISE not in line]
            sys.stderr.write("".join(kept))


def peak_cpu_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch's CPU allocations live at once while ``fn()`` runs (the running
    sum of the profiler's per-event allocations and frees, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_lines(), profile(activities=[ProfilerActivity.CPU],
                                           profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
