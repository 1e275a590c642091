"""Pictures: exact pixel placement of boxes and attention, confusion matrices as numbers."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.track import pictures as visualize


def _open(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_colormap_is_ordered_from_dark_to_bright():
    colours = visualize.colormap(np.linspace(0, 1, 11)).astype(int)
    brightness = colours.sum(axis=1)
    assert colours[0].tolist() == [0, 0, 4] and colours[-1].tolist() == [252, 255, 164]
    assert np.all(np.diff(brightness) > 0)
    assert visualize.colormap(np.array([-1.0, 2.0])).tolist() == [[0, 0, 4], [252, 255, 164]]


def test_to_rgb_accepts_float_uint8_and_grey():
    grey = torch.full((1, 4, 5), 0.5)
    assert visualize.to_rgb(grey).shape == (4, 5, 3)
    assert visualize.to_rgb(grey)[0, 0].tolist() == [128, 128, 128]
    rgba = np.zeros((4, 2, 3), dtype=np.uint8)
    rgba[2] = 200
    assert visualize.to_rgb(rgba)[0, 0].tolist() == [0, 0, 200]
    with pytest.raises(ValueError, match="shape"):
        visualize.to_rgb(np.zeros((1, 2, 3, 4)))


def test_overlay_puts_boxes_where_the_level0_boxes_are():
    view = torch.zeros(3, 16, 16)  # black view, so any green pixel is a box outline
    attention = torch.zeros(4, 4)
    attention[3, 0] = 1.0  # bottom-left cell
    # scene 64x64 at level 0 -> view 16x16 -> upscaled 16x to 256: 1 level-0 px = 4 picture px
    boxes = torch.tensor([[8, 16, 24, 40]])
    png = visualize.attention_overlay_png(view, attention, boxes, (64, 64), torch.tensor([1.0]))
    pixels = _open(png)
    assert pixels.shape == (256, 2 * 256 + 4, 3)
    green = np.all(pixels == visualize._BOX_COLOUR, axis=-1)
    ys, xs = np.nonzero(green[:, :256])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (32, 95, 64, 159)
    ys2, xs2 = np.nonzero(green[:, 260:])
    assert (ys2.min(), ys2.max(), xs2.min(), xs2.max()) == (32, 95, 64, 159)
    # attention panel: the attended cell (rows 192.., cols 0..63) is the bright end of the map
    bright = np.rint(0.6 * visualize.colormap(np.array(1.0)).astype(float)).astype(int)
    assert pixels[200, 260 + 10].tolist() == bright.tolist()
    assert pixels[10, 260 + 200].tolist() == [0, 0, 2]  # 0.6 * darkest colour over black


def test_overlay_with_title_and_without_attention():
    png = visualize.attention_overlay_png(
        torch.rand(3, 20, 30), None, None, (200, 300), title="true: a"
    )
    pixels = _open(png)
    # short side 20 -> upscaled by 13 to 260 px, plus a 16 px title bar
    assert pixels.shape == (260 + 16, 2 * 390 + 4, 3)
    assert pixels[16 + 100, 390 + 4 + 100].tolist() == [128, 128, 128]


def test_confusion_matrix_counts_and_exports():
    matrix = visualize.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    csv_text = visualize.confusion_csv(matrix, ["a", "b", "c"])
    assert csv_text == "true\\pred,a,b,c\na,1,1,0\nb,0,1,0\nc,1,0,2\n"
    info = visualize.confusion_dict(matrix, ["a", "b", "c"])
    assert info["accuracy"] == pytest.approx(4 / 6)
    assert info["per_class_recall"] == pytest.approx([0.5, 1.0, 2 / 3])
    json.dumps(info)
    with pytest.raises(ValueError, match="2 class names"):
        visualize.confusion_csv(matrix, ["a", "b"])


def test_confusion_png_has_one_cell_per_pair():
    matrix = np.array([[5, 0], [2, 3]])
    pixels = _open(visualize.confusion_png(matrix, ["x", "y"], cell=30))
    label_w = 8 + 6 * 1
    assert pixels.shape[0] == 14 + 60 and pixels.shape[1] >= label_w + 60  # wide enough for the title
    # row 0 is [1.0, 0.0] after normalisation: bright then dark (sampled away from the text)
    assert pixels[14 + 27, label_w + 27].tolist() == [252, 255, 164]
    assert pixels[14 + 27, label_w + 30 + 27].tolist() == [0, 0, 4]
