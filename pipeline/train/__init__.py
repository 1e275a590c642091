"""Training: from a config and a manifest to a trained, tracked, checkpointed model.

Owns the configuration (``config``: frozen dataclasses, YAML + ``--set`` overrides), Ray Data
(``data``: manifest rows + views), micro-batches whose reads overlap compute (``microbatch``),
gradient averaging for coroutine models (``grad_sync``), checkpoints (``checkpoint``), the
Ray-free per-step loop (``loop``), the Ray Train worker around it (``worker``) and the driver
that wires Ray, the data and the tracker (``driver``). The top layer: it may import every other
room of ``pipeline``.
"""
