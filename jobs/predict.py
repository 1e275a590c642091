"""Predict with a registered model: from scene pyramids by URI, or from image files.

    python jobs/predict.py --model models:/fmow-demo@champion --uri data/demo/pyramids/val/airport_0_0
    python jobs/predict.py --model models:/fmow-demo@champion --image photo.jpg [--compact]

Prints one JSON object per line and scene: ``key``, ``label``, ``class``, ``probabilities``,
``attention`` (h x w map over the view), ``boxes`` (level-0 ``[y0, x0, y1, x1]`` of the patches
read) and ``weights`` (``--compact`` leaves out the last three). A scene that cannot be read (a missing
or corrupt shard, no pyramid: the reader names the scene, level and shard or chunk) does not
stop the others: it gets a line ``{"key": uri, "error": "<error class>: <message>"}`` and the
same message on stderr, and the others are predicted. Exit status: 0 every input predicted;
3 some scenes could not be read (the rest printed); 1 the model could not be loaded, or no
input could be predicted. Only the model's safetensors weights and JSON spec are downloaded
from the registry, and the network is rebuilt with the installed project's code
(``pipeline.track.tracking.load_predictor``): no code or pickle stored with the model runs.
Tracking URI: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the work tree's
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
    """Print predictions; 0 on success, 3 when some scenes could not be read (the others are
    printed), 1 when the model or every input cannot be read."""
    args = parse_args(argv)
    from pipeline.track import tracking

    params = {"seed": args.seed, "batch_size": args.batch_size}
    try:
        predictor = tracking.load_predictor(args.model, args.tracking_uri)
        if args.uri:
            records = predict_uris(predictor, list(args.uri), params)
        else:
            images = [read_image(p) for p in args.image]
            records = predictor.predict_any({"images": images}, params)
            for record, path in zip(records, args.image, strict=True):
                record["key"] = str(path)
    except Exception as err:
        print(f"error: prediction with {args.model} failed: {err}", file=sys.stderr)
        return 1
    for record in records:
        if "error" in record:
            print(f"error: {record['key']}: {record['error']}", file=sys.stderr)
        elif args.compact:
            record = {k: v for k, v in record.items() if k not in ("attention", "boxes", "weights")}
        print(json.dumps(record))
    failed = sum("error" in r for r in records)
    return 0 if not failed else (1 if failed == len(records) else 3)


def predict_uris(predictor, uris: list[str], params: dict) -> list[dict]:
    """Records of every URI, in order: all in one call, or, when that fails, one call per URI,
    a scene that fails giving ``{"key", "error"}`` (its error class and message)."""
    try:
        return predictor.predict_any({"uris": uris}, params)
    except Exception:  # find which scenes fail: each alone
        pass
    records = []
    for uri in uris:
        try:
            records.extend(predictor.predict_any({"uris": [uri]}, params))
        except Exception as err:
            records.append({"key": uri, "error": f"{type(err).__name__}: {err}"})
    return records


if __name__ == "__main__":
    sys.exit(main())
