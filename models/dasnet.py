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
        if passes < 1 or gate not in GATES:
            raise ValueError(f"need passes >= 1 and gate in {GATES}, got {passes}, {gate!r}")
        self.view_size = tuple(view_size)
        self.passes, self.gate = passes, gate
        self.features = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.classifier = nn.Linear(self.features.out_channels, num_classes)
        convs = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]
        self._gated_sizes = (
            [c.out_channels for c in convs] if gate == "convs" else [self.features.out_channels]
        )
        self.gain_dim = sum(self._gated_sizes)
        self.policy = GainPolicy(self.gain_dim, policy)
        self.policy.requires_grad_(False)  # trained by SNES, never by the optimiser
        self._state = _GateState()
        if gate == "convs":
            offsets = [0, *torch.tensor(self._gated_sizes).cumsum(0).tolist()]
            for conv, lo, hi in zip(convs, offsets[:-1], offsets[1:], strict=True):
                conv.register_forward_hook(_GateHook(self._state, lo, hi))

    def no_grad_params(self) -> list[str]:
        """The policy's parameters: trained by ``snes_train_policy``, not by gradients."""
        return [f"policy.{name}" for name, _ in self.policy.named_parameters()]

    def _pass(self, views: Tensor, gains: Tensor | None) -> tuple[Tensor, Tensor]:
        """One gated pass: returns the pooled features (B, D) and the observation (B, gain_dim)."""
        self._state.gains, self._state.obs = gains, []
        try:
            fmap = self.features(views)
            if self.gate == "output":
                if gains is not None:
                    fmap = fmap * gains[:, :, None, None]
                obs = fmap.mean(dim=(-2, -1))
            else:
                obs = torch.cat(self._state.obs, dim=-1)
        finally:
            self._state.gains, self._state.obs = None, []
        return pooled(fmap), obs

    def classify(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """``passes`` passes over (B, C, h, w) views: returns logits (B, classes) and the gains
        (B, gain_dim) of the last pass."""
        gains = None
        feat, obs = self._pass(views, None)
        for _ in range(self.passes - 1):
            gains = self.policy(obs.detach())
            feat, obs = self._pass(views, gains)
        if gains is None:
            gains = views.new_ones((views.shape[0], self.gain_dim))
        return self.classifier(feat), gains

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


def _snes_generation(
    es: SNES,
    score: Callable[[Tensor, Tensor, Tensor], float],
    views: Tensor,
    labels: Tensor,
    generator: torch.Generator | None,
) -> dict[str, float]:
    """One SNES generation on one batch: score the mean, draw a population, score it, update.

    Returns the record of ``snes_train_policy``."""
    centre = score(es.mean, views, labels)
    noise, population = es.ask(generator)
    fitness = torch.tensor([score(x, views, labels) for x in population])
    es.tell(noise, fitness)
    return {
        "mean_reward": float(fitness.mean()),
        "best_reward": float(fitness.max()),
        "centre_reward": centre,
        "sigma_mean": float(es.sigma.mean()),
    }


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
    """Stage 2 of dasNet: train ``model.policy`` with SNES, one generation per batch.

    The CNN is left as it is (a trained checkpoint). Each generation draws a population of
    policy parameter vectors around the current mean, scores each by ``reward`` on the same
    batch (model in eval mode, no gradients), and updates the search distribution. At the end
    the policy holds the distribution's mean.

    Args:
        model: a ``DasNet`` (weights of a trained CNN loaded).
        batches: iterable of ``(views, labels)`` or ``(views, sizes, labels)`` with views
            (B, C, h, w) float in [0, 1] and labels (B,) int64.
        generator: the SNES noise generator.
        sigma0: initial standard deviation of every policy parameter.
        popsize: population size (0: the SNES default).
        reward: ``reward(logits, labels) -> float`` (default: accuracy).
        on_generation: called as ``on_generation(index, record)`` after each generation (to
            report progress while it runs); the policy then holds that generation's last
            candidate, not the mean.
    Returns one record per generation: ``{"mean_reward", "best_reward", "centre_reward",
    "sigma_mean"}``, where ``centre_reward`` is the reward of the mean *before* that
    generation's update and ``sigma_mean`` the mean search deviation after it.
    """
    params = list(model.policy.parameters())
    start = parameters_to_vector(params).detach()
    es = SNES(start, torch.full_like(start, sigma0, dtype=torch.float64), popsize=popsize)
    was_training = model.training
    model.eval()
    history = []

    def score(vector: Tensor, views: Tensor, labels: Tensor) -> float:
        vector_to_parameters(vector.to(start.dtype), params)
        return reward(model.classify(views)[0], labels)

    try:
        with torch.no_grad():
            for batch in batches:
                record = _snes_generation(es, score, batch[0], batch[-1], generator)
                history.append(record)
                if on_generation is not None:
                    on_generation(len(history) - 1, dict(record))
            vector_to_parameters(es.mean.to(start.dtype), params)
    finally:
        model.train(was_training)
    return history


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
