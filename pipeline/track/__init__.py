"""Tracking: the only room that imports MLflow (lazily, so importing it stays cheap).

Owns runs, metrics and the registry (``tracking``), the logged model (``packaging``: safetensors
weights + a JSON spec, no pickle; ``pyfunc_entry`` is the file MLflow runs to declare it),
pictures of where a model looked (``pictures``) and champion / candidate promotion
(``promotion``). May import ``pipeline.read`` (evaluation reads scenes) and ``pipeline.store``;
never ``pipeline.train``: training reports to a tracker, trackers know nothing of training.
"""
