"""Why a Zoom-In model's peak inference memory moves with the canvas: it follows how many
distinct tiles stage I picks, not the canvas's size.

Loads a model that ``bench/learning.py --save-models DIR`` wrote (``DIR/zoom_in-seed<N>.pt``)
and, on the first ``--n`` test canvases of its own setup drawn at each ``--canvases`` side
(same digits and scribbles, as ``bench/learning.py --memory-at`` does), reports per canvas
the number of distinct stage-I tiles M (1 .. ``n_patches``), the pyramid level the tiles are
read at, and the peak bytes torch allocates during one inference (batch 1, eval mode: the
deterministic stage-I apportioning). Every distinct tile costs one ``tile_view`` read and one
pass of the stage-II attention network, so the peak is bounded by its value at
M = ``n_patches``, whatever the canvas's size.

    python bench/zoom_in_memory.py /path/to/zoom_in-seed0.pt --canvases 1500,3000,6000 --json

The last line with ``--json`` is one JSON object: ``model`` (path), ``trained_at`` (canvas
side), ``n_patches``, ``tile_view`` and ``rows``: one ``{"canvas", "index", "tiles", "level",
"peak_bytes"}`` per canvas measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import models.zoom_in as zoom_in_module
from bench.learning import build_split, canvas_spec, load_saved, peak_memory_bytes


@contextmanager
def counting_tiles() -> Iterator[list[int]]:
    """While open, every Zoom-In pass appends its number of distinct stage-I tiles (largest over
    the batch) to the yielded list (``sampling.nested_plan`` is wrapped, then restored)."""
    sampling = zoom_in_module.sampling
    original, seen = sampling.nested_plan, []

    def counted(tile_idx):
        plan = original(tile_idx)
        seen.append(int(plan.valid.sum(1).max()))
        return plan

    sampling.nested_plan = counted
    try:
        yield seen
    finally:
        sampling.nested_plan = original


def measure(model, setup, canvas: int, n: int) -> list[dict]:
    """One row per test canvas 0 .. n-1 at side ``canvas`` px: distinct tiles, read level and
    peak inference bytes."""
    data = build_split(canvas_spec(setup, canvas), "test", n, setup.view)
    rows = []
    for i in range(n):
        with counting_tiles() as seen:
            peak = peak_memory_bytes(model, data, i)
        level = model.read_level(data.sizes[i:i + 1])
        rows.append(dict(canvas=canvas, index=i, tiles=max(seen),
                         level=level[0] if isinstance(level, tuple) else level, peak_bytes=peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a zoom_in-seed<N>.pt written by bench/learning.py --save-models")
    p.add_argument("--canvases", default="1500,3000,6000", help="comma-separated canvas sides (px)")
    p.add_argument("--n", type=int, default=3, help="test canvases per side")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a = p.parse_args(argv)
    model, setup = load_saved(a.model)
    if not hasattr(model, "tile_view"):
        p.error(f"{a.model} holds a {type(model).__name__}, not a Zoom-In model")
    sides = [int(s) for s in a.canvases.split(",")]
    rows = [r for side in sides for r in measure(model, setup, side, a.n)]
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    for r in rows:
        log(f"{r['canvas']} px, test canvas {r['index']}: {r['tiles']} distinct tiles read at "
            f"level {r['level']}, peak {r['peak_bytes']:,} B")
    if a.json:
        print(json.dumps(dict(model=a.model, trained_at=setup.canvas, n_patches=model.n_patches,
                              tile_view=list(model.tile_view), rows=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
