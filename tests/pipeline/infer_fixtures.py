"""A tiny manifest of pyramids and a registered model for the batch-inference tests.

``write_brightness_manifest`` writes ``brightness_scenes`` (48 px, dark = 0 / bright = 1) as
pyramids under any storage URI, with a manifest whose splits alternate train / val / test;
``register_brightness`` logs ``brightness_model`` (right on every scene) and points
``models:/NAME@champion`` at it.
"""

from __future__ import annotations

import json

from pipeline.store import storage
from pipeline.store.manifest import write_manifest
from pipeline.store.pyramid import open_pyramid, write_pyramid
from pipeline.track import tracking
from tests.pipeline.tracking_fixtures import brightness_model, brightness_scenes

CLASSES = ["dark", "bright"]
SPLITS = ("train", "val", "test")


def write_brightness_manifest(root_uri: str, n: int = 8, seed: int = 0) -> str:
    """``n`` brightness scenes as pyramids under ``root_uri/pyramids`` and their manifest at
    ``root_uri/manifest.parquet`` (returned); scene ``i`` is in split ``SPLITS[i % 3]``."""
    source, keys, labels = brightness_scenes(n, seed=seed)
    rows = []
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        image = source.pyramids[key][0].numpy()
        uri = write_pyramid(storage.join_uri(root_uri, "pyramids"), key, image,
                            {"label": label}, coarsest=16)
        shapes = [list(s[1:]) for s in open_pyramid(uri).level_shapes]
        rows.append({
            "scene_id": key, "split": SPLITS[i % 3], "category": CLASSES[label], "label": label,
            "uri": uri, "height": image.shape[1], "width": image.shape[2], "channels": 3,
            "num_levels": len(shapes), "level_shapes": json.dumps(shapes), "box": None,
            "gsd": None, "timestamp": None, "source": f"generated:{key}",
        })
    manifest = storage.join_uri(root_uri, "manifest.parquet")
    write_manifest(manifest, rows, CLASSES)
    return manifest


def register_brightness(tracking_uri: str, name: str = "tiny-batch", sign: float = 1.0) -> str:
    """Log ``brightness_model(sign)`` and register it as ``name@champion``; its version."""
    tracker = tracking.MlflowTracker("batch-predict", tracking_uri)
    tracker.start(f"k-{name}-{sign}")
    model_uri = tracker.log_model(brightness_model(sign), classes=CLASSES)
    version = tracker.register(model_uri, name, alias="champion")
    tracker.end()
    return version


def delete_shards(scene_uri: str) -> int:
    """Delete every shard object of a scene (its metadata stays); how many were deleted."""
    shards = [u for u in storage.list_prefix(scene_uri) if "/c/" in u]
    for shard in shards:
        storage.delete_object(shard)
    return len(shards)
