"""Ingest an fMoW-rgb tree (local or s3://) into one pyramid per scene plus a Parquet manifest.

    python jobs/ingest_fmow.py --src data/sample/raw --dst data/sample/pyramids \
        [--manifest URI] [--splits train,val] [--workers 2] [--coarsest 256] \
        [--classes present|fmow62|airport,dam,...] [--scheduler threads] [--progress-s 5] [--verbose]
        [--checksums SHA256SUMS]

Resumable: run it again after a crash or a kill and it skips the complete scenes, redoes the
rest, and ends with the same store as an uninterrupted run. A complete scene is never rewritten,
so a different ``--coarsest`` needs a fresh ``--dst``. Class list: ``present`` (default)
is the sorted fMoW categories found in the tree, all splits counted, so separate runs per split
agree; it is written beside the manifest (``<manifest>.classes.json``) and in its metadata.

Exit status: 0 every scene went in; 3 some inputs were rejected (listed in
``<manifest>.rejects.parquet`` / ``.csv``); 1 nothing to ingest or a fatal error;
2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.ingest import checksums, fmow
from pipeline.ingest import engine as ingest
from pipeline.store import manifest, storage

EXIT_OK, EXIT_FATAL, EXIT_REJECTS = 0, 1, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", required=True, help="fMoW-rgb root (local path, file://, s3://)")
    p.add_argument("--dst", required=True, help="pyramid root URI")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all found)")
    p.add_argument("--classes", default="present", help="present | fmow62 | comma-separated names")
    p.add_argument("--checksums", default=None,
                   help="a sha256sum file of the source (paths relative to --src): each image\n"
                        "must be listed and match, else it is rejected (checksum_mismatch /\n"
                        "checksum_missing)")
    ingest.add_engine_options(p, unit="scenes")
    args = p.parse_args(argv)
    ingest.check_engine_options(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    walk = fmow.walk_fmow(args.src)  # every split, so that the class list is the same for all
    try:
        classes = fmow.class_list({f.category for f in walk.files}, args.classes)
    except ValueError as exc:
        print(f"[ingest] {exc}", file=sys.stderr)
        return EXIT_FATAL
    files = [f for f in walk.files if splits is None or f.split in splits]
    _report_ignored(walk.ignored)
    if not files or not classes:
        print(f"[ingest] no fMoW scenes of splits {splits or 'any'} under {args.src}", file=sys.stderr)
        return EXIT_FATAL
    tasks = fmow.fmow_tasks(args.src, fmow.LayoutWalk(tuple(files), walk.ignored))
    loader = fmow.load_fmow_scene
    if args.checksums:
        try:
            sums = checksums.read_checksums(args.checksums)
        except (OSError, ValueError) as exc:
            print(f"[ingest] checksum file: {exc}", file=sys.stderr)
            return EXIT_FATAL
        tasks = checksums.with_checksums(tasks, sums, lambda u: _relative(args.src, u))
        loader = checksums.verifying(loader)
    print(f"[ingest] {len(tasks)} scenes, {len(classes)} classes, {args.src} -> {args.dst}",
          file=sys.stderr)
    report = ingest.run_ingest(
        tasks, loader, classes, args.dst, coarsest=args.coarsest,
        workers=args.workers, scheduler=args.scheduler, progress_s=args.progress_s,
        verbose=args.verbose,
    )
    manifest_uri = args.manifest or storage.join_uri(args.dst, "manifest.parquet")
    manifest.write_manifest(manifest_uri, report.rows, classes, report.rejects)
    print(ingest.summary(report, manifest_uri), file=sys.stderr)
    return EXIT_OK if report.all_in else EXIT_REJECTS


def _relative(src: str, uri: str) -> str:
    """``uri``'s path relative to the source root (as a checksum file lists it)."""
    keys = fmow.relative_keys(src, [uri])
    return keys[0] if keys else uri


def _report_ignored(ignored: tuple[str, ...], show: int = 10) -> None:
    """Files that are not part of the fMoW-rgb layout are listed, not silently passed over."""
    if ignored:
        head = ", ".join(ignored[:show]) + (" ..." if len(ignored) > show else "")
        print(f"[ingest] {len(ignored)} files outside the fMoW-rgb layout ignored: {head}",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
