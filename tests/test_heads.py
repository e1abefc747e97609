"""Discriminator heads: shapes (tiny and real-size on meta), GroupNorm rule, gradients, taps, errors."""

import pytest
import torch
from torch import nn

from adm_megatron.heads import (
    DiscriminatorHead2D,
    DiscriminatorHead3D,
    MultiHeadDiscriminator,
    group_norm_groups,
    tapped_block_indices,
)


# ---------------------------------------------------------------- GroupNorm groups rule
@pytest.mark.parametrize(
    "channels,groups",
    [(1, 1), (8, 8), (16, 16), (32, 32), (48, 24), (64, 32), (96, 32), (100, 25), (37, 1),
     (256, 32), (1536, 32), (1920, 32), (2432, 32), (3072, 32)],
)
def test_group_norm_groups(channels, groups):
    assert group_norm_groups(channels) == groups


def test_group_norm_groups_is_largest_divisor_at_most_32():
    for c in range(1, 300):
        g = group_norm_groups(c)
        assert c % g == 0 and g <= 32
        assert all(c % d for d in range(g + 1, min(32, c) + 1))


@pytest.mark.parametrize("cls", [DiscriminatorHead2D, DiscriminatorHead3D])
@pytest.mark.parametrize("hidden,groups", [(8, 8), (16, 16), (48, 24), (64, 32)])
def test_heads_use_group_rule(cls, hidden, groups):
    head = cls(8, hidden_channels=hidden, num_blocks=2)
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2
    assert all(n.num_groups == groups and n.num_channels == hidden for n in norms)


# ---------------------------------------------------------------- 2D head shapes
def _ref_size_2d(n, num_blocks, min_size):
    for _ in range(num_blocks):  # halve (floor) only if the result keeps >= min_size pixels
        n = n // 2 if n // 2 >= min_size else n
    return n


def test_ref_size_2d_hand_values():
    assert [_ref_size_2d(n, 2, 2) for n in (1, 2, 3, 4, 5, 8, 16, 30, 45)] == [1, 2, 3, 2, 2, 2, 4, 7, 11]
    assert [_ref_size_2d(n, 2, 1) for n in (1, 2, 3, 4, 5, 8, 16)] == [1, 1, 1, 1, 1, 2, 4]


@pytest.mark.parametrize("c", [8, 32])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 4), (1, 7), (8, 3), (16, 16)])
@pytest.mark.parametrize("num_blocks", [1, 3])
@pytest.mark.parametrize("min_size", [1, 2])
def test_head2d_shapes_tiny(c, hw, num_blocks, min_size):
    torch.manual_seed(0)
    head = DiscriminatorHead2D(c, hidden_channels=16, num_blocks=num_blocks, min_size=min_size)
    x = torch.randn(3, c, *hw)
    logits, logit_map = head(x, return_map=True)
    h, w = (_ref_size_2d(n, num_blocks, min_size) for n in hw)
    assert DiscriminatorHead2D.output_size(*hw, num_blocks, min_size) == (h, w)
    assert logits.shape == (3,)
    assert logit_map.shape == (3, h, w)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logit_map.mean(dim=(1, 2)))
    torch.testing.assert_close(head(x), logits)


def test_head2d_small_dim_block_keeps_size_and_matches_same_padding_conv():
    head = DiscriminatorHead2D(8, hidden_channels=8, num_blocks=1)
    x = torch.randn(2, 8, 3, 4)
    block = head.blocks[0]
    y = block(x)
    assert y.shape == (2, 8, 3, 2)
    # reference: stride 1 with padding (1, 2) on H (3 // 2 < 2), stride 2 / padding (1, 1) on W
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 2)), block.conv.weight, block.conv.bias, stride=(1, 2)
    )
    torch.testing.assert_close(y, block.act(block.norm(ref)))
    # ordinary inputs take the plain strided conv
    x2 = torch.randn(2, 8, 4, 6)
    torch.testing.assert_close(block(x2), block.act(block.norm(block.conv(x2))))


