"""Residual Attention Network: paper parameter counts, mask activations, view classifier, backbone."""

import math

import pytest
import torch

from models.backbones import build_backbone
from models.memory import TensorPyramidSource
from models.registry import create_model
from models.residual_attention import AttentionModule, mask_activation


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_attention_56_parameter_count_matches_the_paper():
    model = create_model("residual_attention_56", num_classes=1000)
    assert abs(n_params(model) / 31.9e6 - 1.0) < 0.02


def test_attention_92_parameter_count_near_the_paper():
    # The official Caffe prototxt (fwang91/residual-attention-network, Attention-92-deploy)
    # has exactly these convolutions (stages of 1, 2 and 3 modules, p=1, t=2, r=1, two 1x1
    # convs in each mask head); built here it counts 52.47 M, 2.3 % above the paper's 51.3 M,
    # and its convolutions plus classifier alone are 52.33 M (+2.01 %), so no counting
    # convention reaches 2 %. Attention-56 built the same way is within 0.3 % of its 31.9 M.
    # We keep the official structure and state the gap instead of bending the architecture to
    # the quoted figure.
    model = create_model("residual_attention_92", num_classes=1000)
    assert abs(n_params(model) / 51.3e6 - 1.0) < 0.025
    one_more_stage2 = n_params(AttentionModule(512, depth=2))
    two_more_stage3 = 2 * n_params(AttentionModule(1024, depth=1))
    gap = n_params(model) - n_params(create_model("residual_attention_56", num_classes=1000))
    assert gap == one_more_stage2 + two_more_stage3


def test_mixed_activation_is_elementwise_sigmoid():
    x = torch.tensor([[[[-2.0, 0.0], [1.0, 3.0]]]])
    assert torch.allclose(mask_activation(x, "mixed"), torch.sigmoid(x))


def test_channel_activation_normalises_over_channels_at_each_position():
    # two channels, two positions: (3, 4) -> (0.6, 0.8); (0, 1) -> (0, 1)
    x = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # (1, 2, 1, 2)
    out = mask_activation(x, "channel")
    expected = torch.tensor([[[[0.6, 0.0]], [[0.8, 1.0]]]])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(1, 1, 2), atol=1e-5)


def test_spatial_activation_standardises_each_channel_over_space_then_sigmoid():
    # channel 0: [1, 3] -> mean 2, std 1 -> [-1, 1]; channel 1: [10, 10, ...] scaled -> same
    x = torch.tensor([[[[1.0, 3.0]], [[20.0, 60.0]]]])
    out = mask_activation(x, "spatial")
    s = 1 / (1 + math.exp(1.0))
    expected = torch.tensor([[[[s, 1 - s]], [[s, 1 - s]]]])
    assert torch.allclose(out, expected, atol=1e-5)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="mask activation"):
        mask_activation(torch.zeros(1, 1, 1, 1), "softmax")


@pytest.mark.parametrize("activation", ["mixed", "channel", "spatial"])
def test_attention_module_is_residual_in_the_mask(activation):
    torch.manual_seed(0)
    module = AttentionModule(16, depth=2, activation=activation).eval()
    x = torch.randn(2, 16, 12, 12)
    out, mask = module(x)
    assert out.shape == x.shape and mask.shape == x.shape
    # (1 + M) * T: with the mask forced to zero the module is trunk then post units
    with torch.no_grad():
        module.head[-1].weight.zero_()
    trunk = module.trunk(module.pre(x))
    out0, mask0 = module(x)
    if activation == "mixed" or activation == "spatial":
        assert torch.allclose(mask0, torch.full_like(mask0, 0.5))
        assert torch.allclose(out0, module.post(1.5 * trunk), atol=1e-5)
    else:
        assert torch.allclose(mask0, torch.zeros_like(mask0))
        assert torch.allclose(out0, module.post(trunk), atol=1e-5)


def test_small_variant_classifies_the_view_and_reads_nothing():
    model = create_model("residual_attention_small", num_classes=4, view_size=(32, 48))
    source = TensorPyramidSource.from_images({"a": torch.zeros(3, 100, 150, dtype=torch.uint8)})
    views = torch.rand(2, 3, 32, 48)
    steps = model.steps(views, torch.tensor([[100, 150], [100, 150]]))
    with pytest.raises(StopIteration) as stop:
        next(steps)
    out = stop.value.value
    assert out.logits.shape == (2, 4)
    assert out.attention.shape == (2, 32, 48)
    assert torch.allclose(out.attention.sum(dim=(-2, -1)), torch.ones(2), atol=1e-5)
    assert source.pyramids  # the source is never needed


def test_backbone_builder_gives_a_feature_network_with_out_channels():
    net = build_backbone("residual_attention_small", in_channels=1)
    fmap = net(torch.rand(3, 1, 40, 24))
    assert fmap.shape[:2] == (3, net.out_channels) and net.out_channels == 256


def test_imagenet_configuration_runs_a_tiny_forward():
    model = create_model("residual_attention_56", num_classes=3, view_size=(32, 32)).eval()
    steps = model.steps(torch.rand(1, 3, 32, 32), torch.tensor([[32, 32]]))
    with pytest.raises(StopIteration) as stop:
        next(steps)
    assert stop.value.value.logits.shape == (1, 3)


def test_zero_mask_init_gives_a_uniform_half_mask_and_the_default_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12)
    _, mask = AttentionModule(16, depth=1, mask_init="zero").eval()(x)
    assert torch.allclose(mask, torch.full_like(mask, 0.5))
    _, mask = AttentionModule(16, depth=1).eval()(x)
    assert mask.std() > 1e-3
    net = build_backbone("residual_attention_patch", 1, mask_init="zero")
    heads = [m.head[-1].weight for m in net.modules() if isinstance(m, AttentionModule)]
    assert len(heads) == 2 and all(bool((w == 0).all()) for w in heads)
    with pytest.raises(ValueError, match="mask_init"):
        AttentionModule(16, depth=1, mask_init="ones")
