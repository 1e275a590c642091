"""SE, CBAM and soft-mask blocks: shapes, hand-computed gates, channel-then-spatial ordering."""

import pytest
import torch
import torch.nn.functional as F

from models.backbones import build_backbone
from models.layers import CBAM, SEBlock, SoftMask, attention_block, random_shift


def test_se_output_is_input_times_hand_computed_sigmoid_gates():
    se = SEBlock(4, ratio=2)  # hidden width 2
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]))
        se.fc1.bias.copy_(torch.tensor([0.0, 1.0]))
        se.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]))
        se.fc2.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 3.0]))
    # channel means 2, 1, 0.5, -3 (a 2x2 map per channel)
    x = torch.tensor(
        [[[[1.0, 3.0], [2.0, 2.0]], [[1.0] * 2] * 2, [[0.0, 1.0], [0.0, 1.0]], [[-3.0] * 2] * 2]]
    )
    # fc1: [2, -(-3) + 1] = [2, 4] -> relu [2, 4]; fc2: [2, 4, 2*2 - 1, 3] = [2, 4, 3, 3]
    gates = torch.sigmoid(torch.tensor([2.0, 4.0, 3.0, 3.0]))
    assert torch.allclose(se.gate(x), gates[None])
    assert torch.allclose(se(x), x * gates[None, :, None, None])


@pytest.mark.parametrize(
    "block", [SEBlock(24), CBAM(24), CBAM(24, ratio=4, kernel=3), SoftMask(24).eval()]
)
def test_blocks_keep_the_shape(block):
    x = torch.randn(3, 24, 9, 7)
    assert block(x).shape == x.shape


def test_se_hidden_width_and_parameter_count():
    se = SEBlock(64, ratio=16)
    assert se.fc1.out_features == 4
    assert sum(p.numel() for p in se.parameters()) == 64 * 4 + 4 + 4 * 64 + 64
    assert SEBlock(8, ratio=16).fc1.out_features == 1  # never zero-width


def test_cbam_applies_channel_then_spatial_gate():
    torch.manual_seed(0)
    cbam = CBAM(8, ratio=2, kernel=7)
    with torch.no_grad():  # trained-like weights (they start at zero: gates of exactly 1/2)
        for p in cbam.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 8, 6, 5)
    mlp = cbam.channel.mlp
    channel_gate = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    x1 = x * channel_gate
    pooled = torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)
    spatial_gate = torch.sigmoid(cbam.spatial.conv(pooled))
    expected = x1 * spatial_gate
    assert torch.allclose(cbam(x), expected, atol=1e-6)
    # the other order gives a different result, so the test pins the order
    assert not torch.allclose(cbam(x), cbam.channel(cbam.spatial(x)), atol=1e-4)


def test_cbam_starts_as_a_uniform_half():
    x = torch.randn(3, 8, 6, 5)
    assert torch.allclose(CBAM(8, ratio=2)(x), x * 0.25, atol=1e-7)


def test_blocks_are_per_sample():
    """No batch statistics: a sample's output does not depend on the rest of the batch."""
    torch.manual_seed(1)
    cbam = CBAM(16)
    with torch.no_grad():
        for p in cbam.parameters():
            p.copy_(torch.randn_like(p))
    for block in (SEBlock(16), cbam):
        x = torch.randn(4, 16, 5, 5)
        assert torch.allclose(block(x)[1:2], block(x[1:2]), atol=1e-6)


def test_attention_block_switches():
    assert isinstance(attention_block(16), torch.nn.Identity)
    assert isinstance(attention_block(16, se=True), SEBlock)
    assert isinstance(attention_block(16, cbam=True), CBAM)
    both = attention_block(16, se=True, cbam=True)
    assert [type(m) for m in both] == [SEBlock, CBAM]
    assert isinstance(attention_block(16, mask=True), SoftMask)
    every = attention_block(16, se=True, cbam=True, mask=True)
    assert [type(m) for m in every] == [SEBlock, CBAM, SoftMask]
    with pytest.raises(ValueError, match="odd"):
        CBAM(16, kernel=4)


