"""Tests for unet.py: the paper's CIFAR-10 network (parameter count, key list), shapes, batch independence,
the attention fast path, the class embedding, and parity with diffusers' UNet2DModel on loaded weights."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import unet
from conftest import FAST, KEYS_FILE, TINY, inputs, randomized
from unet import CONFIGS, UNet


def test_cifar10_parameter_count(cifar_net):
    """UNet() is the paper's 35.7M network: exactly 35,746,307 parameters (and so is CONFIGS['cifar10'])."""
    assert sum(p.numel() for p in cifar_net.parameters()) == 35_746_307
    with torch.device("meta"):  # shapes only, no memory
        assert sum(p.numel() for p in UNet(**CONFIGS["cifar10"]).parameters()) == 35_746_307


def test_256_configs_parameter_count():
    """The CelebA-HQ/LSUN 256x256 net is the original code's 'unet2d16b2c112244', commented there as 114M."""
    with torch.device("meta"):  # shapes only, no memory
        n = sum(p.numel() for p in UNet(**CONFIGS["celebahq256"]).parameters())
    assert 113e6 < n < 115e6


def test_state_dict_matches_released_keys(cifar_net):
    """The state_dict keys and shapes, in order, are those of the released weights (ddpm_cifar10_keys.txt)."""
    expected = [tuple(line.split()) for line in KEYS_FILE.read_text().splitlines() if line.strip()]
    ours = [(k, "x".join(map(str, v.shape))) for k, v in cifar_net.state_dict().items()]
    assert len(expected) == 328 and ours == expected


@pytest.mark.parametrize("kwargs", [
    dict(TINY, in_channels=1),
    dict(TINY, out_channels=6),  # e.g. a learned-variance head: 2 * C outputs
    dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,)),
    dict(image_size=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(16, 8), in_channels=1, out_channels=2),
    dict(image_size=8, ch=64, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(8,)),
])
def test_shapes_and_config_roundtrip(kwargs):
    """Output is (B, out_channels, H, W); net.config is plain JSON and UNet(**net.config) rebuilds the same net."""
    net = UNet(**kwargs).eval()
    c = net.config
    x, t = inputs(2, c["in_channels"], c["image_size"])
    assert net(x, t).shape == (2, c["out_channels"], c["image_size"], c["image_size"])
    rebuilt = UNet(**json.loads(json.dumps(c)))
    assert rebuilt.config == c
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]


def test_original_initialisation():
    """Original init: Xavier-uniform weights within sqrt(6/(fan_in+fan_out)), zero biases, and the output
    layers at scale 1e-10, so the freshly built network predicts eps ~ 0."""
    net = UNet(**TINY)
    w = net.down[0].block[0].conv1.weight
    assert w.abs().max() <= (6 / (w[0].numel() + w[:, 0].numel())) ** 0.5
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    x, t = inputs(2, size=16)
    assert net(x, t).abs().max() < 1e-3


def test_every_residual_and_attention_branch_starts_at_zero():
    """The original init gives the last layer of every residual branch (conv2 of each ResnetBlock, proj_out of
    each AttnBlock) scale 1e-10: each block starts as its shortcut, block(x) = shortcut(x) to 1e-4 of |x|, while
    the layers before it keep their full Xavier scale (so the fix is not a global zeroing)."""
    net = UNet(**dict(TINY, attn_resolutions=(16, 8), ch_mult=(1, 2)))
    blocks = [m for m in net.modules() if isinstance(m, (unet.ResnetBlock, unet.AttnBlock))]
    assert len(blocks) == 15  # 2 + 3 (middle) + 4 residual blocks, 2 + 1 + 4 attention blocks
    temb = torch.randn(2, 128)
    with torch.no_grad():
        for m in blocks:
            if isinstance(m, unet.AttnBlock):
                xin = torch.randn(2, m.q.in_channels, 4, 4)
                assert m.proj_out.weight.abs().max() < 1e-5 and m.proj_out.bias.abs().max() == 0
                assert m.q.weight.abs().max() > 1e-2
                torch.testing.assert_close(m(xin), xin, atol=1e-4, rtol=0)
            else:
                xin = torch.randn(2, m.conv1.in_channels, 4, 4)
                assert m.conv2.weight.abs().max() < 1e-5 and m.conv2.bias.abs().max() == 0
                assert m.conv1.weight.abs().max() > 1e-2
                shortcut = xin if m.nin_shortcut is None else m.nin_shortcut(xin)
                torch.testing.assert_close(m(xin, temb), shortcut, atol=1e-4, rtol=0)