def test_head2d_tiny_grid_logit_depends_on_input():
    # 4x4 token grid, width 8 (one channel per GroupNorm group), batch 1: the map must stay >= 2x2
    # so that GroupNorm does not normalise single values into a constant.
    torch.manual_seed(0)
    head = DiscriminatorHead2D(8, hidden_channels=8, num_blocks=3)
    a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    la, map_a = head(a, return_map=True)
    assert map_a.shape == (1, 2, 2)
    assert (la - head(b)).abs().item() > 1e-4


def test_head2d_real_size_on_meta():
    with torch.device("meta"):
        head = DiscriminatorHead2D(1536, hidden_channels=256, num_blocks=2)  # SD3-Medium width
        x = torch.empty(2, 1536, 64, 64)  # 1024 px, VAE /8, patch 2
        logits, logit_map = head(x, return_map=True)
        assert logits.shape == (2,) and logit_map.shape == (2, 16, 16)
        x = torch.empty(2, 1920, 30, 45)
        head = DiscriminatorHead2D(1920, num_blocks=3)
        logits, logit_map = head(x, return_map=True)
        assert logits.shape == (2,) and logit_map.shape == (2, 3, 5)
        assert logits.device.type == "meta"


# ---------------------------------------------------------------- 3D head shapes
def _ref_size_3d(n, num_blocks, min_size):
    for _ in range(num_blocks):  # 3x3 / s2 / p1 -> ceil(n / 2), only if that keeps >= min_size
        n = (n + 1) // 2 if n >= 2 and (n + 1) // 2 >= min_size else n
    return n


def test_ref_size_3d_hand_values():
    assert [_ref_size_3d(n, 2, 2) for n in (1, 2, 3, 4, 5, 16, 30, 45)] == [1, 2, 2, 2, 2, 4, 8, 12]
    assert [_ref_size_3d(n, 2, 1) for n in (1, 2, 3, 4, 5, 16)] == [1, 1, 1, 1, 2, 4]


@pytest.mark.parametrize("c", [8, 32])
@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 4), (16, 16)])
@pytest.mark.parametrize("min_size", [1, 2])
def test_head3d_shapes_tiny(c, t, hw, min_size):
    torch.manual_seed(0)
    head = DiscriminatorHead3D(c, hidden_channels=16, num_blocks=2, min_size=min_size)
    x = torch.randn(2, c, t, *hw)
    logits, logit_map = head(x, return_map=True)
    h, w = (_ref_size_3d(n, 2, min_size) for n in hw)
    assert DiscriminatorHead3D.output_size(t, *hw, 2, min_size) == (t, h, w)
    assert logits.shape == (2,)
    assert logit_map.shape == (2, t, h, w)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logit_map.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("hw", [(6, 5), (2, 6)])
def test_head3d_spatial_conv_is_per_frame(hw):
    torch.manual_seed(0)
    head = DiscriminatorHead3D(8, hidden_channels=8, num_blocks=1)
    block = head.blocks[0]
    x = torch.randn(2, 8, 3, *hw)
    y = block.conv3d(x)
    b, c, t, h, w = y.shape
    frames = y.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    stride = (2 if h >= 3 else 1, 2 if w >= 3 else 1)  # keep a 2-pixel dimension (min_size 2)
    ref = torch.nn.functional.conv2d(frames, block.conv2d.weight, block.conv2d.bias, stride=stride, padding=1)
    if stride == (2, 2):
        torch.testing.assert_close(ref, block.conv2d(frames))  # the plain Conv2d on each frame
    ref = ref.reshape(b, t, c, *ref.shape[-2:]).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(block(x), block.act(block.norm(ref)))


def test_head3d_tiny_grid_logit_depends_on_input():
    torch.manual_seed(0)
    head = DiscriminatorHead3D(8, hidden_channels=8, num_blocks=3)
    a, b = torch.randn(1, 8, 1, 4, 4), torch.randn(1, 8, 1, 4, 4)
    la, map_a = head(a, return_map=True)
    assert map_a.shape == (1, 1, 2, 2)
    assert (la - head(b)).abs().item() > 1e-4


