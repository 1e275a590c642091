"""Training configuration: frozen dataclasses with their defaults beside them.

A YAML file and ``--set a.b=c`` overrides only *override* these defaults. Unknown keys and
values of the wrong type are rejected with a message that names the key (and the file), so a
typo never silently trains the wrong thing. The resolved config is saved with the run
(``save_config``) and logged as MLflow parameters (the driver hands ``to_dict(config)`` to the
tracker, which flattens it to ``data.batch_size``-style keys; ``flat_params`` gives the same
keys without MLflow).

Sections that belong to another room are defined there and only used here: ``reader`` is
``pipeline.read.settings.ReaderSettings``. Models get ``model.overrides`` as keyword arguments
of ``models.create_model``; the config object itself stops at the driver and the worker.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.read.settings import ReaderSettings


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Which scenes, how they are batched.

    Attributes:
        manifest: URI of the Parquet manifest (local path, ``file://`` or ``s3://``).
        train_split, val_split: values of the manifest's ``split`` column.
        view_size: (h, w) of the low-resolution view in pixels; empty: the model's own.
        batch_size: scenes per optimiser step *per worker*.
        micro_batches: the step's batch is split into this many micro-batches whose reads
            overlap with the other micro-batches' compute (see ``pipeline.train.microbatch``).
        ramp_micro_batches: micro-batch sizes grow 1 : 2 : 3 ... instead of being equal, so
            the first read (the one no compute hides) is the smallest.
        read_ahead: draw the next step's micro-batches with this step's weights and read them
            while this step computes, so that no step starts by waiting for storage; the
            model importance-weights those draws to the updated weights (unbiased; see
            ``pipeline.train.read_ahead``). Models without ``propose`` (all but ATS) read as usual.
        shuffle_seed: seed of the data order: which worker gets which scenes, and each
            worker's per-epoch shuffle (``pipeline.train.worker.shuffle_seed``); -1 (the
            default): ``run.seed``, so that one seed fixes model initialisation, sampling and
            data order.
        limit: at most this many scenes per split (0: all); for smoke runs.
    """

    manifest: str = "data/demo/pyramids/manifest.parquet"
    train_split: str = "train"
    val_split: str = "val"
    view_size: tuple[int, ...] = ()
    batch_size: int = 8
    micro_batches: int = 2
    ramp_micro_batches: bool = False
    read_ahead: bool = True
    shuffle_seed: int = -1
    limit: int = 0

    def data_seed(self, run_seed: int) -> int:
        """The seed of the data order: ``shuffle_seed``, or ``run_seed`` when it is -1."""
        return run_seed if self.shuffle_seed < 0 else self.shuffle_seed


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A registered model (``models.registry``) and keyword overrides of its defaults."""

    name: str = "ats"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OptimConfig:
    """AdamW and its schedule.

    Attributes:
        lr: peak learning rate. weight_decay: AdamW decoupled decay.
        clip_norm: global gradient-norm clip (0: off). epochs: passes over the train split.
        scheduler: ``none`` or ``cosine`` (per step, down to 0 at the last step).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    epochs: int = 10
    scheduler: str = "cosine"


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """Ray Train workers. ``mixed_precision``: bf16 autocast, only when ``use_gpu``.
    ``placement_strategy``: how the workers' bundles are placed on the cluster's nodes (Ray's
    ``PACK``, ``SPREAD``, ``STRICT_PACK`` or ``STRICT_SPREAD``; ``SPREAD`` puts one worker per
    node where it can, as the production stack's demo does)."""

    num_workers: int = 2
    use_gpu: bool = False
    mixed_precision: bool = True
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"config key 'scaling.placement_strategy': "
                              f"{self.placement_strategy!r} is not one of {PLACEMENT_STRATEGIES}")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True, slots=True)
class SnesConfig:
    """dasNet's second stage (``jobs/dasnet_policy.py``): the gain policy alone, by SNES.

    Attributes:
        init: the stage-1 model: '' = the latest checkpoint of the run ``run.storage_path`` /
            ``run.name`` (a local path), else a checkpoint directory, a run directory (its
            latest checkpoint) or an MLflow model URI (``models:/NAME@alias``, ``runs:/...``).
        generations: SNES generations; each scores its population on one batch of views.
        batch_size: training scenes per generation (the batch every candidate is scored on).
        popsize: candidates per generation (0: the SNES default ``4 + floor(3 ln d)``).
        sigma0: initial search standard deviation of every policy parameter.
        seed: seed of the batch order and of the SNES noise.
        run_suffix: stage 2 is the run ``<run.name><run_suffix>`` (output directory under
            ``run.storage_path`` and MLflow run name).
    """

    init: str = ""
    generations: int = 50
    batch_size: int = 32
    popsize: int = 0
    sigma0: float = 0.5
    seed: int = 0
    run_suffix: str = "-policy"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Naming, storage, tracking and fault tolerance of one training run.

    Attributes:
        name: run name; re-running with the same name and storage path resumes.
        storage_path: where Ray Train keeps checkpoints (local dir or ``s3://``).
        mlflow_experiment: MLflow experiment name.
        register_name: registered-model name ('' = do not register); ``--register`` sets it.
        register_alias: alias given to the registered version.
        checkpoint_every: checkpoint every this many epochs (the last epoch always).
        max_failures: worker-group restarts tolerated (Ray ``FailureConfig``).
        seed: model initialisation and sampling seed.
        crash_at_step: test hook: rank 1 kills its own process (``os._exit``) once, at this
            global step, leaving a marker file so it happens only once (-1: never).
        ray_address: Ray cluster address ('' = ``RAY_ADDRESS`` or a new local instance).
    """

    name: str = "fmow"
    storage_path: str = "runs"
    mlflow_experiment: str = "fmow"
    register_name: str = ""
    register_alias: str = "champion"
    checkpoint_every: int = 1
    max_failures: int = 2
    seed: int = 0
    crash_at_step: int = -1
    ray_address: str = ""

    @property
    def run_key(self) -> str:
        """What identifies the run across resumes: its checkpoint folder (storage path / name).
        The MLflow run carries it as a tag, so a resumed or re-submitted job finds its run."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run needs; see each section's class. ``reader`` is
    ``pipeline.read.settings.ReaderSettings``, the reader's one set of defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    run: RunConfig = field(default_factory=RunConfig)
    snes: SnesConfig = field(default_factory=SnesConfig)


def _check_value(value: Any, hint: Any, key: str, origin: str) -> Any:
    """``value`` converted to ``hint`` (only lossless conversions), else ``ConfigError``."""
    where = f"{key!r} (from {origin})"
    base = typing.get_origin(hint) or hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, list | tuple):
            return tuple(_check_value(v, item, f"{key}[{i}]", origin) for i, v in enumerate(value))
    elif base is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    else:
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(
        f"config key {where}: expected {getattr(base, '__name__', base)}, "
        f"got {type(value).__name__} {value!r}"
    )


