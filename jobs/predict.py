"""Predict with a registered model: from scene pyramids by URI, or from image files.

    python jobs/predict.py --model models:/fmow-demo@champion --uri data/demo/pyramids/val/airport_0_0
    python jobs/predict.py --model models:/fmow-demo@champion --image photo.jpg [--compact]

Prints one JSON object per line and scene: ``key``, ``label``, ``class``, ``probabilities``,
``attention`` (h x w map over the view), ``boxes`` (level-0 ``[y0, x0, y1, x1]`` of the patches
read) and ``weights`` (``--compact`` leaves out the last three). The model is loaded through
MLflow from its code, safetensors weights and JSON spec (``pipeline.track.packaging``): nothing is
unpickled. Tracking URI: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the work tree's
``mlflow.db``. S3 pyramids use the usual AWS variables (``AWS_ENDPOINT_URL`` for a local server).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Pillow modes kept with one channel; every other mode is converted to RGB.
GREY_MODES = {"1", "L", "I", "I;16", "F"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, ..."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--uri", action="append", help="scene pyramid URI (repeatable)")
    source.add_argument("--image", action="append", type=Path, help="image file (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: see above)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's sampling")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compact", action="store_true", help="leave out attention/boxes/weights")
    return parser.parse_args(argv)


def read_image(path: Path) -> np.ndarray:
    """(H, W) for grey files, (H, W, 3) uint8 for every other mode (via Pillow); ``.npy`` as is."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in GREY_MODES:
            array = np.asarray(image)
            if array.dtype != np.uint8:  # 16-bit or float greys: scale into 0..255
                span = float(array.max() - array.min()) or 1.0
                array = np.rint((array - array.min()) * (255.0 / span)).astype(np.uint8)
            return array
        return np.asarray(image.convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    """Print predictions; 0 on success, 1 when the model or an input cannot be read."""
    args = parse_args(argv)
    from pipeline.track import tracking

    params = {"seed": args.seed, "batch_size": args.batch_size}
    try:
        model = tracking.load_pyfunc(args.model, args.tracking_uri)
        if args.uri:
            records = model.predict({"uris": list(args.uri)}, params=params)
        else:
            images = [read_image(p) for p in args.image]
            records = model.predict({"images": images}, params=params)
            for record, path in zip(records, args.image, strict=True):
                record["key"] = str(path)
    except Exception as err:
        print(f"error: prediction with {args.model} failed: {err}", file=sys.stderr)
        return 1
    for record in records:
        if args.compact:
            record = {k: v for k, v in record.items() if k not in ("attention", "boxes", "weights")}
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
