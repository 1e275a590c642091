"""The ingest's progress line: the rate since the start, and an ETA at the recent rate."""

from __future__ import annotations

import io
import math

import pytest

from pipeline.ingest.engine import ETA_WINDOW_S, Outcome, _Progress


def _run(progress: _Progress, status: str, count: int, start: float, per_s: float) -> float:
    """``count`` outcomes of ``status`` at ``per_s`` scenes/s from ``start``; the last time."""
    t = start
    for i in range(count):
        t = start + i / per_s
        progress.add(Outcome(status, {}), now=t)
    return t


def test_eta_ignores_the_start_before_the_first_scene():
    progress = _Progress(total=1000, every_s=1e9, out=io.StringIO())
    # 35 s of start-up (walking the tree, building the graph), then 10 scenes/s
    now = _run(progress, "written", 101, progress.start + 35.0, per_s=10.0)
    assert progress.eta(now) == pytest.approx(899 / 10.0, rel=0.02)
    line = progress.line(now)
    assert "101/1000 scenes" in line and "eta 90 s" in line
    assert f"{101 / (now - progress.start):.2f} scenes/s" in line  # the rate: since the start


def test_eta_of_a_resumed_run_follows_the_writes_after_the_skips():
    progress = _Progress(total=1000, every_s=1e9, out=io.StringIO())
    t = _run(progress, "skipped", 300, progress.start, per_s=100.0)
    now = _run(progress, "written", 120, t + 0.5, per_s=2.0)  # 60 s of writes
    assert now - t > ETA_WINDOW_S
    assert progress.eta(now) == pytest.approx(580 / 2.0, rel=0.05)
    one = _Progress(total=10, every_s=1e9, out=None)
    one.add(Outcome("written", {}), now=one.start + 4.0)
    assert math.isnan(one.eta(one.start + 4.0))  # one scene: no rate yet
    assert "eta ? s" in one.line(one.start + 4.0)
