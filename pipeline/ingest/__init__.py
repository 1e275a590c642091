"""Ingest: raw imagery -> pyramids + manifest, in parallel, resumable, with a rejects table.

Owns the engine (``engine``: one dask task per scene, decode, checks, completion markers), the
fMoW-rgb layout (``fmow``: folders + JSON), plain folders of images with a labels CSV
(``folder``), the source's published checksums (``checksums``) and tiled (Big)TIFF / GeoTIFF sources read band by band (``tiled``), so that an
image larger than memory becomes a pyramid. May import ``pipeline.store``; not the reader,
training or tracking.
"""
