"""jobs/make_large_scene.py: a tiled BigTIFF of any side, its objects where it says."""

from __future__ import annotations

import pytest
import tifffile

from jobs.make_large_scene import main
from pipeline.synth.large_scene import PERIOD, background_tile, plan_objects


def test_writes_a_tiled_bigtiff_with_its_objects_and_geo_tags(tmp_path, capsys):
    out = tmp_path / "sub" / "scene.tif"
    assert main(["--side", "1000", "--out", str(out), "--tile", "128", "--objects", "5",
                 "--seed", "4", "--gsd", "0.3"]) == 0
    assert "1000 x 1000 px" in capsys.readouterr().err
    with tifffile.TiffFile(out) as tif:
        page = tif.pages.first
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
        assert page.tags[33550].value[:2] == (0.3, 0.3)
        pixels = page.asarray()
    assert pixels.shape == (1000, 1000, 3)
    boxes, colours = plan_objects(1000, 5, 4)
    for (y0, x0, y1, x1), colour in zip(boxes, colours, strict=True):
        assert (pixels[y0:y1, x0:x1] == colour).all()
    # away from the objects, in the first tile row (no gradient there): the periodic plaid
    plaid = background_tile(PERIOD)
    free = [x for x in range(0, 1000 - PERIOD, PERIOD)
            if not any(y0 < PERIOD and x0 < x + PERIOD and x1 > x for y0, x0, _, x1 in boxes)]
    assert free and all((pixels[:PERIOD, x : x + PERIOD] == plaid).all() for x in free)


@pytest.mark.parametrize("argv", [["--side", "0"], ["--side", "100", "--tile", "100"]])
def test_bad_arguments_exit_2(tmp_path, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x.tif")])
    assert exc.value.code == 2
