"""The logged model: safetensors + JSON, rebuilt by the registry, loaded from MLflow without
unpickling, predicting from pyramid URIs and from in-memory images."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.registry import create_model
from pipeline.track import packaging, tracking
from pipeline.track.packaging import Predictor
from tests.pipeline.tracking_fixtures import (
    TINY,
    brightness_model,
    brightness_scenes,
    fresh_mlflow_uri,
)

CLASSES = ["dark", "bright"]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return fresh_mlflow_uri(tmp_path_factory)


def _trained_like_model(seed: int = 3):
    torch.manual_seed(seed)
    model = create_model(TINY, k=3, patch=6)
    model.eval()
    return model


def test_files_round_trip_gives_identical_outputs(tmp_path):
    model = _trained_like_model()
    files = packaging.write_model_files(
        model, tmp_path, classes=CLASSES, metadata={"val_accuracy": 0.5}
    )
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec == {
        "format": packaging.FORMAT,
        "package": {"name": "attention-pipeline", "version": packaging.package_version()},
        "model": {"name": TINY, "kwargs": {"k": 3, "patch": 6}},
        "model_class": "tests.pipeline.tracking_fixtures.TinyAttention",
        "classes": CLASSES,
        "view_size": [16, 16],
        "metadata": {"val_accuracy": 0.5},
    }
    assert set(load_file(files["weights"])) == set(model.state_dict())
    source, keys, _ = brightness_scenes()
    loaded = Predictor.from_files(files)
    original = Predictor(model=model, spec=spec)
    a, b = original.outputs(source, keys, 3), loaded.outputs(source, keys, 3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.logits, y.logits, rtol=0, atol=0)
        assert torch.equal(x.boxes, y.boxes)
    assert packaging.find_model_files(tmp_path) == files


def test_wrapped_model_is_unwrapped_and_unknown_objects_rejected(tmp_path):
    model = _trained_like_model()
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert packaging.unwrap(wrapper) is model
    with pytest.raises(ValueError, match="create_model"):
        packaging.model_spec(torch.nn.Linear(2, 2))


def test_load_refuses_wrong_format_class_or_weights(tmp_path):
    files = packaging.write_model_files(_trained_like_model(), tmp_path, classes=CLASSES)
    spec_path = tmp_path / "spec.json"
    good = json.loads(spec_path.read_text())

    spec_path.write_text(json.dumps({**good, "format": "other/9"}))
    with pytest.raises(ValueError, match="format"):
        packaging.load_model_files(files["weights"], spec_path)

    spec_path.write_text(json.dumps({**good, "model_class": "evil.Module"}))
    with pytest.raises(ValueError, match="now builds"):
        packaging.load_model_files(files["weights"], spec_path)

    spec_path.write_text(json.dumps({**good, "model": {"name": TINY, "kwargs": {"channels": 1}}}))
    with pytest.raises(ValueError, match="do not fit"):
        packaging.load_model_files(files["weights"], spec_path)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((5, 7), (1, 5, 7)), ((3, 5, 7), (3, 5, 7)), ((5, 7, 3), (3, 5, 7)), ((4, 4, 4), (4, 4, 4))],
)
def test_image_layouts(shape, expected):
    image = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 256
    tensor = packaging.image_tensor(image.astype(np.uint8))
    assert tuple(tensor.shape) == expected and tensor.dtype == torch.uint8
    if shape == (5, 7, 3):
        assert torch.equal(tensor, torch.from_numpy(np.moveaxis(image.astype(np.uint8), -1, 0)))
    floats = packaging.image_tensor(np.full((3, 2, 2), 0.5, dtype=np.float32))
    assert floats.unique().tolist() == [128]
    with pytest.raises(ValueError, match="shape"):
        packaging.image_tensor(np.zeros((1, 2, 3, 4)))


def test_predict_image_layouts_agree_and_are_right():
    predictor = Predictor(model=brightness_model(), spec={"classes": CLASSES})
    source, keys, labels = brightness_scenes()
    for key, label in zip(keys, labels, strict=True):
        chw = source.pyramids[key][0].numpy()
        a = predictor.predict_image(chw)
        b = predictor.predict_image(np.moveaxis(chw, 0, -1))
        assert a["probabilities"] == b["probabilities"]
        assert a["label"] == label and a["class"] == CLASSES[label]
        assert len(a["attention"]) == 16 and len(a["attention"][0]) == 16
        assert np.asarray(a["boxes"]).shape == (2, 4) and len(a["weights"]) == 2
        assert sum(a["probabilities"]) == pytest.approx(1.0)


def test_evaluate_exact_accuracy():
    source, keys, labels = brightness_scenes()
    good = Predictor(model=brightness_model(1.0), spec={})
    bad = Predictor(model=brightness_model(-1.0), spec={})
    assert packaging.evaluate(good, source, keys, labels, batch_size=3)["accuracy"] == 1.0
    assert packaging.evaluate(bad, source, keys, labels)["accuracy"] == 0.0
    assert packaging.evaluate(good, source, keys, labels)["n"] == len(keys)
    with pytest.raises(ValueError, match="labels"):
        packaging.evaluate(good, source, keys, labels[:-1])


def test_predict_uris_through_an_injected_source():
    source, keys, labels = brightness_scenes()
    uris = [f"file:///pyramids/{k}.zarr" for k in keys]
    by_uri = type(source)({u: source.pyramids[k] for u, k in zip(uris, keys, strict=True)})
    predictor = Predictor(
        model=brightness_model(), spec={"classes": CLASSES}, source_factory=lambda _: by_uri
    )
    records = predictor.predict_any({"uris": uris}, {"batch_size": 3})
    assert [r["key"] for r in records] == uris
    assert [r["label"] for r in records] == labels
    assert predictor.predict_any(uris[1])[0]["label"] == labels[1]
    import pandas as pd

    assert [r["label"] for r in predictor.predict_any(pd.DataFrame({"uri": uris}))] == labels
    with pytest.raises(ValueError, match="uri"):
        predictor.predict_any({"what": 1})


def test_registry_round_trip_without_pickle(uri, tmp_path):
    """Log, register with an alias, load ``models:/NAME@alias``: same predictions, no pickle."""
    model = brightness_model()
    tracker = tracking.MlflowTracker("packaging", uri)
    run_id = tracker.start("k-package")
    model_uri = tracker.log_model(model, classes=CLASSES, metadata={"val_accuracy": 1.0})
    assert model_uri.startswith("models:/m-")
    version = tracker.register(model_uri, "tiny-bright", alias="champion")
    tracker.end()
    assert version == "1"
    assert tracking.alias_version(uri, "tiny-bright", "champion") == "1"
    assert tracking.version_tags(uri, "tiny-bright", "1")["pipeline.run_id"] == run_id
    assert tracking.alias_version(uri, "tiny-bright", "nope") is None
    assert tracking.alias_version(uri, "no-such-model", "champion") is None

    # the stored model is code + safetensors + JSON: no pickle file, loaded from code
    model_dir = tracking.download_model("models:/tiny-bright@champion", tmp_path / "dl", uri)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("pyfunc_entry.py")
    assert "python_model" not in pyfunc  # the key of a cloudpickled PythonModel file
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("*.pt"))
    assert sorted(p.name for p in (model_dir / "artifacts").iterdir()) == [
        "model.safetensors",
        "spec.json",
    ]

    loaded = tracking.load_pyfunc("models:/tiny-bright@champion", uri)  # pickle switched off
    source, keys, labels = brightness_scenes()
    reference = Predictor(model=model, spec={"classes": CLASSES})
    for key in keys:
        image = source.pyramids[key][0].numpy()
        assert loaded.predict(image) == [reference.predict_image(image, key="image_0")]
    records = loaded.predict({"images": [source.pyramids[k][0].numpy() for k in keys]})
    assert [r["label"] for r in records] == labels
    unwrapped = loaded.unwrap_python_model().predictor
    assert unwrapped.spec["metadata"] == {"val_accuracy": 1.0}
    assert Predictor.from_dir(model_dir).spec == unwrapped.spec


def test_load_pyfunc_refuses_a_pickled_model(uri, tmp_path):
    """A model that needs cloudpickle (not one of ours) is refused, not executed."""
    import mlflow.pyfunc

    class Pickled(mlflow.pyfunc.PythonModel):
        _skip_type_hint_validation = True

        def predict(self, context, model_input, params=None):
            return model_input

    path = tmp_path / "pickled"
    mlflow.pyfunc.save_model(str(path), python_model=Pickled(), pip_requirements=[])
    with pytest.raises(Exception, match="pickle is disallowed"):
        tracking.load_pyfunc(str(path), uri)


def test_a_spec_from_another_project_version_is_refused(tmp_path):
    """The network is rebuilt with the installed code: a spec written by another major.minor
    version (or by none) is refused with a message that says which version to install."""
    files = packaging.write_model_files(_trained_like_model(), tmp_path, classes=CLASSES)
    spec = json.loads(open(files["spec"]).read())
    major, minor, *_ = packaging.package_version().split(".")
    for version in (f"{major}.{minor}.99", f"{major}.{int(minor) + 1}.0", None):
        spec["package"] = {"name": "attention-pipeline", "version": version}
        open(files["spec"], "w").write(json.dumps(spec))
        if version and version.startswith(f"{major}.{minor}."):
            assert Predictor.from_files(files).spec["package"]["version"] == version
            continue
        with pytest.raises(ValueError, match="attention-pipeline") as info:
            Predictor.from_files(files)
        assert files["spec"] in str(info.value)
        if version:
            assert f"{major}.{int(minor) + 1}.*" in str(info.value)


def test_logged_requirements_name_the_project():
    assert f"attention-pipeline=={packaging.package_version()}" in packaging.pip_requirements()


def test_an_image_in_memory_and_its_pyramid_give_the_same_prediction(tmp_path):
    """The in-memory pyramid is built down to the ``coarsest`` the model's pyramids had (128 px
    here, as in the demo), so the view and the patches equal those read from the pyramid."""
    from pipeline.store.pyramid import pyramid_coarsest, write_pyramid

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (3, 600, 520), dtype=np.uint8)
    image[:, 100:300, 200:400] //= 3  # some structure, so the attention has something to see
    uri = write_pyramid(str(tmp_path / "pyr"), "scene", image, {}, coarsest=128)
    assert pyramid_coarsest(uri) == 128
    files = packaging.write_model_files(
        _trained_like_model(), tmp_path / "model", classes=CLASSES,
        metadata={"pyramid_coarsest": 128},
    )
    predictor = Predictor.from_files(files)
    assert predictor.coarsest == 128
    by_uri = predictor.predict_uris([uri])[0]
    in_memory = predictor.predict_image(image)
    # one scene, one forward pass each, the same pixels: equal to the bit
    for key in ("probabilities", "attention", "boxes", "weights"):
        assert in_memory[key] == by_uri[key], key
    assert Predictor(model=predictor.model, spec={}).coarsest == 256  # the ingest's default
