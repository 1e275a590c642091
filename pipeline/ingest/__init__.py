"""Ingest: raw imagery -> pyramids + manifest, in parallel, resumable, with a rejects table.

Owns the engine (``engine``: one dask task per scene, decode, checks, completion markers), the
fMoW-rgb layout (``fmow``: folders + JSON) and plain folders of images with a labels CSV
(``folder``). May import ``pipeline.store``; not the reader, training or tracking.
"""
