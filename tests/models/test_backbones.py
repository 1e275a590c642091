"""Built-in backbones: output shapes, SE/CBAM switches, parameter counts of the standard nets."""

import sys
import types

import pytest
import torch
from torch import nn

from models.backbones import backbone_names, build_backbone
from models.layers import CBAM, SEBlock


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head(channels: int, classes: int = 1000) -> int:
    return channels * classes + classes


# (name, kwargs, input side, expected output side)
SHAPES = [
    ("ats_feature", {}, 50, 50),
    ("ats_feature", {"padding": "valid"}, 50, 38),  # the reference's valid convs
    ("ats_attention", {}, 45, 45),
    ("small_cnn", {}, 64, 8),
    ("small_cnn", {"stem_stride": 2}, 64, 4),  # a strided stem halves every map after it
    ("resnet18", {"width": 0.25}, 64, 2),
    ("resnet18", {"stem": "small", "width": 0.25}, 32, 4),
    ("resnet34", {"width": 0.125}, 32, 1),
    ("resnet50", {"width": 0.125}, 32, 1),
    ("efficientnet_b0", {"width": 0.25}, 32, 1),
]


@pytest.mark.parametrize("name,kwargs,side,out_side", SHAPES)
@pytest.mark.parametrize("switch", [{}, {"se": True}, {"cbam": True}])
def test_output_shape_and_gradients(name, kwargs, side, out_side, switch):
    net = build_backbone(name, in_channels=2, **kwargs, **switch)
    torch.manual_seed(0)
    x = torch.rand(2, 2, side, side)
    y = net(x)
    assert y.shape == (2, net.out_channels, out_side, out_side)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_out_channels_of_each_family():
    assert build_backbone("ats_feature").out_channels == 32
    assert build_backbone("ats_attention").out_channels == 1
    assert build_backbone("ats_feature", widths=(16, 24), kernels=(7, 3)).out_channels == 24
    assert build_backbone("resnet18", width=0.5).out_channels == 256
    assert build_backbone("resnet50", width=0.5).out_channels == 1024
    assert build_backbone("efficientnet_b0").out_channels == 1280


@pytest.mark.parametrize(
    "name,expected",
    [
        # torchvision's figures with a 1000-class head
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
    ],
)
def test_resnet_parameter_counts_match_the_standard(name, expected):
    net = build_backbone(name)
    assert n_params(net) + head(net.out_channels) == expected


def test_se_resnet50_and_efficientnet_b0_parameter_counts():
    # SE-ResNet-50: 28.09 M (Hu et al.; timm's seresnet50 has exactly 28,088,024)
    se50 = build_backbone("resnet50", se=True)
    assert n_params(se50) + head(2048) == 28_088_024
    assert sum(isinstance(m, SEBlock) for m in se50.modules()) == 16  # one per bottleneck
    # EfficientNet-B0: 5.3 M (Tan & Le; torchvision's efficientnet_b0 has 5,288,548)
    b0 = build_backbone("efficientnet_b0")
    assert n_params(b0) + head(1280) == 5_288_548
    cbam_b0 = build_backbone("efficientnet_b0", cbam=True)
    assert sum(isinstance(m, CBAM) for m in cbam_b0.modules()) == 16  # one per MBConv
    assert abs(n_params(cbam_b0) + head(1280) - 5_288_548) / 5_288_548 < 0.05


def test_se_and_cbam_are_inserted_in_every_block():
    for name, blocks in [("resnet18", 8), ("resnet34", 16), ("small_cnn", 3), ("ats_feature", 4)]:
        net = build_backbone(name, se=True, cbam=True)
        assert sum(isinstance(m, SEBlock) for m in net.modules()) == blocks, name
        assert sum(isinstance(m, CBAM) for m in net.modules()) == blocks, name
        plain = build_backbone(name)
        assert not any(isinstance(m, (SEBlock, CBAM)) for m in plain.modules()), name


def test_group_norm_makes_a_backbone_batch_invariant_in_training():
    torch.manual_seed(0)
    net = build_backbone("small_cnn", norm="group", widths=(8, 16)).train()
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(net(x)[1:2], net(x[1:2]), atol=1e-5)


def test_unknown_names_and_arguments_are_reported():
    with pytest.raises(KeyError, match="unknown backbone 'resnet7'.*resnet18"):
        build_backbone("resnet7")
    with pytest.raises(TypeError, match="bad arguments for backbone 'small_cnn'"):
        build_backbone("small_cnn", depth=3)
    with pytest.raises(ValueError, match="unknown norm"):
        build_backbone("resnet18", norm="layer")
    assert "efficientnet_b0" in backbone_names()


def test_timm_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match="timm:resnet18.*needs the timm package"):
        build_backbone("timm:resnet18")


class _FakeTimmNet(nn.Module):
    pretrained_cfg = {"classifier": "fc"}

    def __init__(self, in_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3)
        self.num_features = 6

    def forward_features(self, x):
        return self.conv(x)


def test_timm_backbone_uses_forward_features_and_local_weights(monkeypatch, tmp_path):
    calls = []

    def create_model(name, pretrained, num_classes, global_pool, in_chans):
        calls.append((name, pretrained, num_classes, global_pool, in_chans))
        return _FakeTimmNet(in_chans)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    source = _FakeTimmNet(1)
    state = {**source.state_dict(), "fc.weight": torch.zeros(10, 6)}  # a classifier to drop
    torch.save(state, tmp_path / "w.pth")
    net = build_backbone("timm:tiny_net", in_channels=1, weights_path=str(tmp_path / "w.pth"))
    assert calls == [("tiny_net", False, 0, "", 1)]  # never pretrained: nothing downloads
    assert net.out_channels == 6
    assert torch.equal(net.model.conv.weight, source.conv.weight)
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 6, 6, 6)
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not fit"):
        build_backbone("timm:tiny_net", in_channels=1, weights_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="only in built-in"):
        build_backbone("timm:tiny_net", se=True)
