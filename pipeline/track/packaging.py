"""The format of a logged/registered model and the predictor that serves it.

A packaged model is two files and nothing executable:
- ``model.safetensors``: the ``state_dict`` (tensors only; safetensors cannot hold code);
- ``spec.json``: ``{"format", "package": {"name", "version"}, "model": {"name", "kwargs"},
  "model_class", "classes", "view_size", "metadata"}``; ``package`` is the project distribution
  and version that wrote it, ``model`` what ``models.create_model`` recorded in ``model.spec``,
  ``model_class`` the Python class it built (checked again on load), ``classes`` the label names
  in label order; ``metadata["pyramid_coarsest"]`` the ``coarsest`` of the pyramids it was
  trained on (an in-memory image gets the same pyramid, ``Predictor.coarsest``).

Loading rebuilds the network with the INSTALLED project's code (``create_model(name,
**kwargs)``), refuses a spec written by another major.minor version of the project (the code
that would rebuild it may differ), checks the class, and loads the weights strictly. Nothing
stored with the model is executed: ``pipeline.track.tracking.load_predictor`` downloads only
these two files from the registry. In MLflow the two files are also the artifacts of a
models-from-code pyfunc model (``pipeline/track/pyfunc_entry.py``) for MLflow users; loading
THAT (``mlflow.pyfunc.load_model``) runs the stored copy of the entry file, so it is only as safe
as the artifact store (README, "Loading a model safely").

``Predictor`` predicts from pyramid URIs (via the Zarr reader) and from in-memory images
(numpy/torch uint8, (C, H, W) or (H, W, C), wrapped in a ``TensorPyramidSource``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.memory import TensorPyramidSource
from models.protocol import AttentionModel, ModelOutput, PixelSource
from models.registry import create_model
from pipeline.store.pyramid import DEFAULT_COARSEST

FORMAT = "attention-pipeline-model/1"
PACKAGE = "attention-pipeline"  # the distribution whose code rebuilds a logged model
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
# Distributions a serving environment needs besides the project itself.
RUNTIME_DISTRIBUTIONS = (PACKAGE, "torch", "numpy", "safetensors", "zarr", "obstore", "mlflow", "pillow")


def unwrap(model: torch.nn.Module) -> AttentionModel:
    """The model inside a DDP / ``torch.compile`` wrapper (or the model itself)."""
    while not hasattr(model, "spec"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise ValueError(
                f"{type(model).__name__} has no .spec: build models with models.create_model"
            )
        model = inner
    return model


def model_spec(
    model: torch.nn.Module,
    classes: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON spec of ``model`` (see the module docstring)."""
    model = unwrap(model)
    spec = {
        "format": FORMAT,
        "package": {"name": PACKAGE, "version": package_version()},
        "model": {"name": model.spec["name"], "kwargs": dict(model.spec["kwargs"])},
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "classes": list(classes) if classes is not None else None,
        "view_size": list(model.view_size),
        "metadata": dict(metadata or {}),
    }
    json.dumps(spec)  # fail here, at save time, on anything that is not JSON
    return spec


def package_version() -> str:
    """The installed version of the project distribution (``PACKAGE``)."""
    try:
        return importlib_metadata.version(PACKAGE)
    except importlib_metadata.PackageNotFoundError:
        raise RuntimeError(f"{PACKAGE} is not installed (pip install -e .): a model's spec "
                           "records the version whose code rebuilds it") from None


