"""Inference: a registered model over many scenes, as a Ray Data job.

Owns batch prediction (``batch``): the manifest's scene rows fed to a pool of Ray actors, each
loading the model from the registry once and reading the scenes' attended chunks through the
reader, into one Parquet table of predictions (a row per scene, failures included with their
error). May import ``pipeline.track`` (the registry; never ``mlflow`` itself), ``pipeline.read``
and ``pipeline.store``; never ``pipeline.train``: it sits beside training, not on top of it.
"""