def test_dropout_sits_before_the_second_convolution():
    """Residual block: norm, swish, conv, + temb, norm, swish, dropout, conv (Appendix B, the original code). In
    train mode the second convolution's input has about a fraction p of exact zeros (dropped units; swish of a
    GroupNorm output is never exactly 0) and its output has none; in eval mode there is no dropout."""
    block = unet.ResnetBlock(32, 32, 128, dropout=0.5)
    seen = {}
    block.conv2.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    x, temb = torch.randn(4, 32, 8, 8), torch.randn(4, 128)
    block.train()(x, temb)
    zeros = (seen["inp"] == 0).float().mean().item()
    assert 0.45 < zeros < 0.55 and (seen["out"] == 0).float().mean() < 0.01
    block.eval()(x, temb)
    assert (seen["inp"] == 0).float().mean() < 0.01


def test_timestep_embedding_is_the_papers():
    """The sinusoidal embedding of the original code, written out: for i < half = dim / 2, frequency
    f_i = exp(-ln(10000) i / (half - 1)); the embedding is [sin(t f_0..), cos(t f_0..)] (sin first)."""
    t = torch.tensor([0, 1, 17, 999])
    dim = 16
    emb = unet.timestep_embedding(t, dim)
    for row, tt in enumerate(t.tolist()):
        for i in range(dim // 2):
            f = math.exp(-math.log(10000) * i / (dim // 2 - 1))
            assert emb[row, i].item() == pytest.approx(math.sin(tt * f), abs=1e-4)
            assert emb[row, dim // 2 + i].item() == pytest.approx(math.cos(tt * f), abs=1e-4)


def test_blocks_follow_the_papers_description():
    """Each block computed from its own weights with torch.nn.functional, following Appendix B and the original
    code: GroupNorm with 32 groups and eps 1e-6; residual block x + conv(drop(swish(norm(conv(swish(norm(x))) +
    dense(swish(temb)))))) with a 1x1 shortcut where channels change; single-head attention
    x + proj(softmax(q k^T / sqrt(C)) v) over positions; downsampling a stride-2 3x3 conv with the input padded
    by one on the right and bottom only (TF 'SAME'); upsampling nearest x2 then a 3x3 conv."""
    net = randomized(UNet(**dict(TINY, ch_mult=(1, 2), attn_resolutions=(16, 8))))
    assert all(m.num_groups == 32 and m.eps == 1e-6 for m in net.modules() if isinstance(m, nn.GroupNorm))
    g = lambda m, h: F.group_norm(h, 32, m.weight, m.bias, 1e-6)
    x, temb = torch.randn(2, 32, 16, 16), torch.randn(2, 128)
    with torch.no_grad():
        block = net.up[0].block[0]  # 96 -> 32 channels: with the 1x1 shortcut
        xin = torch.randn(2, block.conv1.in_channels, 16, 16)
        h = F.conv2d(F.silu(g(block.norm1, xin)), block.conv1.weight, block.conv1.bias, padding=1)
        h = h + F.linear(F.silu(temb), block.temb_proj.weight, block.temb_proj.bias)[:, :, None, None]
        h = F.conv2d(F.silu(g(block.norm2, h)), block.conv2.weight, block.conv2.bias, padding=1)
        short = F.conv2d(xin, block.nin_shortcut.weight, block.nin_shortcut.bias)
        torch.testing.assert_close(block(xin, F.silu(temb)), short + h, atol=1e-5, rtol=1e-4)

        attn = net.down[0].attn[0]
        B, C, H, W = x.shape
        h = g(attn.norm, x).flatten(2)  # (B, C, HW)
        q, k, v = (torch.einsum("oc,bcp->bop", m.weight[:, :, 0, 0], h) + m.bias[None, :, None]
                   for m in (attn.q, attn.k, attn.v))
        w = torch.softmax(torch.einsum("bcp,bcs->bps", q, k) / math.sqrt(C), dim=-1)
        h = torch.einsum("bps,bcs->bcp", w, v)
        h = torch.einsum("oc,bcp->bop", attn.proj_out.weight[:, :, 0, 0], h) + attn.proj_out.bias[None, :, None]
        torch.testing.assert_close(attn(x), x + h.view(B, C, H, W), atol=1e-5, rtol=1e-4)

        down = net.down[0].downsample.conv
        padded = torch.zeros(B, C, H + 1, W + 1)
        padded[:, :, :H, :W] = x
        torch.testing.assert_close(net.down[0].downsample(x), F.conv2d(padded, down.weight, down.bias, stride=2),
                                   atol=1e-5, rtol=1e-4)
        up = net.up[1].upsample
        y = torch.randn(2, up.conv.in_channels, 8, 8)
        nearest = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(up(y), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1),
                                   atol=1e-5, rtol=1e-4)


def reference_forward(net, x, t):
    """The original code's model (diffusion_tf/models/unet.py), written out with torch.nn.functional over net's own
    weights: timestep embedding -> dense -> swish -> dense; conv_in; per level num_res_blocks residual blocks (each
    takes swish(temb)), attention after each where the resolution has it, a downsample between levels, every output
    kept; middle block, attention, block; up levels from the lowest resolution, each block taking concat([h, skip])
    (h first); upsample between levels; norm, swish, conv_out."""
    gn = lambda m, h: F.group_norm(h, 32, m.weight, m.bias, 1e-6)
    conv = lambda m, h, **kw: F.conv2d(h, m.weight, m.bias, **kw)

    def res(m, h, temb):
        out = conv(m.conv1, F.silu(gn(m.norm1, h)), padding=1) + F.linear(F.silu(temb), m.temb_proj.weight,
                                                                          m.temb_proj.bias)[:, :, None, None]
        out = conv(m.conv2, F.silu(gn(m.norm2, out)), padding=1)
        return (h if m.nin_shortcut is None else conv(m.nin_shortcut, h)) + out

    def attn(m, h):
        B, C, H, W = h.shape
        n = gn(m.norm, h)
        q, k, v = (conv(p, n).flatten(2) for p in (m.q, m.k, m.v))
        w = torch.softmax(torch.einsum("bcp,bcs->bps", q, k) * C ** -0.5, dim=-1)
        return h + conv(m.proj_out, torch.einsum("bps,bcs->bcp", w, v).view(B, C, H, W))

    half = net.ch // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
    emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    temb = F.linear(F.silu(F.linear(emb, *net.temb.dense[0].parameters())), *net.temb.dense[1].parameters())
    hs = [conv(net.conv_in, x, padding=1)]
    for i, level in enumerate(net.down):
        for j, block in enumerate(level.block):
            h = res(block, hs[-1], temb)
            hs.append(attn(level.attn[j], h) if len(level.attn) else h)
        if i < len(net.down) - 1:
            hs.append(conv(level.downsample.conv, F.pad(hs[-1], (0, 1, 0, 1)), stride=2))
    h = res(net.mid.block_2, attn(net.mid.attn_1, res(net.mid.block_1, hs[-1], temb)), temb)
    for i in reversed(range(len(net.up))):
        level = net.up[i]
        for j, block in enumerate(level.block):
            h = res(block, torch.cat([h, hs.pop()], dim=1), temb)
            h = attn(level.attn[j], h) if len(level.attn) else h
        if i > 0:
            h = conv(level.upsample.conv, F.interpolate(h, scale_factor=2, mode="nearest"), padding=1)
    return conv(net.conv_out, F.silu(gn(net.norm_out, h)), padding=1)


@pytest.mark.parametrize("config", [dict(TINY, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,)),
                                    dict(TINY, ch=64, ch_mult=(1, 1), attn_resolutions=(16, 8))])
def test_network_is_the_original_codes(config):
    """The whole network equals the original code's forward written out from its description (above), on
    randomized weights: no diffusers needed to catch a skip connection in the wrong order or a missing swish."""
    net = randomized(UNet(**config))
    x, t = inputs(2, size=16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), reference_forward(net, x, t), atol=1e-4, rtol=1e-4)


def test_timestep_changes_output():
    """eps_theta depends on t: the same x at different t gives different outputs."""
    net = randomized(UNet(**TINY))
    x, _ = inputs(1, size=16)
    out = [net(x, torch.tensor([t])) for t in (0, 1, 500, 999)]
    for a, b in zip(out, out[1:]):
        assert (a - b).abs().max() > 1e-4


def test_scalar_timestep_broadcasts():
    """A 0-d t is the same timestep for the whole batch."""
    net = randomized(UNet(**TINY))
    x, _ = inputs(3, size=16)
    torch.testing.assert_close(net(x, torch.tensor(7)), net(x, torch.full((3,), 7)))


def test_batch_independence(cifar_net):
    """In eval mode sample i's output does not depend on the other samples in the batch (no batch-coupled ops)."""
    x, t = inputs(2)
    with torch.no_grad():
        both = cifar_net(x, t)
        for i in range(2):
            torch.testing.assert_close(cifar_net(x[i:i + 1], t[i:i + 1]), both[i:i + 1], atol=1e-5, rtol=1e-4)


def test_sdpa_equals_explicit_attention(monkeypatch):
    """scaled_dot_product_attention computes the paper's softmax(q k^T / sqrt(C)) v: outputs and gradients agree."""
    net = randomized(UNet(**dict(TINY, attn_resolutions=(16, 8))))
    x, t = inputs(2, size=16)
    results = []
    for flag in (True, False):
        monkeypatch.setattr(unet.AttnBlock, "use_sdpa", flag)
        net.zero_grad()
        out = net(x, t)
        out.square().sum().backward()
        results.append((out.detach(), net.mid.attn_1.q.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-3)


def test_channels_last_and_bf16_autocast():
    """The fast paths give the same function: channels_last to float tolerance, bf16 autocast loosely."""
    net = randomized(UNet(**TINY))
    x, t = inputs(2, size=16)
    with torch.no_grad():
        ref = net(x, t)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = net(x, t)
    assert (lo.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_class_conditional():
    """num_classes=K adds only label_emb ((K+1) x 4ch, K = null label); y changes the output; y=None means the null
    label; the unconditional net refuses labels; conditional outputs are batch-independent too."""
    uncond, cond = UNet(**TINY), UNet(**TINY, num_classes=10)
    extra = set(cond.state_dict()) - set(uncond.state_dict())
    assert extra == {"label_emb.weight"} and cond.label_emb.weight.shape == (11, 128)
    assert sum(p.numel() for p in cond.parameters()) - sum(p.numel() for p in uncond.parameters()) == 11 * 128
    assert UNet(num_classes=None).config["num_classes"] is None

    cond = randomized(cond)
    x, t = inputs(3, size=16)
    y = torch.tensor([0, 3, 9])
    with torch.no_grad():
        out = cond(x, t, y)
        assert (out - cond(x, t, torch.tensor([1, 4, 8]))).abs().max() > 1e-4
        torch.testing.assert_close(cond(x, t), cond(x, t, torch.full((3,), 10)))
        torch.testing.assert_close(cond(x[1:2], t[1:2], y[1:2]), out[1:2], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, y)


def test_wider_groups_let_narrow_layers_carry_an_images_mean():
    """GroupNorm is blind to a constant added to every channel of a group. With the paper's 32 groups, a 32-channel
    layer is normalised channel by channel, so the output head (norm, swish, conv) gives the same output for
    features shifted by any per-channel constant: nothing of the image's mean colour gets through it. Groups of 4
    (group_channels=4, train.py's default) let it through, and leave the paper's own widths at 32 groups."""
    narrow = dict(TINY, ch=32)
    wide, paper = randomized(UNet(**narrow, group_channels=4)), UNet(**narrow)
    paper.load_state_dict(wide.state_dict())
    h, offset = torch.randn(2, 32, 16, 16), torch.randn(1, 32, 1, 1)
    with torch.no_grad():
        head = lambda net, h: net.conv_out(F.silu(net.norm_out(h)))
        moved = [(head(net, h + offset) - head(net, h)).abs().max().item() for net in (wide, paper)]
    assert moved[0] > 0.05 and moved[1] < 1e-4
    assert {m.num_channels // m.num_groups for m in wide.modules() if isinstance(m, nn.GroupNorm)} == {4}
    assert {m.num_groups for m in paper.modules() if isinstance(m, nn.GroupNorm)} == {32}
    assert {m.num_groups for m in UNet(group_channels=4).modules() if isinstance(m, nn.GroupNorm)} == {32}
    from guidance import NoisyClassifier  # the classifier's head too
    clf = NoisyClassifier(3, **narrow, group_channels=4)
    assert {m.num_channels // m.num_groups for m in clf.modules() if isinstance(m, nn.GroupNorm)} == {4}


@FAST
@given(st.integers(1, 1024), st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_group_counts_divide_every_width_and_keep_the_rule_at_multiples_of_32(channels, group_channels):
    """num_groups: the most groups, up to 32, that divide the layer and hold group_channels channels each or more;
    at every width a multiple of 32 (all a checkpoint from before narrower layers could have) exactly min(32,
    C // group_channels), found here by brute force over every count."""
    n = unet.num_groups(channels, group_channels)
    fits = [k for k in range(1, 33) if channels % k == 0 and (channels // k >= group_channels or k == 1)]
    assert n == max(fits)
    if channels % 32 == 0:
        assert n == min(32, channels // group_channels)


@FAST
@given(st.integers(1, 96), st.lists(st.integers(1, 8), min_size=1, max_size=4), st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_one_group_count_for_the_whole_network(ch, ch_mult, group_channels):
    """network_groups: the most groups that divide every level's width ch * m, at most 32, whose narrowest level's
    groups hold group_channels channels or more (found here by brute force): the paper's 32 at its widths, 8 for
    the quick start's 32 and 64 channels; a network built with it has that count in every GroupNorm (the
    classifier's head too), as diffusers' UNet2DModel holds one count."""
    n = unet.network_groups(ch, ch_mult, group_channels)
    widths = [ch * m for m in ch_mult]
    fits = [k for k in range(1, 33) if all(w % k == 0 for w in widths) and (min(widths) // k >= group_channels or k == 1)]
    assert n == max(fits)
    assert unet.network_groups(128, (1, 2, 2, 2), 4) == 32 == unet.network_groups(128, (1, 2, 2, 2), 1)
    assert unet.network_groups(32, (1, 2), 4) == 8


def test_a_network_with_one_group_count():
    """norm_groups puts one count in every GroupNorm of the U-Net and the classifier (a forward pass), is kept in
    the config, and a count that does not divide a layer is refused."""
    from guidance import NoisyClassifier
    for net in (UNet(**TINY, group_channels=4, norm_groups=8), NoisyClassifier(3, **TINY, group_channels=4,
                                                                                 norm_groups=8)):
        assert {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} == {8}
        assert net.config["norm_groups"] == 8
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).shape == (2, 3)
    with pytest.raises(ValueError, match="norm_groups 24 does not divide"):
        UNet(**TINY, norm_groups=24)


def test_a_first_level_narrower_than_32_channels_with_groups_of_4():
    """group_channels > 1 builds levels narrower than 32 channels (simple diffusion's cheap full-resolution level):
    16 channels at full resolution (16x16 here) normalised in 4 groups of 4, every layer in groups of 4 channels,
    and a forward pass."""
    net = UNet(image_size=16, ch=16, ch_mult=(1, 4), num_res_blocks=1, attn_resolutions=(), group_channels=4)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert {(m.num_channels, m.num_groups) for m in norms} >= {(16, 4), (64, 16)}
    assert {m.num_channels // m.num_groups for m in norms} == {4}
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_channels=3), "group_channels"),
    (dict(image_size=30), "divisible"),
    (dict(ch=48), "multiple of 32"),
    (dict(attn_resolutions=(15,)), "feature map sizes"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_arguments(kwargs, match):
    """Invalid configurations fail at construction with a ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)
