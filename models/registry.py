"""Model registry: ``create_model(name, **overrides)`` and ``list_models()``.

Each model family registers its variants with ``@register_model("name")`` on a factory that
takes plain keyword arguments and passes them on, over the variant's defaults:
``def tnet(**kwargs): return TNet(**{**DEFAULTS, **kwargs})``, so that a constructor's signature
is written once (in the class). ``create_model`` records ``model.spec = {"name", "kwargs"}``
(JSON-serialisable), which is all a checkpoint or the MLflow registry needs to rebuild the
model before loading its weights: no pickled objects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from models.protocol import AttentionModel

_FACTORIES: dict[str, Callable[..., AttentionModel]] = {}

# Modules that register models; imported lazily on the first lookup so that
# `import models.registry` stays cheap and a broken family does not hide the others' errors.
_FAMILY_MODULES = (
    "models.lowres",
    "models.ats",
    "models.zoom_in",
    "models.tnet",
    "models.racnn",
    "models.residual_attention",
    "models.stn",
    "models.dasnet",
    "models.two_level",
)
_loaded = False


def register_model(name: str) -> Callable[[Callable[..., AttentionModel]], Callable[..., AttentionModel]]:
    """Decorator: register ``factory`` under ``name`` (must be unique)."""

    def wrap(factory: Callable[..., AttentionModel]) -> Callable[..., AttentionModel]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model name {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the family exists but one of its imports is missing
                raise
    _loaded = True


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _load_families()
    return sorted(_FACTORIES)


def model_module(name: str) -> str:
    """The module whose factory registered ``name`` (tests register throw-away models too)."""
    _load_families()
    return _FACTORIES[name].__module__


def create_model(name: str, **overrides: Any) -> AttentionModel:
    """Build the model registered as ``name`` with keyword ``overrides`` of its defaults."""
    _load_families()
    if name not in _FACTORIES:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_FACTORIES))}")
    try:
        model = _FACTORIES[name](**overrides)
    except TypeError as err:
        raise TypeError(f"bad arguments for model {name!r}: {err}") from err
    model.spec = {"name": name, "kwargs": dict(overrides)}
    return model
