"""The demo's data, ready to train: a generated fMoW-layout sample ingested into pyramids.

``make demo`` (``jobs/demo.py``), ``bench/demo_seeds.py`` and ``bench/train_throughput.py``
need the same thing: raw scenes from ``fmow_sample`` under ``<root>/raw``, ingested into
``<root>/pyramids`` with its ``manifest.parquet``. ``make_demo_data`` does both through the
library (what ``jobs/make_fmow_sample.py`` and ``jobs/ingest_fmow.py`` do) and skips what is
already there: the sample is regenerated only when its spec changed (a marker file holds the
spec's fingerprint), and the ingest skips complete scenes.

``DEMO_SPEC`` is the demo's sample: 4 classes decided by 24-48 px patterned objects on 600-1000
px scenes; the objects are flat blobs of one tone in a 64 px view and plain at level 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.synth.fmow_sample import SampleSpec, generate_sample

DEMO_SPEC = SampleSpec(
    splits=(("train", 200), ("val", 200)),
    size_range=(500, 1000),
    min_long_side=600,
    large_fraction=0.0,
    class_objects=(4, 6),
    distractors=(2, 4),
)
"""The demo's sample: 200 train and 200 validation scenes (a validation figure that means
something: one scene is half a point); 4-6 class objects and 2-4 distractors per scene (the
generator's defaults are 2-4 and 4-8). With the defaults only one patch in five of an untrained
model lands on a class object, and a run whose attention never leaves its prior stays near
chance (README, "Training system"); the objects themselves are unchanged, so they are still
invisible in the view."""

DEMO_COARSEST = 128
"""Long side (px) of the pyramids' coarsest level: the 64 px view is read from it."""


@dataclass(frozen=True, slots=True)
class DemoData:
    """Where the demo's data lies: ``raw`` scenes, ``pyramids`` and their ``manifest``."""

    raw: Path
    pyramids: Path
    manifest: str


def demo_raw_once(root: Path, train: int, val: int,
                  say: Callable[[str], None] = print) -> tuple[Path, str]:
    """The demo sample with ``train`` / ``val`` scenes (fMoW layout) under
    ``root/raw-<fingerprint>``, generated once (a ``.complete`` marker beside it); the folder
    and the fingerprint."""
    spec = dataclasses.replace(DEMO_SPEC, splits=(("train", train), ("val", val)))
    tag = spec_fingerprint(spec)
    raw, marker = root / f"raw-{tag}", root / f"raw-{tag}.complete"
    if not marker.exists():
        say(f"generating {dict(spec.splits)} scenes (fMoW layout) in {raw}")
        for _ in generate_sample(str(raw), spec, workers=2):
            pass
        marker.touch()
    return raw, tag


def spec_fingerprint(spec: SampleSpec) -> str:
    """A short hash of every field of ``spec``: equal specs generate the same sample."""
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_demo_data(
    root: str | Path,
    spec: SampleSpec = DEMO_SPEC,
    *,
    coarsest: int = DEMO_COARSEST,
    workers: int = 2,
    progress_s: float = 20.0,
    say: Callable[[str], None] = print,
) -> DemoData:
    """Generate ``spec`` under ``root/raw`` (unless that sample is there) and ingest it into
    ``root/pyramids`` (complete scenes are skipped). Raises ``RuntimeError`` naming the
    rejected inputs if any scene is rejected."""
    from pipeline.ingest import engine, fmow
    from pipeline.store.manifest import write_manifest

    root = Path(root)
    raw, pyramids = root / "raw", root / "pyramids"
    marker = root / f"raw.{spec_fingerprint(spec)}.complete"
    if not marker.exists():
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(pyramids, ignore_errors=True)  # a new sample needs a new store
        for old in root.glob("raw.*.complete"):
            old.unlink()
        say(f"generating {dict(spec.splits)} scenes (fMoW layout) in {raw}")
        for _ in generate_sample(str(raw), spec, workers=workers):
            pass
        marker.touch()
    say(f"ingesting into pyramids under {pyramids} (skips scenes already complete)")
    walk = fmow.walk_fmow(str(raw))
    classes = fmow.class_list({f.category for f in walk.files}, "present")
    report = engine.run_ingest(fmow.fmow_tasks(str(raw), walk), fmow.load_fmow_scene, classes,
                               str(pyramids), workers=workers, coarsest=coarsest,
                               progress_s=progress_s)
    manifest = pyramids / "manifest.parquet"
    write_manifest(str(manifest), report.rows, classes, report.rejects)
    if not report.all_in:
        raise RuntimeError(f"ingest rejected generated scenes: {engine.summary(report, str(manifest))}")
    return DemoData(raw, pyramids, str(manifest))
