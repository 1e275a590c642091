"""A tiny ingested fMoW-layout sample for the benchmark smoke tests."""

from __future__ import annotations

import pytest

from jobs.ingest_fmow import main as ingest
from tests.pipeline.fmow_fixtures import make_sample, small_spec


@pytest.fixture
def tiny_manifest(tmp_path) -> str:
    """Manifest URI of 4 train + 1 val scenes of 300-420 px, ingested into pyramids."""
    src, dst = str(tmp_path / "fmow"), str(tmp_path / "pyr")
    make_sample(src, small_spec(train=4, val=1))
    assert ingest(["--src", src, "--dst", dst, "--workers", "1"]) == 0
    return f"{dst}/manifest.parquet"
