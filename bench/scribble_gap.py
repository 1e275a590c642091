"""How much of a Megapixel MNIST model's test error comes from the scribbles it never saw.

    PYTHONPATH=$PWD python bench/scribble_gap.py MODEL.pt [--n 300] [--json]

``MODEL.pt`` is a model ``bench/learning.py --save-models DIR`` wrote. The reference protocol
paints its noise scribbles from a bank of 50 per split, and the train and test banks differ
(issue 16): a model can learn to ignore the 50 training scribbles without learning to ignore
scribbles in general. This evaluates the model (eval mode, as ``bench/learning.py`` does) on
the first ``--n`` canvases of four kinds, same layouts, only the bank swapped:

  ``test``: test digits, test scribbles (what ``bench/learning.py`` reports);
  ``test_digits_train_scribbles``: the same test canvases painted with the training bank;
  ``train_digits_test_scribbles``: training canvases painted with the test bank;
  ``train``: training canvases as trained on.

A large gap between the first two (and between the last two) says the model overfits the
training bank, not the training digits. ``wrong_as`` counts, per kind, the wrong answers by
the class given (scribbles read as digits show up as one class given far more often than
the others). With ``--json`` the last line is one JSON object: ``acc``, ``digits_seen`` and
``wrong_as`` (ten counts, classes 0-9) per kind, and ``n``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.learning import Setup, Split, canvas_spec, evaluate, load_saved, split_of
from pipeline.synth.megapixel_mnist import MegapixelMNISTSource

# kind -> (split of the digits and layouts, split of the scribble bank)
KINDS = {
    "test": ("test", "test"),
    "test_digits_train_scribbles": ("test", "train"),
    "train_digits_test_scribbles": ("train", "test"),
    "train": ("train", "train"),
}


def canvases(setup: Setup, split: str, bank: str, n: int) -> Split:
    """The first ``n`` canvases of ``split`` with their scribbles drawn from ``bank``'s bank
    (same scribble indices and places); the views are those of the repainted canvases."""
    source = MegapixelMNISTSource(canvas_spec(setup), split, n)
    for key, lay in source.layouts.items():
        source.layouts[key] = dataclasses.replace(lay, split=bank)
    return split_of(source, setup.view)


def measure(path: str | Path, n: int) -> dict:
    """Accuracy and digits seen of the saved model on each of ``KINDS`` (``n`` canvases)."""
    model, setup = load_saved(path)
    torch.set_num_threads(setup.threads)
    acc, seen, wrong_as = {}, {}, {}
    for kind, (split, bank) in KINDS.items():
        data = canvases(setup, split, bank, n)
        ev = evaluate(model, data)
        acc[kind], seen[kind] = ev["acc"], ev["digits_seen"]
        wrong = ev["predicted"][ev["predicted"] != data.labels]
        wrong_as[kind] = torch.bincount(wrong, minlength=10).tolist()
    return dict(model=str(path), n=n, acc=acc, digits_seen=seen, wrong_as=wrong_as)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .pt file from bench/learning.py --save-models")
    p.add_argument("--n", type=int, default=300, help="canvases of each kind")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a = p.parse_args(argv)
    report = measure(a.model, a.n)
    for kind, acc in report["acc"].items():
        seen = report["digits_seen"][kind]
        print(f"{kind:<30} acc {acc:.3f}" + (f"  digits seen {seen:.2f}" if seen is not None else "")
              + f"  wrong answers by class given {report['wrong_as'][kind]}")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