def test_soft_mask_is_one_plus_a_hand_computed_hourglass_mask_times_the_input():
    """(1 + M) x with M = sigmoid(1x1(up(relu(bn(conv3x3(maxpool3x3/2(x))))))), eval mode."""
    torch.manual_seed(2)
    block = SoftMask(4).eval()
    with torch.no_grad():
        block.down[2].running_mean.copy_(torch.randn(4) * 0.1)
        block.down[2].running_var.copy_(torch.rand(4) + 0.5)
    x = torch.randn(2, 4, 7, 6)
    conv, bn, head = block.down[1], block.down[2], block.head
    low = F.conv2d(F.max_pool2d(x, 3, 2, 1), conv.weight, padding=1)
    low = (low - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    low = F.relu(low * bn.weight[:, None, None] + bn.bias[:, None, None])
    assert low.shape[-2:] == (4, 3)
    up = F.interpolate(low, size=(7, 6), mode="bilinear", align_corners=False)
    mask = torch.sigmoid(F.conv2d(up, head.weight, head.bias))
    assert torch.allclose(block.mask(x), mask, atol=1e-6)
    assert torch.allclose(block(x), (1 + mask) * x, atol=1e-6)
    # attention residual learning: never hides the input, at most doubles it
    ratio = block(x.abs() + 0.1) / (x.abs() + 0.1)
    assert bool((ratio > 1).all()) and bool((ratio < 2).all())


def test_small_cnn_with_the_soft_mask_trains_every_mask_weight():
    net = build_backbone("small_cnn", 1, widths=(8, 16), mask=True)
    masks = [m for m in net.modules() if isinstance(m, SoftMask)]
    assert len(masks) == 2  # one per stage
    net(torch.rand(3, 1, 24, 24)).sum().backward()
    for block in masks:
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ random_shift


def test_random_shift_moves_each_image_by_its_own_offset_with_zeros_moved_in():
    images = torch.arange(2 * 2 * 4 * 5, dtype=torch.float32).reshape(2, 2, 4, 5)
    seed = 3
    offsets = torch.randint(-2, 3, (2, 2), generator=torch.Generator().manual_seed(seed))
    out = random_shift(images, 2, torch.Generator().manual_seed(seed))
    for n, (dy, dx) in enumerate(offsets.tolist()):
        want = torch.zeros(2, 4, 5)
        for y in range(4):
            for x in range(5):
                if 0 <= y - dy < 4 and 0 <= x - dx < 5:
                    want[:, y, x] = images[n, :, y - dy, x - dx]
        assert torch.equal(out[n], want)
    assert random_shift(images, 0) is images
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(images, -1)


def test_random_shift_passes_gradients_to_the_kept_pixels_only():
    images = torch.ones(3, 1, 6, 6, requires_grad=True)
    out = random_shift(images, 2, torch.Generator().manual_seed(0))
    out.sum().backward()
    # each kept pixel appears once in the output: its gradient is 1, a dropped one's 0
    assert set(images.grad.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(images.grad.sum(dim=(1, 2, 3)), out.detach().sum(dim=(1, 2, 3)))


def test_attention_pool_starts_as_the_average_and_weights_positions_by_their_softmax():
    """AttentionPool: zero scores give the mean; set scores give the hand-computed softmax
    average; the score layer gets gradients."""
    from models.layers import AttentionPool

    fmap = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    pool = AttentionPool(3)
    assert torch.allclose(pool(fmap), fmap.mean(dim=(-2, -1)), atol=1e-6)
    with torch.no_grad():
        pool.score.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
        pool.score.bias.fill_(0.3)
    scores = (fmap * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)).sum(1) + 0.3  # (2, 4, 5)
    weights = torch.softmax(scores.flatten(1), -1)
    expected = (weights[:, None] * fmap.flatten(2)).sum(-1)
    assert torch.allclose(pool(fmap), expected, atol=1e-6)
    pool(fmap).pow(2).sum().backward()
    assert pool.score.weight.grad.abs().sum() > 0
