"""dasNet: SNES itself, and SNES finding the known best gains of a constructed problem."""

import copy
import math

import pytest
import torch
from torch import nn

from models.dasnet import (
    SNES,
    DasNet,
    likelihood_reward,
    policy_reward,
    snes_train_policy,
    snes_utilities,
)
from tests.models.tiny_nets import (
    TinyConv,
)


def test_snes_utilities_are_the_standard_fitness_shaping():
    u = snes_utilities(6)
    raw = torch.tensor([math.log(4), math.log(2), math.log(4 / 3), 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(u, raw / raw.sum() - 1 / 6)
    assert abs(float(u.sum())) < 1e-12


def test_snes_defaults_and_convergence_on_a_known_optimum():
    target = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    es = SNES(torch.zeros(5), torch.ones(5))
    assert es.popsize == 4 + int(3 * math.log(5))
    assert es.lr_sigma == (3 + math.log(5)) / (5 * math.sqrt(5))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        noise, population = es.ask(g)
        es.tell(noise, -((population - target) ** 2).sum(1))
    assert torch.allclose(es.mean, target, atol=0.05)
    assert (es.sigma < 0.1).all()  # the search distribution contracted around the optimum


class _Identity1x1(nn.Module):
    """A fixed 'trained CNN': its two output channels are its two input channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        self.out_channels = 2

    def forward(self, x):
        return self.conv(x)


def _batch(g, n=64):
    """Channel 0 carries the label (+-1); channel 1 is loud noise that the classifier also adds."""
    labels = torch.randint(0, 2, (n,), generator=g)
    noise = torch.randn(n, generator=g) * 3
    views = torch.stack([labels.float() * 2 - 1, noise], 1)[:, :, None, None].expand(n, 2, 4, 4)
    return views.clone(), labels


def test_snes_improves_the_reward_towards_the_known_best_gains():
    model = DasNet(2, (4, 4), backbone=_Identity1x1(), in_channels=2, passes=2, policy="bias")
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
        model.classifier.bias.zero_()
    test = _batch(torch.Generator().manual_seed(99), 1024)
    before = policy_reward(model, *test)
    g = torch.Generator().manual_seed(0)
    history = snes_train_policy(model, (_batch(g) for _ in range(40)), torch.Generator().manual_seed(1))
    after = policy_reward(model, *test)
    # best gains: keep the signal channel, silence the noise channel -> 100 % accuracy
    gains = 2 * torch.sigmoid(model.policy.bias)
    assert before < 0.75 and after > 0.97
    assert gains[1] < 0.05 and gains[0] > 0.5
    assert history[-1]["centre_reward"] > history[0]["centre_reward"]


def test_zero_policy_keeps_every_gain_at_one():
    torch.manual_seed(0)
    model = DasNet(3, (16, 16), backbone=TinyConv(), passes=3).eval()
    views = torch.rand(2, 3, 16, 16)
    logits, gains = model.classify(views)
    plain = model.classifier(model.features(views).mean(dim=(-2, -1)))
    assert torch.allclose(gains, torch.ones_like(gains)) and torch.allclose(logits, plain, atol=1e-6)


def test_conv_gates_act_inside_the_network_and_survive_deepcopy():
    torch.manual_seed(0)
    model = DasNet(3, (16, 16), backbone=TinyConv(), passes=2, gate="convs", policy="bias").eval()
    assert model.gain_dim == 16  # two convs of 8 filters
    views = torch.rand(2, 3, 16, 16)
    base = model.classify(views)[0]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.policy.bias[:8] = -20.0  # silence the first conv's filters in pass 2
    silenced, gains = twin.classify(views)
    assert torch.allclose(gains[:, :8], torch.zeros(2, 8), atol=1e-8)
    assert not torch.allclose(silenced, base)
    assert torch.allclose(model.classify(views)[0], base)  # the original is untouched


def test_policy_gets_no_gradient_and_says_so():
    torch.manual_seed(0)
    model = DasNet(3, (16, 16), backbone=TinyConv(), passes=2, policy="linear")
    steps = model.steps(torch.rand(2, 3, 16, 16), torch.tensor([[16, 16], [16, 16]]))
    try:
        next(steps)
    except StopIteration as stop:
        out = stop.value
    model.loss(out, torch.tensor([0, 2])).backward()
    assert set(model.no_grad_params()) == {"policy.weight", "policy.bias"}
    named = dict(model.named_parameters())
    assert all(named[n].grad is None and not named[n].requires_grad for n in model.no_grad_params())
    assert all(p.grad is not None for n, p in named.items() if not n.startswith("policy."))


def test_gated_backbone_is_a_dasnet_inside_another_model():
    """build_backbone("dasnet"): the last pass's feature map is the inner CNN's times the
    policy's gains, and SNES (``snes_search``) writes only the policy."""
    from models.backbones import build_backbone
    from models.dasnet import snes_search

    torch.manual_seed(0)
    gated = build_backbone("dasnet", 3, backbone=TinyConv(), passes=2, policy="bias")
    views = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        gated.policy.bias[:] = torch.linspace(-2, 2, gated.gain_dim)
        assert torch.allclose(gated(views).mean((-2, -1)), gated.features(views).mean((-2, -1))
                              * 2 * torch.sigmoid(gated.policy.bias))
    before = {n: p.clone() for n, p in gated.named_parameters()}
    snes_search(list(gated.policy.parameters()), [0, 1], lambda _: float(gated(views).mean()),
                torch.Generator().manual_seed(0))
    moved = {n for n, p in gated.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"policy.bias"}


def test_likelihood_reward_is_accuracy_plus_mean_true_class_log_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    logp = torch.log_softmax(logits.double(), -1)
    want = 0.5 + (float(logp[0, 0]) + float(logp[1, 2])) / 2  # one of two right
    assert likelihood_reward(logits, labels) == pytest.approx(want, abs=1e-12)
    # two policies with the same accuracy: the more confident one scores higher
    sure = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    unsure = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert likelihood_reward(sure, torch.tensor([0, 2])) > likelihood_reward(unsure, torch.tensor([0, 2]))
