"""Reading: the attended-chunk reader, which serves pixels to models through the pixel protocol.

Owns the pure planner (``plan``: boxes -> chunks -> coalesced byte ranges), the async executor
that runs a plan against a store with caches and exact counts (``reader``: ``ZarrPixelSource``),
the same reader in a child process per worker (``process``), and the one place where reader
settings and sources are built. May import ``pipeline.store`` and ``models.protocol``; nothing
above it (no Ray, no MLflow).
"""
