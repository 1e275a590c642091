"""Ingest a plain folder of images (anything Pillow reads: jpg, png, tif, ...) with a CSV of
labels into one pyramid per image plus a Parquet manifest (the same format as fMoW's).

    python jobs/ingest_folder.py --src data/mine/raw --dst data/mine/pyramids \
        [--labels <src>/labels.csv] [--manifest URI] [--classes a,b,c] [--workers 2] \
        [--coarsest 256] [--scheduler threads] [--progress-s 5] [--verbose]

The CSV has a header ``path,label`` (optionally ``,split``; default split ``train``), paths
relative to ``--src``. Classes: the sorted distinct labels (numeric order for integer labels)
unless ``--classes`` lists them (then other labels are rejected as unknown). Images the CSV
does not name are listed on stderr and not ingested. Resumable like ``ingest_fmow.py``.

Exit status: 0 every row went in; 3 some rows were rejected (see ``<manifest>.rejects.*``);
1 fatal (no CSV, malformed CSV, nothing to ingest); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.ingest import engine as ingest
from pipeline.ingest import folder as image_folder
from pipeline.store import manifest, storage

EXIT_OK, EXIT_FATAL, EXIT_REJECTS = 0, 1, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", required=True, help="folder of images (local path or URI)")
    p.add_argument("--dst", required=True, help="pyramid root URI")
    p.add_argument("--labels", help="labels CSV URI (default: <src>/labels.csv)")
    p.add_argument("--classes", help="comma-separated class names, in label order")
    ingest.add_engine_options(p, unit="images")
    args = p.parse_args(argv)
    ingest.check_engine_options(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels_uri = args.labels or storage.join_uri(args.src, "labels.csv")
    try:
        rows = image_folder.parse_labels_csv(storage.read_bytes(labels_uri), labels_uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"[ingest] {exc}", file=sys.stderr)
        return EXIT_FATAL
    if not rows:
        print(f"[ingest] labels CSV {labels_uri} has no rows", file=sys.stderr)
        return EXIT_FATAL
    if args.classes:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    else:
        classes = image_folder.folder_class_list(r.label for r in rows)
    unlabelled = image_folder.unlabelled_images(args.src, rows)
    if unlabelled:
        head = ", ".join(unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else "")
        print(f"[ingest] {len(unlabelled)} images not in {labels_uri}, not ingested: {head}",
              file=sys.stderr)
    tasks = image_folder.folder_tasks(args.src, rows)
    print(f"[ingest] {len(tasks)} images, {len(classes)} classes, {args.src} -> {args.dst}",
          file=sys.stderr)
    report = ingest.run_ingest(
        tasks, image_folder.load_folder_scene, classes, args.dst, coarsest=args.coarsest,
        workers=args.workers, scheduler=args.scheduler, progress_s=args.progress_s,
        verbose=args.verbose,
    )
    manifest_uri = args.manifest or storage.join_uri(args.dst, "manifest.parquet")
    manifest.write_manifest(manifest_uri, report.rows, classes, report.rejects)
    print(ingest.summary(report, manifest_uri), file=sys.stderr)
    return EXIT_OK if report.all_in else EXIT_REJECTS


if __name__ == "__main__":
    sys.exit(main())
