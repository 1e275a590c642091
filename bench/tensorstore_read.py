"""The same patch reads through tensorstore (Google's C++ Zarr engine), for comparison.

``TensorstoreReader(scene_uri).read(boxes, size)`` opens level 0 of a pyramid written by
``pipeline.store.pyramid`` with tensorstore's ``zarr3`` driver (sharding included) in a fresh
context (an empty cache: a cold read, like a fresh ``ZarrPixelSource``), reads every box's
region at once (all reads in flight together on tensorstore's own thread pool), pads outside
the level with 0 and resizes with the reader's own last step (``resize_crops``, exactly
``models.memory.TensorPyramidSource``'s result), so the result is comparable pixel for pixel with the project's reader. Local directories and
``s3://`` (endpoint and credentials from the standard ``AWS_*`` variables) are supported.

``kvstore_counters(kind)`` reads tensorstore's process-wide kvstore metrics (requests and
bytes read from ``file`` or ``s3``), for the bytes column of the comparison.
"""

from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from pipeline.read.reader import resize_crops
from pipeline.store.ranges import s3_kvstore_spec
from pipeline.store.storage import join_uri, parse_uri


def kvstore_spec(scene_uri: str, level: int = 0) -> dict:
    """tensorstore's kvstore spec of a level's array directory (S3: the reader's own spec)."""
    parsed = parse_uri(scene_uri)
    if parsed.scheme == "file":
        return {"driver": "file", "path": os.path.join(parsed.root, str(level))}
    if parsed.scheme != "s3":
        raise ValueError(f"tensorstore comparison supports local and s3:// scenes, not {scene_uri}")
    return s3_kvstore_spec(join_uri(scene_uri, str(level)))


class TensorstoreReader:
    """Reads boxes of level 0 of one scene through tensorstore (see the module docstring)."""

    def __init__(self, scene_uri: str):
        self.spec = {"driver": "zarr3", "kvstore": kvstore_spec(scene_uri)}

    def read(self, boxes: Tensor, size: tuple[int, int]) -> Tensor:
        """(1, K, C, *size) float32 in [0, 1] for (1, K, 4) level-0 boxes of one scene, opened
        cold (new context: no cached metadata, shard index or chunk)."""
        import tensorstore as ts

        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        array = ts.open(self.spec, context=context, read=True).result()
        _, h, w = array.shape
        rows = boxes[0].tolist()
        pending = []
        for y0, x0, y1, x1 in rows:
            inside = (max(y0, 0), max(x0, 0), min(y1, h), min(x1, w))
            pending.append(array[:, inside[0]:inside[2], inside[1]:inside[3]].read()
                           if inside[2] > inside[0] and inside[3] > inside[1] else None)
        crops = []
        for (y0, x0, y1, x1), future in zip(rows, pending, strict=True):
            crop = np.zeros((array.shape[0], y1 - y0, x1 - x0), dtype=np.uint8)
            if future is not None:
                data = future.result()
                sy, sx = max(y0, 0) - y0, max(x0, 0) - x0
                crop[:, sy : sy + data.shape[1], sx : sx + data.shape[2]] = data
            crops.append(crop)
        return resize_crops(crops, size)[None]  # the reader's own last step, same CPU


def kvstore_counters(kind: str) -> dict[str, int]:
    """tensorstore's process-wide totals for kvstore ``kind`` (``file`` or ``s3``):
    ``{"requests", "bytes"}`` (reads issued and bytes read, since the process started)."""
    import tensorstore as ts

    out = {"requests": 0, "bytes": 0}
    for metric in ts.experimental_collect_matching_metrics(f"/tensorstore/kvstore/{kind}/"):
        name = metric["name"].rsplit("/", 1)[-1]
        value = sum(v.get("value", 0) for v in metric["values"])
        if name == "read":
            out["requests"] += value
        elif name == "bytes_read":
            out["bytes"] += value
    return out
