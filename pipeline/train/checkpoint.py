"""Training checkpoints: everything needed to continue a run exactly, and nothing pickled.

A checkpoint directory holds
- ``state.pt``: model state dict (parameters *and* buffers, so running baselines come back),
  optimiser and scheduler state dicts, and the random states of every rank (torch, numpy,
  python, the sampling generator). Tensors, numbers, strings, lists and dicts only, so it loads
  with ``torch.load(weights_only=True)``: opening a checkpoint never runs code from it.
- ``meta.json``: next epoch, global step, the model's ``spec`` (registry name + kwargs), the
  resolved training config and the metrics of the epoch that wrote it.

``load_model`` rebuilds a model from a checkpoint alone (``create_model(spec) + weights``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it keeps


@dataclass(frozen=True, slots=True)
class Restored:
    """What a checkpoint says about where to continue.

    Attributes:
        epoch: the next epoch to run (0-based). step: optimiser steps done so far.
        rank_rng: per-rank random states (index = rank), see ``capture_rng``.
        config: the resolved training config (nested dict). metrics: last reported metrics.
    """

    epoch: int
    step: int
    rank_rng: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def capture_rng(sampling: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random states as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _plain(random.getstate()),
    }
    if sampling is not None:
        state["sampling"] = sampling.get_state()
    return state


def restore_rng(state: dict[str, Any], sampling: torch.Generator | None = None) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if sampling is not None and "sampling" in state:
        sampling.set_state(state["sampling"])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    step: int,
    rank_rng: list[dict[str, Any]],
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created); returns it.

    ``epoch`` is the next epoch to run, ``step`` the optimiser steps done.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "rank_rng": rank_rng,
        },
        directory / STATE_FILE,
    )
    meta = {
        "epoch": epoch,
        "step": step,
        "spec": getattr(model, "spec", None),
        "config": config,
        "metrics": metrics or {},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory."""
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"checkpoint metadata {path} is missing or unreadable: {err}") from err


def load_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> Restored:
    """Load weights (and optimiser/scheduler state when given) in place; returns where to go on."""
    directory = Path(directory)
    meta = read_meta(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    return Restored(
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        rank_rng=state["rank_rng"],
        config=meta.get("config", {}),
        metrics=meta.get("metrics", {}),
    )


def load_model(directory: str | Path) -> nn.Module:
    """The model saved in a checkpoint, rebuilt from its registry spec, in eval mode."""
    from models.registry import create_model

    meta = read_meta(directory)
    spec = meta.get("spec")
    if not spec:
        raise RuntimeError(f"checkpoint {directory} has no model spec (was it built by create_model?)")
    model = create_model(spec["name"], **spec["kwargs"])
    load_checkpoint(directory, model=model)
    return model.eval()


def remove_orphan_checkpoints(run_dir: str) -> list[str]:
    """Delete the ``checkpoint_*`` folders under ``run_dir`` (storage path / run name, a local
    path or an ``s3://`` URI) that Ray Train's snapshot (``SNAPSHOT_FILE``) does not list;
    returns their names, sorted. Nothing is deleted without a snapshot.

    Ray Train deletes the checkpoints beyond ``num_to_keep`` it knows about, but one that was
    restored from when a worker died stayed in S3, listed nowhere (``bench/faults.py
    worker_killed``), as does a folder whose upload a killed worker left half done."""
    import json

    from pipeline.store import storage

    base = run_dir.rstrip("/")
    keys = storage.list_prefix(base)
    if f"{base}/{SNAPSHOT_FILE}" not in keys:
        return []
    results = json.loads(storage.read_bytes(f"{base}/{SNAPSHOT_FILE}"))["checkpoint_results"]
    kept = {r["checkpoint_dir_name"] for r in results}
    removed = set()
    for key in keys:
        folder = key[len(base) + 1:].split("/", 1)[0]
        if folder.startswith("checkpoint_") and folder not in kept | {SNAPSHOT_FILE}:
            storage.delete_object(key)
            removed.add(folder)
    for folder in removed if "://" not in base else ():  # local: the emptied folders too
        for sub in sorted(Path(base, folder).glob("**/"), reverse=True):
            sub.rmdir()
    return sorted(removed)