def check_package_version(spec: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming ``where`` unless ``spec`` was written by the installed major.minor
    version of the project: the model is rebuilt with the installed code, which another
    version may build differently (or not at all)."""
    logged = (spec.get("package") or {}).get("version")
    installed = package_version()
    if not logged:
        raise ValueError(f"{where}: the spec records no {PACKAGE} version (logged by an older "
                         f"release); re-log the model with {PACKAGE} {installed}")
    if logged.split(".")[:2] != installed.split(".")[:2]:
        major_minor = ".".join(logged.split(".")[:2])
        raise ValueError(f"{where}: logged with {PACKAGE} {logged}, installed is {installed} "
                         f"(major.minor must match): install {PACKAGE}=={major_minor}.* to load it")


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` as contiguous CPU tensors that share no storage (safetensors refuses
    shared storage, e.g. tied weights; load_state_dict restores every key anyway)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def write_model_files(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    classes: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``model.safetensors`` and ``spec.json`` into ``directory``.

    Returns ``{"weights": path, "spec": path}``: the artifact mapping of the pyfunc model.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model, classes, metadata)
    weights = directory / WEIGHTS_FILE
    save_file(state_tensors(model), str(weights), metadata={"format": FORMAT})
    spec_path = directory / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
    return {"weights": str(weights), "spec": str(spec_path)}


def load_model_files(
    weights: str | os.PathLike, spec: str | os.PathLike
) -> tuple[AttentionModel, dict[str, Any]]:
    """Rebuild the model from ``spec.json`` with ``create_model`` and load the safetensors.

    Raises ``ValueError`` naming the file when the format, the project's major.minor version
    or the model class does not match.
    """
    from safetensors.torch import load_file

    spec_dict = json.loads(Path(spec).read_text())
    if spec_dict.get("format") != FORMAT:
        raise ValueError(f"{spec}: format {spec_dict.get('format')!r}, expected {FORMAT!r}")
    check_package_version(spec_dict, str(spec))
    name, kwargs = spec_dict["model"]["name"], spec_dict["model"]["kwargs"]
    model = create_model(name, **kwargs)
    built = f"{type(model).__module__}.{type(model).__qualname__}"
    if built != spec_dict["model_class"]:
        raise ValueError(
            f"{spec}: registry name {name!r} now builds {built}, the saved model was "
            f"{spec_dict['model_class']}"
        )
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit model {name!r}: {err}") from err
    model.eval()
    return model, spec_dict


def find_model_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """The weights and spec files inside a downloaded MLflow model directory (or a plain one)."""
    root = Path(model_dir)
    found = {}
    for key, filename in (("weights", WEIGHTS_FILE), ("spec", SPEC_FILE)):
        matches = sorted(root.rglob(filename))
        if not matches:
            raise FileNotFoundError(f"no {filename} under {root}")
        found[key] = str(matches[0])
    return found


def pip_requirements() -> list[str]:
    """Pinned requirements recorded with a logged model (the installed versions)."""
    reqs = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return reqs


def image_tensor(image: Any) -> torch.Tensor:
    """(C, H, W) uint8 tensor from a numpy/torch image: (H, W), (C, H, W) or (H, W, C).

    A 3-D array is channels-first when its first side has 1, 3 or 4 entries and its last does
    not; otherwise channels-last. Float input must already be in [0, 1].
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if not (array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)):
            array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"image must be (H, W), (C, H, W) or (H, W, C), got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.rint(array * 255.0), 0, 255)
        array = array.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array))


def image_source(images: Mapping[str, Any], coarsest: int = DEFAULT_COARSEST) -> TensorPyramidSource:
    """In-memory ``PixelSource`` over images keyed by name (see ``image_tensor``), each pyramid
    built as the ingest builds it (``pipeline.store.pyramid.write_pyramid``: the same 2x2
    rounded mean, levels down to a long side of at most ``coarsest`` px), so that a scene gives
    the model the same view and patches in memory as from its pyramid."""
    return TensorPyramidSource.from_images(
        {k: image_tensor(v) for k, v in images.items()}, coarsest=coarsest
    )


def zarr_source(uris: Sequence[str]) -> PixelSource:
    """The Zarr reader (``pipeline.read.reader.ZarrPixelSource``) for pyramid URIs, with
    ``pipeline.read.settings.EXACT_READS`` (in this process, only the planned chunk bytes)."""
    from pipeline.read.reader import ZarrPixelSource
    from pipeline.read.settings import EXACT_READS

    return ZarrPixelSource.from_settings(EXACT_READS)