def test_head3d_real_size_on_meta():
    with torch.device("meta"):
        head = DiscriminatorHead3D(1920, hidden_channels=256, num_blocks=2)  # CogVideoX-2b
        x = torch.empty(2, 1920, 13, 30, 45)  # 49 frames 480x720, VAE 4x8x8, patch 2
        logits, logit_map = head(x, return_map=True)
    assert logits.shape == (2,)
    assert logit_map.shape == (2, 13, 8, 12)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("size", [(2, 2), (5, 3), (16, 16)])
def test_gradients_reach_every_parameter(kind, size):
    torch.manual_seed(0)
    # width 64 -> 32 groups of 2 channels (with one channel per group a conv bias in front of
    # GroupNorm is cancelled exactly, so its gradient is zero by construction)
    disc = MultiHeadDiscriminator(2, 16, kind=kind, hidden_channels=64, num_blocks=3)
    shape = (2, 16, *size) if kind == "2d" else (2, 16, 2, *size)
    feats = [torch.randn(shape, requires_grad=True) for _ in range(2)]
    logits = disc(feats)
    assert logits.shape == (2, 2)
    (logits * torch.randn_like(logits)).sum().backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-4, name
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0


# ---------------------------------------------------------------- parameter counts
def _expected_params_2d(c, h, n):
    first = 16 * c * h + h + 2 * h
    rest = (n - 1) * (16 * h * h + h + 2 * h)
    return first + rest + h + 1


def _expected_params_3d(c, h, n):
    first = 27 * c * h + h + 9 * h * h + h + 2 * h
    rest = (n - 1) * (27 * h * h + h + 9 * h * h + h + 2 * h)
    return first + rest + h + 1


@pytest.mark.parametrize("c,h,n", [(8, 16, 1), (16, 16, 2), (1920, 256, 2)])
def test_param_counts(c, h, n):
    with torch.device("meta"):
        h2 = DiscriminatorHead2D(c, hidden_channels=h, num_blocks=n)
        h3 = DiscriminatorHead3D(c, hidden_channels=h, num_blocks=n)
    assert sum(p.numel() for p in h2.parameters()) == _expected_params_2d(c, h, n)
    assert sum(p.numel() for p in h3.parameters()) == _expected_params_3d(c, h, n)


def test_real_size_param_counts_are_sane():
    with torch.device("meta"):
        head3d = DiscriminatorHead3D(1920)  # defaults: hidden 256, 2 blocks
        disc = MultiHeadDiscriminator(len(tapped_block_indices(30, 3)), 1920, kind="3d")
    n3 = sum(p.numel() for p in head3d.parameters())
    assert 5e6 < n3 < 3e7  # ~14.6M: small next to a 2B backbone
    total = sum(p.numel() for p in disc.parameters())
    assert total == 10 * n3
    assert total < 0.1 * 2e9


# ---------------------------------------------------------------- taps
def test_tapped_block_indices():
    assert len(tapped_block_indices(30, 3)) == 10
    assert len(tapped_block_indices(42, 3)) == 14
    assert tapped_block_indices(24, 1) == list(range(24))
    assert len(tapped_block_indices(38, 1)) == 38
    assert tapped_block_indices(30, 3) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert tapped_block_indices(42, 3)[-1] == 41
    assert tapped_block_indices(3, 3) == [2]
    assert tapped_block_indices(7, 3, offset=0) == [0, 3, 6]
    assert tapped_block_indices(2, 1) == [0, 1]


@pytest.mark.parametrize("args", [(0, 1), (10, 0), (10, 3, 10), (10, 3, -1), (2, 3)])
def test_tapped_block_indices_rejects_bad_args(args):
    with pytest.raises(ValueError):
        tapped_block_indices(*args)


