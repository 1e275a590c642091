"""The worker starts its reader with itself, so that the first training step (and the epoch's
compute time) does not include the reader's child process start."""

from __future__ import annotations

from pipeline.read.settings import ReaderSettings
from pipeline.read.source import ZarrSourceFactory


def test_the_readers_child_process_runs_before_the_first_step():
    from pipeline.train.worker import started_source

    lazy = ZarrSourceFactory(ReaderSettings(process=True))()
    assert lazy.pid is None  # a ProcessPixelSource starts its child on first use
    source = started_source(ZarrSourceFactory(ReaderSettings(process=True)))
    try:
        assert source.pid is not None
        assert source.counters().requests == 0
    finally:
        source.close()