@dataclass
class Predictor:
    """A loaded model and what it needs to answer questions about scenes.

    Attributes:
        model: the network, in eval mode.
        spec: the JSON spec it was loaded from.
        seed: seed of the sampling generator, so a prediction is reproducible.
        source_factory: builds a ``PixelSource`` for pyramid URIs (default: the Zarr reader).
    """

    model: AttentionModel
    spec: dict[str, Any]
    seed: int = 0
    source_factory: Callable[[Sequence[str]], PixelSource] = zarr_source

    @classmethod
    def from_files(cls, files: Mapping[str, str], **kwargs: Any) -> Predictor:
        """From ``{"weights": path, "spec": path}`` (the pyfunc model's artifacts)."""
        model, spec = load_model_files(files["weights"], files["spec"])
        return cls(model=model, spec=spec, **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, **kwargs: Any) -> Predictor:
        """From a directory holding ``model.safetensors`` and ``spec.json`` (searched)."""
        return cls.from_files(find_model_files(model_dir), **kwargs)

    @property
    def coarsest(self) -> int:
        """Long side (px) of the coarsest level of the pyramids the model was trained on
        (``metadata["pyramid_coarsest"]``; the ingest's default when not recorded): in-memory
        images get pyramids built down to it."""
        recorded = (self.spec.get("metadata") or {}).get("pyramid_coarsest")
        return int(recorded) if recorded else DEFAULT_COARSEST

    @property
    def classes(self) -> list[str] | None:
        """Label names in label order, if they were saved."""
        return self.spec.get("classes")

    def outputs(
        self,
        source: PixelSource,
        keys: Sequence[str],
        batch_size: int = 8,
        seed: int | None = None,
    ) -> list[ModelOutput]:
        """Model outputs for ``keys`` of ``source``, ``batch_size`` scenes per forward pass.

        One generator seeded with ``seed`` (default ``self.seed``) serves the whole call: the
        same call gives the same outputs.
        """
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        self.model.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(keys), batch_size):
                batch = list(keys[i : i + batch_size])
                views = source.view(batch, tuple(self.model.view_size))
                sizes = source.level0_sizes(batch)
                outs.append(self.model(views, sizes, source, batch, generator=generator))
        return outs

    def logits(self, source: PixelSource, keys: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """(B, num_classes) logits for ``keys``."""
        return torch.cat([o.logits for o in self.outputs(source, keys, batch_size)])

    def predict_source(
        self,
        source: PixelSource,
        keys: Sequence[str],
        batch_size: int = 8,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per key (see ``prediction_record``)."""
        records = []
        for i, out in enumerate(self.outputs(source, keys, batch_size, seed)):
            batch = keys[i * batch_size : (i + 1) * batch_size]
            records.extend(self._records(out, batch))
        return records

    def predict_uris(
        self, uris: Sequence[str], batch_size: int = 8, seed: int | None = None
    ) -> list[dict[str, Any]]:
        """Predictions for scene pyramids by URI (``file://``, local path or ``s3://``)."""
        return self.predict_source(self.source_factory(list(uris)), list(uris), batch_size, seed)

    def predict_image(self, image: Any, key: str = "image") -> dict[str, Any]:
        """Prediction for one in-memory image (see ``image_tensor`` for accepted layouts)."""
        return self.predict_source(image_source({key: image}, self.coarsest), [key])[0]

    def _records(self, out: ModelOutput, keys: Sequence[str]) -> list[dict[str, Any]]:
        probs = F.softmax(out.logits.float(), dim=-1)
        return [prediction_record(out, probs, b, key, self.classes) for b, key in enumerate(keys)]

    def predict_any(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[dict]:
        """The pyfunc ``predict``: accepts what a user or a serving endpoint sends.

        - a pyramid URI string, or a list of them;
        - a mapping with ``"uri"``/``"uris"`` or ``"image"``/``"images"``;
        - a pandas DataFrame with a ``uri`` column;
        - a numpy/torch image, or a list of them.
        ``params`` may hold ``batch_size`` and ``seed``. Returns one record per scene.
        """
        params = dict(params or {})
        seed = int(params["seed"]) if params.get("seed") is not None else None
        batch_size = int(params.get("batch_size") or 8)
        uris, images = _split_input(model_input)
        if uris is not None:
            return self.predict_uris(uris, batch_size, seed)
        keys = [f"image_{i}" for i in range(len(images))]
        return self.predict_source(
            image_source(dict(zip(keys, images, strict=True)), self.coarsest), keys, batch_size,
            seed,
        )


def prediction_record(
    out: ModelOutput, probs: torch.Tensor, b: int, key: str, classes: Sequence[str] | None
) -> dict[str, Any]:
    """JSON-ready prediction of row ``b``: key, label, class, probabilities, attention (h, w),
    boxes (K, 4) level-0 ``[y0, x0, y1, x1]`` and weights (K), the last three None if absent."""
    label = int(torch.argmax(probs[b]))
    return {
        "key": key,
        "label": label,
        "class": classes[label] if classes else str(label),
        "probabilities": [float(p) for p in probs[b]],
        "attention": None if out.attention is None else out.attention[b].float().tolist(),
        "boxes": None if out.boxes is None else out.boxes[b].tolist(),
        "weights": None if out.weights is None else out.weights[b].float().tolist(),
    }


def _split_input(model_input: Any) -> tuple[list[str] | None, list[Any] | None]:
    if isinstance(model_input, str):
        return [model_input], None
    if isinstance(model_input, Mapping):
        for key in ("uri", "uris"):
            if key in model_input:
                value = model_input[key]
                return ([value] if isinstance(value, str) else [str(v) for v in value]), None
        for key in ("image", "images"):
            if key in model_input:
                value = model_input[key]
                return None, (list(value) if key == "images" else [value])
        raise ValueError(
            f"predict input mapping needs 'uri(s)' or 'image(s)', got {list(model_input)}"
        )
    if hasattr(model_input, "columns") and "uri" in model_input.columns:  # pandas DataFrame
        return [str(u) for u in model_input["uri"]], None
    if isinstance(model_input, np.ndarray | torch.Tensor):
        return None, [model_input]
    if isinstance(model_input, list | tuple) and model_input:
        if all(isinstance(v, str) for v in model_input):
            return list(model_input), None
        return None, list(model_input)
    raise ValueError(f"cannot predict from input of type {type(model_input).__name__}")


def evaluate(
    predictor: Predictor,
    source: PixelSource,
    keys: Sequence[str],
    labels: Sequence[int],
    batch_size: int = 8,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``predictor`` on labelled scenes.

    Returns ``{"accuracy", "loss", "n"}``; accuracy in [0, 1], loss in nats per scene.
    """
    if len(keys) != len(labels) or not keys:
        raise ValueError(
            f"evaluate needs as many labels as keys (> 0), got {len(keys)}/{len(labels)}"
        )
    logits = predictor.logits(source, keys, batch_size)
    target = torch.as_tensor(list(labels), dtype=torch.int64)
    loss = F.cross_entropy(logits.float(), target).item()
    accuracy = (logits.argmax(-1) == target).float().mean().item()
    return {
        "accuracy": accuracy,
        "loss": loss if math.isfinite(loss) else float("inf"),
        "n": len(keys),
    }