def _merge(obj: Any, updates: dict[str, Any], prefix: str, origin: str) -> Any:
    """A copy of dataclass ``obj`` with ``updates`` (a nested mapping) applied and checked."""
    if not isinstance(updates, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '<root>'!r} (from {origin}) must be a mapping"
        )
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(
                f"unknown config key {key!r} (from {origin}); known keys here: {', '.join(names)}"
            )
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, f"{key}.", origin)
        else:
            changes[name] = _check_value(value, hints[name], key, origin)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=c"`` -> ``{"a": {"b": c}}``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``).

    ``model.overrides.patch_size=64`` reaches into the model-overrides mapping.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    parts = key.strip().split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then each ``--set`` override in order."""
    config = TrainConfig()
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        config = _merge(config, loaded, "", str(path))
    for text in overrides:
        update = parse_override(text)
        # model.overrides is a free mapping: merge into it instead of replacing it
        if "model" in update and isinstance(update["model"].get("overrides"), dict):
            merged = _deep_update(config.model.overrides, update["model"]["overrides"])
            update["model"]["overrides"] = merged
        config = _merge(config, update, "", f"--set {text}")
    validate(config)
    return config


def load_job_config(path: str | Path | None, overrides: list[str] = (), register: str | None = None,
                    alias: str | None = None) -> TrainConfig:
    """``load_config``, then a job's ``--register NAME`` / ``--alias A`` applied to ``run``."""
    config = load_config(path, overrides)
    run = config.run
    if register:
        run = dataclasses.replace(run, register_name=register)
    if alias:
        run = dataclasses.replace(run, register_alias=alias)
    return dataclasses.replace(config, run=run)


def validate(config: TrainConfig) -> None:
    """Range checks that a type cannot express."""
    checks = [
        (config.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (config.data.micro_batches >= 1, "data.micro_batches must be >= 1"),
        (config.data.shuffle_seed >= -1, "data.shuffle_seed must be >= 0, or -1 for run.seed"),
        (config.data.view_size in ((),) or len(config.data.view_size) == 2, "data.view_size must be [h, w] or []"),
        (config.optim.epochs >= 1, "optim.epochs must be >= 1"),
        (config.optim.scheduler in ("none", "cosine"), "optim.scheduler must be none or cosine"),
        (config.scaling.num_workers >= 1, "scaling.num_workers must be >= 1"),
        (config.reader.concurrency >= 1, "reader.concurrency must be >= 1"),
        (config.reader.max_gap >= 0, "reader.max_gap must be >= 0"),
        (config.reader.request_timeout_s > 0, "reader.request_timeout_s must be > 0"),
        (config.reader.max_retries >= 0, "reader.max_retries must be >= 0"),
        (0 <= config.reader.retry_initial_delay_s <= config.reader.retry_max_delay_s,
         "reader.retry_initial_delay_s must be >= 0 and <= reader.retry_max_delay_s"),
        (0 <= config.reader.hedge_after_s < config.reader.request_timeout_s,
         "reader.hedge_after_s must be >= 0 (0: no hedges) and < reader.request_timeout_s"),
        (config.run.checkpoint_every >= 1, "run.checkpoint_every must be >= 1"),
        (bool(config.run.name), "run.name must not be empty"),
        (config.snes.generations >= 1, "snes.generations must be >= 1"),
        (config.snes.batch_size >= 1, "snes.batch_size must be >= 1"),
        (config.snes.popsize == 0 or config.snes.popsize >= 2, "snes.popsize must be 0 or >= 2"),
        (config.snes.sigma0 > 0, "snes.sigma0 must be > 0"),
        (bool(config.snes.run_suffix), "snes.run_suffix must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of ``to_dict`` (with the same checks as a YAML file)."""
    config = _merge(TrainConfig(), data, "", "dict")
    validate(config)
    return config


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``load_config(path)`` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def flat_params(config: TrainConfig) -> dict[str, str]:
    """``{"data.batch_size": "8", "model.overrides.n_patches": "10", ...}`` for the tracker."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", to_dict(config))
    return out
