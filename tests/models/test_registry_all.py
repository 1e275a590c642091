"""The shared test over every registered model (``list_models()``).

Each model is built with ``num_classes`` and ``view_size`` (every family accepts both) plus
the small overrides below, run on two tiny in-memory scenes of different shapes through the
pixel protocol, and checked for:

- forward + backward in training mode; ``ModelOutput`` shapes as documented in
  ``models.protocol``; every parameter gets a finite gradient, except those the model lists
  in ``no_grad_params()`` (parameter names);
- every ``ReadRequest`` is well formed (one row of boxes per scene, int64, levels that exist);
- the same generator seed gives the same output (training mode, so sampling is exercised);
- a batch gives the same result as each scene alone with the same generator seed, in eval
  mode, after BatchNorm statistics are calibrated on the scenes (at initialisation the
  logits hardly depend on the input). Documented exceptions: in training mode, BatchNorm
  statistics and one generator shared by the batch may couple the scenes, so this check
  uses eval mode; models listed in ``BATCH_COUPLED`` (or declaring ``batch_coupling``) are
  compared with a looser tolerance, with the reason written down;
- the model rebuilt from ``model.spec`` loads the state dict and gives the same output.

A model registered later is tested with no change here; give it an entry in ``OVERRIDES``
only if its defaults are too slow for these tiny scenes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from models import ModelOutput, create_model, list_models
from models.memory import TensorPyramidSource
from models.protocol import ReadRequest
from models.registry import model_module

BASE = {"num_classes": 3, "view_size": (64, 64)}
_ATS_SMALL = {"patch_size": (16, 16), "n_patches": 3}
_ZOOM_SMALL = {"tile_grid": (4, 4), "tile_view": (32, 32), "patch_size": (16, 16), "n_patches": 3}
OVERRIDES: dict[str, dict] = {
    "ats": _ATS_SMALL,
    "ats_mnist": _ATS_SMALL,
    "zoom_in": _ZOOM_SMALL,
    "zoom_in_mnist": _ZOOM_SMALL,
}
SLOW: set[str] = set()  # models whose tests take > 20 s here (none so far)
SCENE_SHAPES = [(320, 256), (256, 384)]  # (h, w): not square, not equal
ATOL = 1e-4  # float32 through ~100 layers: batched and single convolutions differ ~1e-4
RTOL = 1e-3
# Documented exceptions to batch invariance in eval mode (a model may also declare its own
# ``batch_coupling`` string). They are still checked, with COUPLED_ATOL, so gross mixing fails.
BATCH_COUPLED = {
    "racnn": "one ReadRequest level per batch: the finest level any scene's zoom square needs "
    "(models.regions.read_level), so a scene alone may be read from a coarser level",
}
COUPLED_ATOL = 2e-2


def model_params():
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
        for name in list_models()
        if model_module(name).startswith("models.")  # not models that other tests register
    ]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**BASE, **OVERRIDES.get(name, {})})


def input_channels(model: nn.Module) -> int:
    declared = getattr(model, "in_channels", None)
    if isinstance(declared, int):
        return declared
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    if isinstance(first, nn.Conv2d):
        return first.in_channels
    return 3


def structured_scene(channels: int, h: int, w: int, index: int, g: torch.Generator) -> torch.Tensor:
    """uint8 (channels, h, w): noise on a ramp, a bright block, distinct per scene.

    Scenes must differ strongly, or a model that mixes the scenes of a batch would still
    pass the batched-equals-per-scene check.
    """
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    ramp = (y if index % 2 == 0 else x) * (60 + 120 * index)
    img = ramp + 40 * torch.rand(channels, h, w, generator=g)
    y0, x0 = h // (3 + index), w // (2 + index)
    img[:, y0 : y0 + h // 4, x0 : x0 + w // 4] = 255 - 200 * index
    for c in range(channels):
        img[c] = img[c] * (1 - 0.3 * c / max(channels, 1))  # channels differ too
    return img.clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def scenes(channels: int) -> tuple[TensorPyramidSource, tuple[str, ...]]:
    g = torch.Generator().manual_seed(channels)
    images = {
        f"scene{i}": structured_scene(channels, h, w, i, g) for i, (h, w) in enumerate(SCENE_SHAPES)
    }
    return TensorPyramidSource.from_images(images, coarsest=64), tuple(images)


class Recording:
    """A ``PixelSource`` that records the requests it serves."""

    def __init__(self, inner: TensorPyramidSource):
        self.inner = inner
        self.requests: list[ReadRequest] = []

    def view(self, keys, size):
        return self.inner.view(keys, size)

    def level0_sizes(self, keys):
        return self.inner.level0_sizes(keys)

    def read(self, keys, request):
        self.requests.append(request)
        return self.inner.read(keys, request)


def run(model, keys, seed: int = 0, source=None) -> ModelOutput:
    """Forward ``keys`` through the protocol with a generator seeded ``seed``."""
    if source is None:
        source, _ = scenes(input_channels(model))
    keys = list(keys)
    views = source.view(keys, model.view_size)
    sizes = source.level0_sizes(keys)
    torch.manual_seed(seed)  # layers such as dropout draw from torch's default generator
    return model(views, sizes, source, keys, generator=torch.Generator().manual_seed(seed))


def calibrate_batch_norm(model: nn.Module, keys) -> None:
    """Set BatchNorm running statistics from one training-mode pass over the scenes.

    At initialisation the running statistics (0, 1) shrink activations so much that the
    logits hardly depend on the input, and mixing scenes would go unnoticed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        run(model.train(), keys)


