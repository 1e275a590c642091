"""Scheduled retraining's promotion rule: a new model takes the alias only if it wins.

``retrain(train_fn, evaluate_fn, ...)``:
1. ``train_fn()`` trains a candidate and returns where it is (a registered version, or a logged
   model URI that is registered here with the alias ``candidate``);
2. ``evaluate_fn(model_uri)`` scores the candidate and the current ``@champion`` on the *same*
   validation split, with the same sampling seed;
3. the candidate takes the alias only when it beats the champion by more than ``margin``
   (``decide``); without a champion it is promoted; the old champion keeps
   ``previous_<alias>`` so a promotion can be undone with one alias move;
4. the decision and both scores are written as tags on the candidate version and on the
   candidate's training run (``retrain.*``), promoted or not.

The rule is written against injected functions, so it is tested with tiny registered models
and no training; ``jobs/retrain.py`` wires it to ``pipeline.train.driver.run_training`` and the Zarr
reader.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.track import tracking

# metric name -> True when higher is better (keys of ``pipeline.track.packaging.evaluate``)
METRICS = {"accuracy": True, "loss": False}
CANDIDATE_ALIAS = "candidate"


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of one comparison.

    Attributes:
        promoted: the candidate now holds ``alias``.
        name, alias: registered model and the alias contested (e.g. ``champion``).
        candidate_version, champion_version: versions compared (champion None: there was none).
        metric, margin: what was compared, and by how much the candidate had to win.
        candidate_score, champion_score: the metric of each on the validation split.
        reason: one sentence a person reads in the run's tags.
    """

    promoted: bool
    name: str
    alias: str
    candidate_version: str
    champion_version: str | None
    metric: str
    margin: float
    candidate_score: float
    champion_score: float | None
    reason: str

    def tags(self) -> dict[str, str]:
        """``retrain.*`` tags recording this decision (on the version and on the run)."""
        return {f"retrain.{k}": "" if v is None else str(v) for k, v in asdict(self).items()}


def decide(
    candidate: float, champion: float | None, margin: float = 0.0, higher_is_better: bool = True
) -> tuple[bool, str]:
    """Promote when there is no champion, or when the candidate wins by more than ``margin``.

    ``margin`` >= 0 is in the metric's own units (0.01 = one accuracy point). A tie never
    promotes (the champion stays), nor does a non-finite candidate score.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not math.isfinite(candidate):
        return False, f"candidate score is {candidate}"
    if champion is None:
        return True, "no champion yet"
    gain = candidate - champion if higher_is_better else champion - candidate
    if gain > margin:
        return True, f"candidate beats champion by {gain:.4g} > margin {margin:.4g}"
    return False, f"candidate gain {gain:.4g} is not above margin {margin:.4g}"


def promote_if_better(
    name: str,
    candidate_version: str,
    evaluate_fn: Callable[[str], Mapping[str, float]],
    *,
    alias: str = "champion",
    margin: float = 0.0,
    metric: str = "accuracy",
    tracking_uri: str | None = None,
    run_tracker: tracking.Tracker | None = None,
) -> Decision:
    """Compare version ``candidate_version`` of ``name`` with ``name@alias``; move the alias if
    the candidate wins (see ``decide``); record the decision. Returns the ``Decision``.

    Args:
        evaluate_fn: ``models:/NAME/VERSION`` -> metrics including ``metric``; both models go
            through the same function, so the same split and seed.
        run_tracker: tracker attached to the candidate's training run, for its tags/metrics.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    candidate_version = str(candidate_version)
    champion_version = tracking.alias_version(tracking_uri, name, alias)
    candidate_score = float(evaluate_fn(f"models:/{name}/{candidate_version}")[metric])
    champion_score = None
    if champion_version is not None and champion_version != candidate_version:
        champion_score = float(evaluate_fn(f"models:/{name}/{champion_version}")[metric])
    elif champion_version == candidate_version:  # e.g. the trainer already gave it the alias
        champion_version = None
    promoted, reason = decide(candidate_score, champion_score, margin, METRICS[metric])
    decision = Decision(
        promoted,
        name,
        alias,
        candidate_version,
        champion_version,
        metric,
        float(margin),
        candidate_score,
        champion_score,
        reason,
    )
    if promoted:
        if champion_version is not None:
            tracking.set_alias(tracking_uri, name, f"previous_{alias}", champion_version)
        tracking.set_alias(tracking_uri, name, alias, candidate_version)
    record(decision, tracking_uri, run_tracker)
    return decision


def record(
    decision: Decision, tracking_uri: str | None, run_tracker: tracking.Tracker | None
) -> None:
    """Write the decision as tags on the candidate version (and its run, when given)."""
    tags = {**decision.tags(), "retrain.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tracking.set_version_tags(tracking_uri, decision.name, decision.candidate_version, tags)
    if run_tracker is not None and run_tracker.run_id is not None:
        run_tracker.set_tags(tags)
        metrics = {f"retrain/candidate_{decision.metric}": decision.candidate_score}
        if decision.champion_score is not None:
            metrics[f"retrain/champion_{decision.metric}"] = decision.champion_score
        run_tracker.log_metrics(metrics, step=0)


def retrain(
    train_fn: Callable[[], Any],
    evaluate_fn: Callable[[str], Mapping[str, float]],
    name: str,
    *,
    alias: str = "champion",
    margin: float = 0.0,
    metric: str = "accuracy",
    tracking_uri: str | None = None,
    experiment: str = "attention-pipeline",
) -> Decision:
    """Train a candidate with ``train_fn``, then ``promote_if_better``.

    ``train_fn()`` returns an object with ``run_id`` and either ``registered_version`` (already
    a version of ``name``) or ``model_uri`` (registered here under ``name`` with the alias
    ``candidate``), like ``pipeline.train.driver.TrainOutcome``.
    """
    outcome = train_fn()
    version = getattr(outcome, "registered_version", None)
    run_id = getattr(outcome, "run_id", None)
    if version is None:
        model_uri = getattr(outcome, "model_uri", None)
        if not model_uri:
            raise RuntimeError(
                "retrain: train_fn returned neither a registered version nor a model URI"
            )
        version = tracking.register_model(
            tracking_uri, model_uri, name, CANDIDATE_ALIAS, run_id=run_id
        )
    run_tracker = None
    if run_id is not None:
        run_tracker = tracking.MlflowTracker(experiment, tracking_uri, run_id=run_id)
    return promote_if_better(
        name,
        str(version),
        evaluate_fn,
        alias=alias,
        margin=margin,
        metric=metric,
        tracking_uri=tracking_uri,
        run_tracker=run_tracker,
    )


def registered_evaluator(
    source: Any,
    keys: Sequence[str],
    labels: Sequence[int],
    tracking_uri: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> Callable[[str], dict[str, float]]:
    """``evaluate_fn`` for ``promote_if_better``: downloads a registered model, rebuilds it from
    safetensors + JSON (``pipeline.track.packaging``) and scores it on ``keys`` of ``source``."""
    from pipeline.track import packaging

    def evaluate(model_uri: str) -> dict[str, float]:
        predictor = tracking.load_predictor(model_uri, tracking_uri, seed=seed)
        return packaging.evaluate(predictor, source, keys, labels, batch_size)

    return evaluate
