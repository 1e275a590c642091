"""Small generated fMoW-layout samples for ingest tests (scenes of a few hundred px)."""

from __future__ import annotations

from pipeline.synth.fmow_sample import SampleSpec, generate_sample

SMALL_CLASSES = ("airport", "dam", "port")


def small_spec(train: int = 6, val: int = 3, bad: int = 0, seed: int = 0) -> SampleSpec:
    """Scenes of 300-420 px a side (one pyramid level below level 0 at coarsest 256)."""
    splits = tuple((n, c) for n, c in (("train", train), ("val", val)) if c)
    return SampleSpec(
        splits=splits,
        classes=SMALL_CLASSES,
        size_range=(300, 420),
        min_long_side=0,
        large_size_range=(300, 420),
        large_fraction=0.0,
        class_objects=(2, 3),
        distractors=(2, 4),
        bad_inputs=bad,
        seed=seed,
    )


def make_sample(root_uri: str, spec: SampleSpec) -> list:
    """Write ``spec``'s sample under ``root_uri``; return the scene plans."""
    return [scene for scene, _ in generate_sample(root_uri, spec)]
