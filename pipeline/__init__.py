"""Storage, pyramids, ingest, the attended-chunk reader, Ray data and training, tracking."""
