"""Generate a sample in the fMoW-rgb layout (see ``pipeline/synth/fmow_sample.py`` for what is in it).

    python jobs/make_fmow_sample.py --out data/sample/raw [--train 100] [--val 30] \
        [--classes airport,dam,port,stadium] [--size 1000,2000] [--large 4000,8000] \
        [--large-fraction 0.05] [--bad 0] [--seed 0] [--workers 2]

``--out`` is a local path or a storage URI (s3://...). ``--bad N`` adds N broken scenes
(truncated / corrupt / empty images, missing / malformed JSON, missing image, unknown category)
for testing the ingest; they are listed at the end. Exit status 0, or 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.synth.fmow_sample import SampleSpec, generate_sample


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SampleSpec]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = SampleSpec()
    p.add_argument("--out", required=True, help="root of the sample (local path or URI)")
    p.add_argument("--train", type=int, default=dict(d.splits)["train"], help="train scenes")
    p.add_argument("--val", type=int, default=dict(d.splits)["val"], help="val scenes")
    p.add_argument("--classes", default=",".join(d.classes), help="fMoW category names")
    p.add_argument("--size", type=_pair, default=d.size_range, help="min,max px of a side")
    p.add_argument("--min-long-side", type=int, default=d.min_long_side)
    p.add_argument("--large", type=_pair, default=d.large_size_range, help="large scene sides")
    p.add_argument("--large-fraction", type=float, default=d.large_fraction)
    p.add_argument("--class-objects", type=_pair, default=d.class_objects,
                   help="min,max class objects per scene (at one site)")
    p.add_argument("--distractors", type=_pair, default=d.distractors,
                   help="min,max distractor objects per scene")
    p.add_argument("--bad", type=int, default=0, help="broken scenes to add")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=2, help="processes rendering scenes")
    args = p.parse_args(argv)
    splits = tuple((name, n) for name, n in (("train", args.train), ("val", args.val)) if n > 0)
    try:
        spec = SampleSpec(
            splits=splits,
            classes=tuple(c for c in args.classes.split(",") if c),
            size_range=args.size,
            min_long_side=args.min_long_side,
            large_size_range=args.large,
            large_fraction=args.large_fraction,
            class_objects=args.class_objects,
            distractors=args.distractors,
            bad_inputs=args.bad,
            seed=args.seed,
        )
    except ValueError as exc:
        p.error(str(exc))
    return args, spec


def main(argv: list[str] | None = None) -> int:
    args, spec = parse_args(argv)
    start, total, scenes, bad = time.monotonic(), 0, 0, []
    for scene, nbytes in generate_sample(args.out, spec, workers=args.workers):
        scenes += 1
        total += nbytes
        if scene.bad:
            bad.append(f"{scene.image_path} ({scene.bad})")
        if scenes % 20 == 0:
            print(f"[sample] {scenes} scenes, {total / 1e6:.0f} MB, "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"[sample] wrote {scenes} scenes ({total / 1e6:.0f} MB) to {args.out} in "
          f"{time.monotonic() - start:.1f} s; splits {dict(spec.splits)}, classes {spec.classes}",
          file=sys.stderr)
    for line in bad:
        print(f"[sample] broken on purpose: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
