"""dasNet: deep attention selective network (Stollenga et al., NeurIPS 2014), as ``dasnet``.

A CNN classifies the view in ``passes`` passes. After each pass, a policy network maps an
observation of the network's state (the mean activation of every gated filter) to a gain for
every gated filter, applied multiplicatively in the next pass (channel attention). Pass 1 runs
with all gains 1; the logits come from the last pass.

Two training stages, as in the paper:
1. the CNN and classifier train by gradient as usual (the policy is zero-initialised, so its
   gains are all exactly 1 and the model is a plain CNN; its parameters get no gradient and are
   listed by ``no_grad_params``);
2. starting from that checkpoint, ``snes_train_policy`` trains the policy alone with Separable
   Natural Evolution Strategies (SNES) on a classification-accuracy reward.

What is gated (``gate``): "output" gates the backbone's output channels (safe with batch-norm
backbones: a gain before a batch-norm in training mode would be normalised away); "convs"
gates the output filters of every ``nn.Conv2d`` of the backbone, the paper's setting, for
backbones without batch-norm. Policies: "linear" (gains from every observation), "diagonal"
(each filter's gain from its own observation), "bias" (constant gains).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from models.backbones import build_backbone
from models.layers import pooled
from models.protocol import AttentionModel, ModelOutput, Steps
from models.registry import register_model

GATES = ("output", "convs")
POLICIES = ("linear", "diagonal", "bias")


class GainPolicy(nn.Module):
    """Observation (B, D) -> gains (B, D) in (0, 2): ``2 sigmoid(z)``, ``z`` from the policy.

    Zero-initialised, so every gain starts at exactly 1.
    """

    def __init__(self, dim: int, kind: str):
        super().__init__()
        if kind not in POLICIES:
            raise ValueError(f"unknown dasNet policy {kind!r}; expected one of {POLICIES}")
        self.kind = kind
        self.bias = nn.Parameter(torch.zeros(dim))
        if kind == "linear":
            self.weight = nn.Parameter(torch.zeros(dim, dim))
        elif kind == "diagonal":
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, obs: Tensor) -> Tensor:
        if self.kind == "linear":
            z = obs @ self.weight.t() + self.bias
        elif self.kind == "diagonal":
            z = obs * self.weight + self.bias
        else:
            z = self.bias.expand_as(obs)
        return 2.0 * torch.sigmoid(z)


class _GateState:
    """Gains of the current pass and the observations recorded during it (shared by hooks)."""

    def __init__(self) -> None:
        self.gains: Tensor | None = None
        self.obs: list[Tensor] = []


class _GateHook:
    """Forward hook multiplying a conv's output filters ``lo:hi`` by the current gains.

    A class rather than a closure so that ``copy.deepcopy`` of the model copies the hook and
    the state it reads consistently.
    """

    def __init__(self, state: _GateState, lo: int, hi: int):
        self.state, self.lo, self.hi = state, lo, hi

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if self.state.gains is not None:
            output = output * self.state.gains[:, self.lo : self.hi, None, None]
        self.state.obs.append(output.mean(dim=(-2, -1)))
        return output


def attach_gates(features: nn.Module, gate: str, state: _GateState) -> int:
    """Prepare ``features`` for gating: with ``gate == "convs"`` a ``_GateHook`` on every
    ``nn.Conv2d`` (their filters in order make the gain vector); "output" gates the backbone's
    output channels in ``gated_pass``. Returns the number of gains."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if gate == "output":
        return features.out_channels
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    offsets = [0, *torch.tensor([c.out_channels for c in convs]).cumsum(0).tolist()]
    for conv, lo, hi in zip(convs, offsets[:-1], offsets[1:], strict=True):
        conv.register_forward_hook(_GateHook(state, lo, hi))
    return offsets[-1]