def check_output(out: ModelOutput, batch: int, num_classes: int) -> None:
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (batch, num_classes)
    assert torch.isfinite(out.logits).all()
    if out.attention is not None:
        assert out.attention.ndim == 3 and out.attention.shape[0] == batch
        assert torch.isfinite(out.attention).all() and (out.attention >= 0).all()
    if out.boxes is not None:
        assert out.boxes.ndim == 3 and out.boxes.shape[0] == batch and out.boxes.shape[2] == 4
        assert out.boxes.dtype == torch.int64
        assert (out.boxes[..., 2:] > out.boxes[..., :2]).all()  # non-empty, half-open
    if out.weights is not None:
        assert out.weights.ndim == 2 and out.weights.shape[0] == batch
        if out.boxes is not None:
            assert out.weights.shape[1] == out.boxes.shape[1]
    for name, term in out.aux.items():
        assert term.ndim == 0 and torch.isfinite(term), f"aux term {name!r} is not a finite scalar"


@pytest.mark.parametrize("name", model_params())
def test_forward_backward_shapes_and_gradients(name):
    model = build(name).train()
    source, keys = scenes(input_channels(model))
    recorder = Recording(source)
    out = run(model, keys, source=recorder)
    check_output(out, len(keys), BASE["num_classes"])
    levels = min(len(p) for p in source.pyramids.values())
    for request in recorder.requests:
        assert request.boxes.shape[:1] == (len(keys),) and request.boxes.dtype == torch.int64
        assert request.level < levels
    loss = model.loss(out, torch.tensor([0, 1]), epoch=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    model.zero_grad(set_to_none=True)
    loss.backward()
    exempt = set(getattr(model, "no_grad_params", lambda: [])())
    unknown = exempt - {n for n, _ in model.named_parameters()}
    assert not unknown, f"no_grad_params names unknown parameters: {sorted(unknown)[:5]}"
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in exempt and p.grad is None
    ]
    assert not missing, f"{name}: parameters without a gradient: {missing[:10]}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"{name}: non-finite gradients in {bad[:10]}"


@pytest.mark.parametrize("name", model_params())
def test_same_seed_gives_the_same_output(name):
    model = build(name).train()
    _, keys = scenes(input_channels(model))
    a, b = run(model, keys, seed=5), run(model, keys, seed=5)
    assert torch.allclose(a.logits, b.logits, rtol=RTOL, atol=ATOL)
    if a.boxes is not None:
        assert torch.equal(a.boxes, b.boxes)


@pytest.mark.parametrize("name", model_params())
def test_batched_equals_per_scene_in_eval_mode(name):
    model = build(name)
    _, keys = scenes(input_channels(model))
    calibrate_batch_norm(model, keys)
    model.eval()
    with torch.no_grad():
        batched = run(model, keys, seed=3)
        singles = [run(model, [key], seed=3) for key in keys]
    spread = (singles[0].logits - singles[1].logits).abs().max()
    assert spread > 10 * ATOL, f"{name}: both scenes give the same logits; the check would be void"
    coupling = BATCH_COUPLED.get(name) or getattr(model, "batch_coupling", None)
    atol = COUPLED_ATOL if coupling else ATOL
    for i, single in enumerate(singles):
        assert torch.allclose(batched.logits[i], single.logits[0], rtol=RTOL, atol=atol), (
            f"{name}: scene {i} in a batch {batched.logits[i].tolist()} "
            f"vs alone {single.logits[0].tolist()}"
        )
        if batched.boxes is not None and not coupling:
            assert torch.equal(batched.boxes[i], single.boxes[0])
        if batched.attention is not None:
            assert torch.allclose(batched.attention[i], single.attention[0], rtol=RTOL, atol=atol)


@pytest.mark.parametrize("name", model_params())
def test_rebuilt_from_spec_gives_the_same_output(name):
    model = build(name).eval()
    assert model.spec["name"] == name
    torch.manual_seed(123)  # a different initialisation, overwritten by the state dict
    rebuilt = create_model(model.spec["name"], **model.spec["kwargs"]).eval()
    rebuilt.load_state_dict(model.state_dict())
    _, keys = scenes(input_channels(model))
    with torch.no_grad():
        assert torch.allclose(
            run(model, keys).logits, run(rebuilt, keys).logits, rtol=RTOL, atol=ATOL
        )


def test_lowres_cnn_reads_nothing_but_the_view():
    model = build("lowres_cnn").train()
    source, keys = scenes(3)
    recorder = Recording(source)
    out = run(model, keys, source=recorder)
    assert recorder.requests == []
    assert out.attention is None and out.boxes is None and out.weights is None
    with pytest.raises(ValueError, match="expects views of"):
        model.steps(torch.zeros(1, 3, 32, 32), torch.tensor([[32, 32]])).send(None)


def test_lowres_cnn_takes_num_classes_view_size_and_in_channels():
    assert "lowres_cnn" in list_models()
    model = create_model("lowres_cnn", num_classes=7, view_size=(40, 48), in_channels=1)
    assert model.view_size == (40, 48) and model.head.out_features == 7
