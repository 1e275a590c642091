"""Storage: data at rest and how it is reached.

Owns URIs and stores (``storage``: local path, ``file://``, ``s3://`` through obstore,
``memory://``), the counting wrapper that makes "only the attended chunks are read" an exact
assertion (``counting``), the pyramid format (``pyramid``: OME-Zarr 0.5 multiscale groups, zarr
v3, sharded, written and opened) and the Parquet manifest (``manifest``). The bottom layer: it
imports nothing else of ``pipeline`` and nothing of ``models``.
"""