def gated_pass(net: nn.Module, x: Tensor, gains: Tensor | None) -> tuple[Tensor, Tensor]:
    """One pass of ``net.features`` over (B, C, h, w) ``x`` with ``gains`` (B, gain_dim) or None
    (all 1): returns the feature map (B, D, h', w') and the observation (B, gain_dim), the mean
    activation of every gated filter. ``net`` has ``features``, ``gate`` and ``_state``."""
    net._state.gains, net._state.obs = gains, []
    try:
        fmap = net.features(x)
        if net.gate == "output":
            if gains is not None:
                fmap = fmap * gains[:, :, None, None]
            obs = fmap.mean(dim=(-2, -1))
        else:
            obs = torch.cat(net._state.obs, dim=-1)
    finally:
        net._state.gains, net._state.obs = None, []
    return fmap, obs


def gated_passes(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``net.passes`` passes, each pass's gains from ``net.policy`` on the previous pass's
    observation: the last feature map (B, D, h', w') and its gains (B, gain_dim) (ones when
    there is one pass)."""
    gains = None
    fmap, obs = gated_pass(net, x, None)
    for _ in range(net.passes - 1):
        gains = net.policy(obs.detach())
        fmap, obs = gated_pass(net, x, gains)
    if gains is None:
        gains = x.new_ones((x.shape[0], net.gain_dim))
    return fmap, gains


class GatedBackbone(nn.Module):
    """dasNet's gated CNN as a backbone (e.g. ATS's feature network): (N, C, h, w) -> the last
    pass's feature map (N, D, h', w'). ``passes`` passes of ``backbone``; the gains of each pass
    come from the zero-initialised ``policy`` (all 1 until SNES trains it; no gradient).
    Built by ``models.backbones.build_backbone("dasnet", ...)``."""

    def __init__(self, in_channels: int = 3, *, backbone: str = "small_cnn",
                 backbone_kwargs: dict | None = None, passes: int = 2, gate: str = "output",
                 policy: str = "diagonal", se: bool = False, cbam: bool = False):
        super().__init__()
        if passes < 1:
            raise ValueError(f"need passes >= 1, got {passes}")
        self.passes, self.gate = passes, gate
        self.features = build_backbone(backbone, in_channels, se=se, cbam=cbam, **(backbone_kwargs or {}))
        self.out_channels = self.features.out_channels
        self._state = _GateState()
        self.gain_dim = attach_gates(self.features, gate, self._state)
        self.policy = GainPolicy(self.gain_dim, policy)
        self.policy.requires_grad_(False)  # trained by SNES, never by the optimiser

    def forward(self, x: Tensor) -> Tensor:
        return gated_passes(self, x)[0]


class DasNet(AttentionModel):
    """dasNet classifier of the view (see the module docstring). Reads no patches.

    Args:
        num_classes, view_size: as every model. backbone: feature network name or module.
        backbone_kwargs: keyword arguments of the backbone builder, e.g. ``{"se": true}``,
            ``{"norm": "group"}`` (``models.backbones.build_backbone``).
        passes: forward passes per image (>= 1; 1 = a plain CNN).
        gate: "output" or "convs". policy: "linear", "diagonal" or "bias".
    """

    def __init__(
        self,
        num_classes: int,
        view_size: tuple[int, int],
        backbone: str | nn.Module = "small_cnn",
        in_channels: int = 3,
        backbone_kwargs: dict | None = None,
        passes: int = 3,
        gate: str = "output",
        policy: str = "diagonal",
    ):
        super().__init__()
        if passes < 1:
            raise ValueError(f"need passes >= 1, got {passes}")
        self.view_size = tuple(view_size)
        self.passes, self.gate = passes, gate
        self.features = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)
        self._state = _GateState()
        self.gain_dim = attach_gates(self.features, gate, self._state)
        self.policy = GainPolicy(self.gain_dim, policy)
        self.policy.requires_grad_(False)  # trained by SNES, never by the optimiser

    def no_grad_params(self) -> list[str]:
        """The policy's parameters: trained by ``snes_train_policy``, not by gradients."""
        return [f"policy.{name}" for name, _ in self.policy.named_parameters()]

    def classify(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """``passes`` passes over (B, C, h, w) views: returns logits (B, classes) and the gains
        (B, gain_dim) of the last pass."""
        fmap, gains = gated_passes(self, views)
        return self.classifier(pooled(fmap)), gains

    def steps(self, views: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Steps:
        yield from ()  # reads nothing beyond the view
        logits, gains = self.classify(views)
        return ModelOutput(logits=logits, extras={"gains": gains.detach()})


# ------------------------------------------------------------------------------------------
# Separable Natural Evolution Strategies
# ------------------------------------------------------------------------------------------


def snes_utilities(popsize: int) -> Tensor:
    """Fitness shaping: ``u_k = max(0, ln(n/2 + 1) - ln k) / sum_j max(...) - 1/n`` for ranks
    k = 1..n (best first). Sums to 0; only the better half gets positive weight."""
    ranks = torch.arange(1, popsize + 1, dtype=torch.float64)
    raw = (math.log(popsize / 2 + 1) - torch.log(ranks)).clamp(min=0.0)
    return raw / raw.sum() - 1.0 / popsize


@dataclass
class SNES:
    """Separable NES (Schaul et al., 2011): a diagonal Gaussian search distribution.

    Defaults are the standard ones: population ``4 + floor(3 ln d)``, mean learning rate 1,
    sigma learning rate ``(3 + ln d) / (5 sqrt d)``.

    Attributes:
        mean: (d,) float64 centre. sigma: (d,) float64 per-dimension standard deviations.
    """

    mean: Tensor
    sigma: Tensor
    popsize: int = 0
    lr_mean: float = 1.0
    lr_sigma: float = 0.0
    utilities: Tensor = field(init=False)

    def __post_init__(self) -> None:
        d = self.mean.numel()
        self.mean = self.mean.detach().to(torch.float64).clone()
        self.sigma = self.sigma.detach().to(torch.float64).clone().expand(d).clone()
        self.popsize = self.popsize or 4 + int(3 * math.log(d))
        self.lr_sigma = self.lr_sigma or (3 + math.log(d)) / (5 * math.sqrt(d))
        self.utilities = snes_utilities(self.popsize)

    def ask(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw a population: standard-normal noise (n, d) and candidates ``mean + sigma s``."""
        noise = torch.randn((self.popsize, self.mean.numel()), generator=generator, dtype=torch.float64)
        return noise, self.mean + self.sigma * noise

    def tell(self, noise: Tensor, fitness: Tensor) -> None:
        """Update from the population's (n,) ``fitness`` (higher is better)."""
        order = torch.argsort(fitness.to(torch.float64), descending=True, stable=True)
        u = self.utilities[:, None]
        s = noise[order]
        grad_mean = (u * s).sum(0)
        grad_sigma = (u * (s * s - 1.0)).sum(0)
        self.mean = self.mean + self.lr_mean * self.sigma * grad_mean
        self.sigma = self.sigma * torch.exp(0.5 * self.lr_sigma * grad_sigma)


def accuracy_reward(logits: Tensor, labels: Tensor) -> float:
    """Fraction of correct predictions: the dasNet reward."""
    return float((logits.argmax(-1) == labels).to(torch.float64).mean())


def likelihood_reward(logits: Tensor, labels: Tensor) -> float:
    """Accuracy plus the mean log-probability of the true class, from (B, classes) ``logits``
    and (B,) ``labels``. After stage 1 a training batch is classified almost perfectly, so
    accuracy alone ranks most SNES candidates equal; the likelihood term (<= 0, near 0 when
    every true class is near certain) still tells a more confident policy from a less
    confident one (``bench/learning.py``'s ``ats_dasnet`` uses it, README "It learns")."""
    loglik = torch.log_softmax(logits.to(torch.float64), -1).gather(-1, labels[:, None]).mean()
    return accuracy_reward(logits, labels) + float(loglik)


def _snes_generation(
    es: SNES,
    score: Callable[[Tensor, Any], float],
    batch: Any,
    generator: torch.Generator | None,
) -> dict[str, float]:
    """One SNES generation on one batch: score the mean, draw a population, score it, update.

    Returns the record of ``snes_search``."""
    centre = score(es.mean, batch)
    noise, population = es.ask(generator)
    fitness = torch.tensor([score(x, batch) for x in population])
    es.tell(noise, fitness)
    return {
        "mean_reward": float(fitness.mean()),
        "best_reward": float(fitness.max()),
        "centre_reward": centre,
        "sigma_mean": float(es.sigma.mean()),
    }


def snes_search(
    params: list[nn.Parameter],
    batches: Iterable[Any],
    reward: Callable[[Any], float],
    generator: torch.Generator | None = None,
    *,
    sigma0: float = 0.5,
    popsize: int = 0,
    on_generation: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """SNES over ``params`` (written in place), one generation per batch.

    Each generation draws a population of parameter vectors around the current mean, writes
    each into ``params`` and scores it by ``reward(batch)`` (the caller runs its model, without
    gradients, in eval mode), and updates the search distribution. At the end ``params`` hold
    the distribution's mean. ``on_generation(index, record)`` is called after each generation
    (the params then hold that generation's last candidate, not the mean).

    Returns one record per generation: ``{"mean_reward", "best_reward", "centre_reward",
    "sigma_mean"}``, where ``centre_reward`` is the reward of the mean *before* that
    generation's update and ``sigma_mean`` the mean search deviation after it.
    """
    start = parameters_to_vector(params).detach()
    es = SNES(start, torch.full_like(start, sigma0, dtype=torch.float64), popsize=popsize)

    def score(vector: Tensor, batch: Any) -> float:
        vector_to_parameters(vector.to(start.dtype), params)
        return reward(batch)

    history = []
    with torch.no_grad():
        for batch in batches:
            history.append(_snes_generation(es, score, batch, generator))
            if on_generation is not None:
                on_generation(len(history) - 1, dict(history[-1]))
        vector_to_parameters(es.mean.to(start.dtype), params)
    return history


def snes_train_policy(
    model: DasNet,
    batches: Iterable[tuple[Tensor, ...]],
    generator: torch.Generator | None = None,
    *,
    sigma0: float = 0.5,
    popsize: int = 0,
    reward: Callable[[Tensor, Tensor], float] = accuracy_reward,
    on_generation: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Stage 2 of dasNet: train ``model.policy`` with SNES (``snes_search``), one generation
    per batch, the CNN left as it is (a trained checkpoint), the model in eval mode.

    Args:
        model: a ``DasNet`` (weights of a trained CNN loaded).
        batches: iterable of ``(views, labels)`` or ``(views, sizes, labels)`` with views
            (B, C, h, w) float in [0, 1] and labels (B,) int64.
        generator: the SNES noise generator. sigma0: initial standard deviation of every
            policy parameter. popsize: population size (0: the SNES default).
        reward: ``reward(logits, labels) -> float`` (default: accuracy).
        on_generation: as ``snes_search``'s.
    Returns ``snes_search``'s records.
    """
    was_training = model.training
    model.eval()
    try:
        return snes_search(
            list(model.policy.parameters()), batches,
            lambda batch: reward(model.classify(batch[0])[0], batch[-1]), generator,
            sigma0=sigma0, popsize=popsize, on_generation=on_generation,
        )
    finally:
        model.train(was_training)


def policy_reward(model: DasNet, views: Tensor, labels: Tensor) -> float:
    """Accuracy of ``model`` (eval mode, no gradients) on one batch."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = accuracy_reward(model.classify(views)[0], labels)
    model.train(was_training)
    return value


@register_model("dasnet")
def dasnet(**kwargs) -> DasNet:
    """dasNet over the view: ``passes`` passes with SNES-trained per-filter gains (keyword
    arguments of ``DasNet``; ``num_classes`` 10 and ``view_size`` (64, 64) by default)."""
    return DasNet(**{"num_classes": 10, "view_size": (64, 64), **kwargs})
