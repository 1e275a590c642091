"""Pictures for MLflow: attention maps with the chosen patches, and confusion matrices.

Pillow and numpy only (no matplotlib). Every function returns PNG bytes or plain data, never
writes files: the tracker decides where they go.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchor colours of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno").
_COLOURS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_BOX_COLOUR = (0, 255, 128)
_TEXT_COLOUR = (255, 255, 255)


def colormap(values: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours for values in [0, 1] (clipped), dark = low, bright = high."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_COLOURS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_COLOURS) - 1)
    t = (v - lo)[..., None]
    return np.rint(_COLOURS[lo] * (1 - t) + _COLOURS[hi] * t).astype(np.uint8)


def to_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a (C, H, W) or (H, W) tensor/array, float in [0, 1] or uint8.

    One channel is repeated; more than three keep the first three.
    """
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(array[:3], 0, -1))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _upscale(array: np.ndarray, min_side: int) -> Image.Image:
    image = Image.fromarray(array)
    factor = max(1, -(-min_side // max(1, min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _draw_boxes(
    draw: ImageDraw.ImageDraw,
    boxes: np.ndarray,
    weights: np.ndarray | None,
    scale_yx: tuple[float, float],
    offset_xy: tuple[int, int],
) -> None:
    """Outline level-0 ``[y0, x0, y1, x1]`` boxes; line width grows with the box's weight."""
    wmax = float(np.max(weights)) if weights is not None and len(weights) else 1.0
    for k, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        rel = float(weights[k]) / wmax if weights is not None and wmax > 0 else 1.0
        width = 1 + int(round(2 * max(0.0, rel)))
        sy, sx = scale_yx
        ox, oy = offset_xy
        draw.rectangle(
            [ox + x0 * sx, oy + y0 * sy, ox + x1 * sx - 1, oy + y1 * sy - 1],
            outline=_BOX_COLOUR,
            width=width,
        )


def attention_overlay_png(
    view: Any,
    attention: Any | None,
    boxes: Any | None,
    level0_size: Sequence[int],
    weights: Any | None = None,
    title: str | None = None,
    min_side: int = 256,
) -> bytes:
    """One picture per scene: the view with the chosen patches | the attention map over it.

    Args:
        view: (C, h, w) low-resolution view, float in [0, 1] or uint8.
        attention: (ha, wa) attention probabilities over the view's positions, or None.
        boxes: (K, 4) level-0 ``[y0, x0, y1, x1]`` boxes that were read, or None.
        level0_size: (H, W) of the scene at level 0, to map boxes onto the view.
        weights: (K,) weights of the boxes (wider outline = larger weight), or None.
        title: text written on top (e.g. ``"true: airport  pred: port (0.71)"``).
        min_side: the picture is upscaled (nearest) until the view's short side reaches this.
    Returns PNG bytes; the attention panel is the map normalised to its maximum, blended 60/40
    over the view (grey when no map was given).
    """
    rgb = to_rgb(view)
    h, w = rgb.shape[:2]
    if attention is not None:
        att = np.asarray(
            attention.detach().cpu() if hasattr(attention, "detach") else attention,
            dtype=np.float64,
        )
        att = att / att.max() if att.max() > 0 else att
        heat = np.asarray(Image.fromarray(colormap(att)).resize((w, h), Image.NEAREST))
        blended = np.rint(0.6 * heat + 0.4 * rgb).astype(np.uint8)
    else:
        blended = np.full_like(rgb, 128)
    left, right = _upscale(rgb, min_side), _upscale(blended, min_side)
    header = 16 if title else 0
    canvas = Image.new("RGB", (left.width + right.width + 4, left.height + header), (0, 0, 0))
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + 4, header))
    draw = ImageDraw.Draw(canvas)
    if boxes is not None:
        box_array = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes).reshape(
            -1, 4
        )
        w_array = None
        if weights is not None:
            w_array = np.asarray(
                weights.detach().cpu() if hasattr(weights, "detach") else weights, dtype=np.float64
            ).reshape(-1)
        scale = (left.height / float(level0_size[0]), left.width / float(level0_size[1]))
        for offset_x in (0, left.width + 4):
            _draw_boxes(draw, box_array, w_array, scale, (offset_x, header))
    if title:
        draw.text((2, 2), title, fill=_TEXT_COLOUR, font=ImageFont.load_default())
    return _png(canvas)


def confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], num_classes: int
) -> np.ndarray:
    """(C, C) int64 counts; row = true label, column = predicted label."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(
        matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1
    )
    return matrix


def _names(matrix: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    n = matrix.shape[0]
    if class_names is None:
        return [str(i) for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}x{n} confusion matrix")
    return [str(c) for c in class_names]


def confusion_csv(matrix: Any, class_names: Sequence[str] | None = None) -> str:
    """CSV text: header ``true\\pred,<names...>``, then one row per true class."""
    matrix = np.asarray(matrix, dtype=np.int64)
    names = _names(matrix, class_names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\pred", *names])
    for name, row in zip(names, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    return buffer.getvalue()


def confusion_dict(matrix: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-ready ``{"classes", "matrix", "accuracy", "per_class_recall"}``."""
    matrix = np.asarray(matrix, dtype=np.int64)
    total = int(matrix.sum())
    rows = matrix.sum(axis=1)
    return {
        "classes": _names(matrix, class_names),
        "matrix": matrix.tolist(),
        "accuracy": float(np.trace(matrix) / total) if total else None,
        "per_class_recall": [float(matrix[i, i] / r) if r else None for i, r in enumerate(rows)],
    }


def confusion_png(matrix: Any, class_names: Sequence[str] | None = None, cell: int = 0) -> bytes:
    """Heat map of the row-normalised matrix (recall per true class), counts written in cells.

    ``cell`` is the side of one cell in pixels (0: chosen from the number of classes).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    names = _names(matrix, class_names)
    n = matrix.shape[0]
    cell = cell or max(12, min(48, 640 // max(n, 1)))
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    font = ImageFont.load_default()
    label_w = min(160, 8 + 6 * max((len(s) for s in names), default=1))
    title = "true \\ predicted (row-normalised)"
    width = max(label_w + n * cell, 4 + int(font.getlength(title)))
    canvas = Image.new("RGB", (width, 14 + n * cell), (255, 255, 255))
    grid = np.repeat(np.repeat(colormap(norm), cell, axis=0), cell, axis=1)
    canvas.paste(Image.fromarray(grid), (label_w, 14))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=(0, 0, 0), font=font)
    for i, name in enumerate(names):
        draw.text(
            (2, 14 + i * cell + cell // 2 - 5),
            name[: (label_w - 8) // 6],
            fill=(0, 0, 0),
            font=font,
        )
        if cell >= 24:
            for j in range(n):
                colour = (0, 0, 0) if norm[i, j] > 0.6 else (255, 255, 255)
                draw.text(
                    (label_w + j * cell + 3, 14 + i * cell + cell // 2 - 5),
                    str(matrix[i, j]),
                    fill=colour,
                    font=font,
                )
    return _png(canvas)