# ---------------------------------------------------------------- multi-head errors
def test_multi_head_structure():
    disc = MultiHeadDiscriminator(4, 8, kind="2d", hidden_channels=8, num_blocks=1)
    assert isinstance(disc.heads, nn.ModuleList) and len(disc.heads) == 4
    assert all(isinstance(h, DiscriminatorHead2D) for h in disc.heads)
    disc3 = MultiHeadDiscriminator(2, [8, 16], kind="3d", hidden_channels=8)
    assert all(isinstance(h, DiscriminatorHead3D) for h in disc3.heads)
    assert [h.in_channels for h in disc3.heads] == [8, 16]
    assert disc3.heads[0].blocks[0].conv3d.in_channels == 8
    assert disc3.heads[1].blocks[0].conv3d.in_channels == 16
    assert disc3.heads[0].hidden_channels == 8


def test_multi_head_columns_are_the_heads():
    torch.manual_seed(0)
    disc = MultiHeadDiscriminator(3, 8, kind="2d", hidden_channels=8, num_blocks=1)
    feats = [torch.randn(2, 8, 4, 4) for _ in range(3)]
    logits, maps = disc(feats, return_maps=True)
    assert logits.shape == (2, 3) and len(maps) == 3
    for i in range(3):
        torch.testing.assert_close(logits[:, i], disc.heads[i](feats[i]))


def test_multi_head_wrong_number_of_features():
    disc = MultiHeadDiscriminator(3, 8, kind="2d", hidden_channels=8)
    with pytest.raises(ValueError, match=r"got 2 features for 3 heads") as e:
        disc([torch.randn(1, 8, 4, 4)] * 2)
    assert "\n" not in str(e.value)


def test_multi_head_wrong_channels_names_index_and_shapes():
    disc = MultiHeadDiscriminator(3, 8, kind="3d", hidden_channels=8)
    good = torch.randn(1, 8, 2, 4, 4)
    bad = torch.randn(1, 16, 2, 4, 4)
    with pytest.raises(ValueError) as e:
        disc([good, good, bad])
    msg = str(e.value)
    assert "feature 2" in msg and "(1, 16, 2, 4, 4)" in msg and "C=8" in msg
    assert "[B, C, T, H, W]" in msg and "\n" not in msg


def test_multi_head_wrong_rank_names_index_and_shapes():
    disc = MultiHeadDiscriminator(2, 8, kind="2d", hidden_channels=8)
    with pytest.raises(ValueError) as e:
        disc([torch.randn(1, 8, 2, 4, 4), torch.randn(1, 8, 4, 4)])
    msg = str(e.value)
    assert "feature 0" in msg and "(1, 8, 2, 4, 4)" in msg and "[B, C, H, W]" in msg
    assert "rank 4" in msg and "\n" not in msg


def test_multi_head_batch_mismatch():
    disc = MultiHeadDiscriminator(2, 8, kind="2d", hidden_channels=8)
    with pytest.raises(ValueError, match=r"feature 1 has batch size 3"):
        disc([torch.randn(2, 8, 4, 4), torch.randn(3, 8, 4, 4)])


def test_multi_head_bad_construction():
    with pytest.raises(ValueError, match="kind"):
        MultiHeadDiscriminator(2, 8, kind="1d")
    with pytest.raises(ValueError, match="in_channels"):
        MultiHeadDiscriminator(2, [8, 8, 8])
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadDiscriminator(0, 8)
    with pytest.raises(ValueError, match="num_blocks"):
        DiscriminatorHead2D(8, num_blocks=0)


def test_single_head_checks_input():
    with pytest.raises(ValueError, match=r"DiscriminatorHead2D.*\(2, 4, 4, 4\)"):
        DiscriminatorHead2D(8, hidden_channels=8)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"DiscriminatorHead3D.*\(2, 8, 4, 4\)"):
        DiscriminatorHead3D(8, hidden_channels=8)(torch.randn(2, 8, 4, 4))
