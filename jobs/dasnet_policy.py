"""dasNet stage 2: train the gain policy alone with SNES, starting from a stage-1 model.

    # stage 1 (the CNN, by gradient; the policy stays zero, all gains 1):
    python jobs/train_fmow.py --config jobs/configs/fmow_dasnet.yaml --set data.manifest=M
    # stage 2 (this job; the same config and overrides find the stage-1 run):
    python jobs/dasnet_policy.py --config jobs/configs/fmow_dasnet.yaml --set data.manifest=M \\
        [--set snes.generations=100] [--set snes.init=models:/fmow-dasnet@champion] \\
        [--register fmow-dasnet [--alias champion]] [--json]

The stage-1 model is ``snes.init``: by default the latest checkpoint of the run
``run.storage_path/run.name`` (what ``train_fmow.py`` wrote with the same config), or a
checkpoint directory, a run directory, or an MLflow model URI. Its weights are loaded as they
are; only ``model.policy`` changes. Each of ``snes.generations`` generations reads the views of
``snes.batch_size`` training scenes of the manifest (the pyramids' low-resolution levels,
through the attended-chunk reader; dasNet reads nothing else), scores every SNES candidate by
accuracy on them and updates the search distribution (``models.dasnet.snes_train_policy``);
batches follow a seeded shuffle of the training split, pass after pass.

Reported: the reward per generation (printed, and the MLflow metrics ``snes/centre_reward``,
``snes/mean_reward``, ``snes/best_reward``, ``snes/sigma_mean`` at step = generation), and the
validation accuracy of the stage-1 model and of the result (``val/accuracy_stage1``,
``val/accuracy``). The result is written to ``<run.storage_path>/<run.name><snes.run_suffix>/``
(``model/`` in the packaged format, ``snes_history.json``, ``config.yaml``; local storage only)
and logged as the MLflow model of a new run of ``run.mlflow_experiment`` (one run per
invocation: SNES does not resume), registered with ``--register``. Runs on the driver: SNES is
sequential and the views are small. Exit 0 on success, 2 on a bad config or a stage-1 model
that is not a dasNet with a policy, 1 when it failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.train.config import ConfigError, TrainConfig, load_job_config

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class StageOneError(ValueError):
    """The stage-1 model cannot be used for stage 2 (not a dasNet, no policy to train)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file overriding the defaults (as train_fmow.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set snes.generations=100 (repeatable)")
    parser.add_argument("--register", metavar="NAME", help="register the resulting model under NAME")
    parser.add_argument("--alias", help="alias of the registered version (default: run.register_alias)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"[snes] {message}", flush=True)


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of a Ray Train run directory with the highest (epoch, step)."""
    from pipeline.train.checkpoint import META_FILE, read_meta

    found = []
    for directory in run_dir.glob("checkpoint_*"):
        if (directory / META_FILE).is_file():
            meta = read_meta(directory)
            found.append((int(meta.get("epoch", 0)), int(meta.get("step", 0)), directory.name, directory))
    if not found:
        raise FileNotFoundError(f"no checkpoint under {run_dir} (train stage 1 with jobs/train_fmow.py "
                                f"and the same run.name / run.storage_path, or set snes.init)")
    return max(found)[-1]


def stage_one_source(config: TrainConfig) -> str:
    """``snes.init``, or the run directory ``run.storage_path/run.name`` of stage 1."""
    from pipeline.train.driver import resolve_storage

    if config.snes.init:
        return config.snes.init
    storage = resolve_storage(config.run.storage_path)
    if "://" in storage:
        raise ConfigError(f"run.storage_path {storage} is not local: set snes.init to the stage-1 "
                          f"model's URI (models:/NAME@alias) instead")
    return str(Path(storage) / config.run.name)


def load_stage_one(init: str) -> tuple[Any, str]:
    """The stage-1 model (eval mode) and a description of where it came from.

    ``init``: an MLflow model URI (downloaded; the packaged safetensors + JSON), a checkpoint
    directory, or a run directory (its latest checkpoint).
    """
    from pipeline.track import packaging, tracking
    from pipeline.train.checkpoint import META_FILE, load_model

    if init.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory() as tmp:
            files = packaging.find_model_files(tracking.download_model(init, tmp))
            model, _ = packaging.load_model_files(files["weights"], files["spec"])
        return model, init
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"stage-1 model {init} does not exist")
    checkpoint = path if (path / META_FILE).is_file() else latest_checkpoint(path)
    return load_model(checkpoint), str(checkpoint)


def check_policy_model(model: Any) -> None:
    """Raise ``StageOneError`` unless ``model`` is a dasNet whose policy acts (passes >= 2)."""
    from models.dasnet import DasNet

    if not isinstance(model, DasNet):
        raise StageOneError(f"stage 2 trains a dasNet's gain policy; the stage-1 model is "
                            f"{type(model).__name__} ({getattr(model, 'spec', {}).get('name')})")
    if model.passes < 2:
        raise StageOneError("the stage-1 dasNet has passes=1: its policy never acts (train stage 1 "
                            "with model.overrides.passes >= 2)")


def view_batches(
    rows: dict[str, np.ndarray],
    source: Any,
    view_size: tuple[int, int],
    batch_size: int,
    count: int,
    seed: int,
) -> Iterator[tuple[Any, Any]]:
    """``count`` batches ``(views (B, C, h, w), labels (B,))`` of the rows, in a seeded shuffle
    renewed on every pass; each batch's views are read when it is needed."""
    import torch

    order = np.random.default_rng(seed)
    n = len(rows["key"])
    batch_size = min(batch_size, n)
    queue: list[int] = []
    for _ in range(count):
        if len(queue) < batch_size:
            queue.extend(order.permutation(n).tolist())
        picked, queue = queue[:batch_size], queue[batch_size:]
        keys = [str(rows["key"][i]) for i in picked]
        labels = torch.as_tensor(rows["label"][picked], dtype=torch.int64)
        yield source.view(keys, tuple(view_size)), labels


def run_policy_stage(config: TrainConfig, tracker: Any = None) -> dict[str, Any]:
    """Run stage 2 of ``config`` (see the module docstring); returns the summary."""
    import torch

    from models.dasnet import snes_train_policy
    from pipeline.read.source import open_split
    from pipeline.track.packaging import Predictor, evaluate, write_model_files
    from pipeline.track.tracking import MlflowTracker
    from pipeline.train.config import save_config, to_dict
    from pipeline.train.driver import resolve_storage

    snes = config.snes
    init = stage_one_source(config)
    model, origin = load_stage_one(init)
    check_policy_model(model)
    train = open_split(config.data.manifest, config.data.train_split, config.reader,
                       config.data.limit)
    classes = list(train.classes)
    if model.classifier.out_features != len(classes):
        raise StageOneError(f"the stage-1 model has {model.classifier.out_features} classes, the "
                            f"manifest {config.data.manifest} has {len(classes)}")
    _say(f"stage 1: {origin}")
    val = train.sibling(config.data.val_split)
    source = train.source_factory()
    view_size = tuple(model.view_size)

    name = f"{config.run.name}{snes.run_suffix}"
    storage = resolve_storage(config.run.storage_path)
    run_dir = None if "://" in storage else Path(storage) / name
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    tracker = tracker or MlflowTracker(experiment=config.run.mlflow_experiment)
    tags = {"pipeline.stage": "dasnet-policy", "pipeline.stage1": origin}
    if not config.snes.init and hasattr(tracker, "find_run"):
        stage1_run = tracker.find_run(f"{storage.rstrip('/')}/{config.run.name}")
        if stage1_run:
            tags["pipeline.stage1_run_id"] = stage1_run
    tracker.start(f"{storage.rstrip('/')}/{name}/{stamp}", params=to_dict(config), tags=tags,
                  run_name=name)
    try:
        if run_dir is not None:
            tracker.log_artifact_file(save_config(config, run_dir / "config.yaml"))
        predictor = Predictor(model=model, spec={"classes": classes}, seed=config.run.seed)
        val_keys, val_labels = val.keys, val.labels
        batch = max(1, min(snes.batch_size, 64))
        before = evaluate(predictor, source, val_keys, val_labels, batch)
        _say(f"val accuracy of the stage-1 model: {before['accuracy']:.3f} ({len(val_keys)} scenes)")
        stage1_state = {k: v.clone() for k, v in model.state_dict().items()}

        def report(index: int, record: dict[str, float]) -> None:
            _say(f"generation {index + 1}/{snes.generations}: reward of the centre "
                 f"{record['centre_reward']:.3f}, population mean {record['mean_reward']:.3f}, "
                 f"best {record['best_reward']:.3f}, sigma {record['sigma_mean']:.3f}")
            tracker.log_metrics({f"snes/{k}": v for k, v in record.items()}, step=index)

        _say(f"SNES on the policy of {model.spec['name']} ({model.gain_dim} gains, passes="
             f"{model.passes}): {snes.generations} generations of "
             f"{min(snes.batch_size, len(train.keys))} training views")
        history = snes_train_policy(
            model,
            view_batches(train.rows, source, view_size, snes.batch_size, snes.generations,
                         snes.seed),
            torch.Generator().manual_seed(snes.seed),
            sigma0=snes.sigma0,
            popsize=snes.popsize,
            on_generation=report,
        )
        changed = [k for k, v in model.state_dict().items()
                   if not k.startswith("policy.") and not torch.equal(v, stage1_state[k])]
        if changed:  # snes_train_policy only writes the policy; say so loudly if that ever breaks
            raise RuntimeError(f"stage 2 changed stage-1 weights: {changed[:5]}")
        after = evaluate(predictor, source, val_keys, val_labels, batch)
        _say(f"val accuracy after SNES: {after['accuracy']:.3f} (stage 1: {before['accuracy']:.3f})")
        metrics = {"val/accuracy_stage1": before["accuracy"], "val/loss_stage1": before["loss"],
                   "val/accuracy": after["accuracy"], "val/loss": after["loss"]}
        tracker.log_metrics(metrics, step=len(history))
        tracker.log_json(history, "snes_history.json")
        metadata = {"val_accuracy": after["accuracy"], "val_accuracy_stage1": before["accuracy"],
                    "stage": "dasnet-policy", "stage1": origin, "generations": len(history),
                    "run": name}
        model_dir = None
        if run_dir is not None:
            model_dir = run_dir / "model"
            write_model_files(model, model_dir, classes=classes, metadata=metadata)
            (run_dir / "snes_history.json").write_text(json.dumps(history, indent=1))
        model_uri = tracker.log_model(model, classes=classes, metadata=metadata)
        version = None
        if config.run.register_name and model_uri:
            version = tracker.register(model_uri, config.run.register_name, alias=config.run.register_alias)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return {
        "run": name, "run_id": tracker.run_id, "stage1": origin, "model_uri": model_uri,
        "registered_version": version, "model_dir": None if model_dir is None else str(model_dir),
        "metrics": metrics, "history": history, "classes": classes,
    }


def main(argv: list[str] | None = None) -> int:
    """Train the policy; 0 on success, 2 on a bad config or stage-1 model, 1 when it failed."""
    args = parse_args(argv)
    try:
        config = load_job_config(args.config, args.overrides, args.register, args.alias)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_policy_stage(config)
    except (ConfigError, StageOneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        print(f"error: dasNet policy stage of run {config.run.name!r} failed: {err}", file=sys.stderr)
        return 1
    m = summary["metrics"]
    first, last = summary["history"][0], summary["history"][-1]
    print(f"run {summary['run']}: val accuracy {m['val/accuracy']:.3f} (stage 1 "
          f"{m['val/accuracy_stage1']:.3f}); reward of the centre {first['centre_reward']:.3f} at "
          f"generation 1, {last['centre_reward']:.3f} at generation {len(summary['history'])}")
    print(f"MLflow run: {summary['run_id']}  model: {summary['model_uri']}"
          + (f"  registered: {config.run.register_name} v{summary['registered_version']} "
             f"@{config.run.register_alias}" if summary["registered_version"] else "")
          + (f"  files: {summary['model_dir']}" if summary["model_dir"] else ""))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
