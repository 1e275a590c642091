"""Everything around the models: storage, reading, ingest, generated data, training, tracking.

One sub-package per role; each says in its ``__init__`` what it owns and what it may import.
The layers, checked by import-linter (``pyproject.toml``), from the bottom up::

    store            URIs -> stores, request counting, the pyramid and manifest formats
    read | ingest    the attended-chunk reader; raw imagery -> pyramids + manifest
    synth            generated data (and the demo's, generated then ingested)
    track            MLflow (its only importer), the logged model, pictures, promotion
    train            config, Ray Data, the per-worker loop, checkpoints, the driver

A room imports only rooms below it; rooms on one line do not import each other. ``models/``
(pure PyTorch, no I/O) sits beside all of them, and ``jobs/`` and ``bench/`` on top.
See ``docs/architecture.md`` for the data flow.
"""
