"""The demo's data recipe: generate, ingest, skip what is there, regenerate on a new spec."""

import dataclasses

from pipeline.store.manifest import read_manifest
from pipeline.synth.demo import make_demo_data, spec_fingerprint
from pipeline.synth.fmow_sample import SampleSpec

TINY = SampleSpec(splits=(("train", 3), ("val", 2)), classes=("airport", "dam"),
                  size_range=(300, 360), min_long_side=300, large_fraction=0.0)


def test_make_demo_data_ingests_then_skips_then_regenerates_on_a_new_spec(tmp_path):
    said = []
    data = make_demo_data(tmp_path, TINY, coarsest=64, workers=1, say=said.append)
    table = read_manifest(data.manifest).to_pandas()
    assert sorted(table["split"]) == ["train"] * 3 + ["val"] * 2
    first = {p: p.stat().st_mtime_ns for p in data.raw.rglob("*.jpg")}
    assert len(first) == 5

    said.clear()
    make_demo_data(tmp_path, TINY, coarsest=64, workers=1, say=said.append)
    assert not any("generating" in line for line in said)  # same spec: the sample is kept
    assert {p: p.stat().st_mtime_ns for p in data.raw.rglob("*.jpg")} == first

    bigger = dataclasses.replace(TINY, splits=(("train", 4), ("val", 2)))
    assert spec_fingerprint(bigger) != spec_fingerprint(TINY)
    data = make_demo_data(tmp_path, bigger, coarsest=64, workers=1, say=said.append)
    assert len(read_manifest(data.manifest).to_pandas()) == 6
    assert len(list(tmp_path.glob("raw.*.complete"))) == 1
