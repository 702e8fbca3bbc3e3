"""The noise-prediction U-Net eps_theta(x_t, t) of DDPM (Ho, Jain, Abbeel 2020, Sec. 4 and Appendix B),
a PixelCNN++-style U-Net after the original diffusion_tf/models/unet.py. Imports only torch; its state_dict keys
are those of the released CIFAR-10 weights (pretrained.load_pretrained reads them). Extensions, each off unless
asked for: a class embedding, non-square images, wider normalisation groups; and the two hooks through which
captions.py adds latent diffusion's conditioning (an encoder, and cross-attention after each self-attention)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's networks, one call away: UNet(**CONFIGS["celebahq256"]). From the original scripts: run_cifar.py
# ("unet2d16b2", 35.7M) and run_celebahq.py / run_lsun.py, which share "unet2d16b2c112244" (114M, no dropout).
CONFIGS = {
    "cifar10": dict(image_size=32, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
                    dropout=0.1),
    "celebahq256": dict(image_size=256, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2, attn_resolutions=[16],
                        dropout=0.0),
}
CONFIGS["lsun256"] = dict(CONFIGS["celebahq256"])  # church, bedroom and cat: the same network


def image_hw(size):
    """A network's image_size as (height, width): an int for square images, [H, W] for others."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def timestep_embedding(t, dim):
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim): [sin, cos] of t * 10000^(-i/(half-1)), i < half."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=1)


def Normalize(channels):
    # tf.contrib.layers.group_norm defaults: 32 groups, eps 1e-6 (narrower layers, group_channels > 1 only: regroup)
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def regroup(module, group_channels, norm_groups=None):
    """Every GroupNorm in module with norm_groups groups (one count for the whole network: network_groups), or, for a
    network saved before that count (norm_groups None), its layer's own count: num_groups(C, group_channels). 1 keeps
    the paper's 32 groups everywhere; at the paper's widths (128 and up) so does 4. At 32 channels, 32 groups are
    instance norm: each channel's mean over the image is removed, which cost small networks the images' colours (an
    extension, docs/training.md)."""
    if group_channels < 1 or 32 % group_channels:
        raise ValueError(f"group_channels must divide 32, got {group_channels}")
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            if norm_groups is not None and m.num_channels % norm_groups:
                raise ValueError(f"norm_groups {norm_groups} does not divide a layer of {m.num_channels} channels")
            m.num_groups = num_groups(m.num_channels, group_channels) if norm_groups is None else norm_groups


def num_groups(channels, group_channels):
    """The per-layer rule of networks saved before network_groups: the most groups that divide a layer this wide, up
    to min(32, C // group_channels) (that bound itself at every width a multiple of 32)."""
    most = max(1, min(32, channels // group_channels))
    return max(n for n in range(1, most + 1) if channels % n == 0)


def network_groups(ch, ch_mult, group_channels):
    """One group count for every layer of a U-Net (as diffusers' UNet2DModel has): the most that divide every width
    ch * m, up to min(32, narrowest // group_channels), so the narrowest layer's groups hold group_channels channels
    or more. The paper's 32 at its widths; 8 for a net of 32 and 64 channels in groups of 4."""
    widths = [ch * m for m in ch_mult]
    most = max(1, min(32, min(widths) // group_channels))
    return max(n for n in range(1, most + 1) if all(w % n == 0 for w in widths))


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # "network in network" shortcut (a 1x1 conv) only where the channel count changes
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):  # temb arrives already through swish (UNet.forward applies it once for all blocks)
        # swish in place on the norm's fresh output (GroupNorm's backward does not need it): one tensor less
        # to allocate and fill; the compiler fuses the pair either way
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convolutions, residual; in a model
    conditioned through cross-attention followed by `cross`, which reads the condition (captions.CrossAttention)."""
    use_sdpa = True  # False: the explicit softmax(q k^T / sqrt(C)) v below, for reading and testing (same maths)

    def __init__(self, channels, cross=None):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.cross = cross

    def forward(self, x, context=None):
        x = self.self_attention(x)
        return x if self.cross is None else self.cross(x, context)

    def self_attention(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2).contiguous()  # (B, HW, C): one token per position, copied once
        # A 1x1 conv on (B, C, H, W) is a matmul over C on (B, HW, C); done that way, q/k/v keep C contiguous
        # whatever x's memory format, which SDPA's fused kernels need. [:, None] makes the single head explicit.
        q, k, v = (F.linear(h, m.weight.flatten(1), m.bias)[:, None] for m in (self.q, self.k, self.v))
        if self.use_sdpa:  # default scale C^-0.5, as in the paper's code
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            w = torch.softmax(q @ k.transpose(-1, -2) * C ** -0.5, dim=-1)  # (B, 1, HW, HW) attention weights
            h = w @ v
        h = F.linear(h[:, 0], self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):  # TF 'SAME' padding of a stride-2 3x3 conv on an even size: one row/column right, bottom
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]). The defaults are the paper's CIFAR-10 net: 35,746,307 parameters, state_dict keys as
    in the released weights. num_classes=K adds a class embedding (an extension) with label K meaning "no label";
    image_size=[H, W] makes a network for images that are not square (an extension too); norm_groups (see
    network_groups) gives narrow networks fewer, wider normalisation groups (another; group_channels > 1 without it:
    the per-layer counts of networks saved before it). **condition: what a subclass conditioned through
    cross-attention is built from (captions.CaptionUNet: its captions), passed to its hook build_condition."""

    def __init__(self, image_size=32, in_channels=3, out_channels=None, ch=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_classes=None, group_channels=1,
                 norm_groups=None, **condition):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], [int(r) for r in attn_resolutions]
        height, width = image_hw(image_size)
        # the feature maps' shorter side at each level: where attention goes (the paper's 16 is 16x16 for 32x32)
        sizes = [min(height, width) // 2 ** i for i in range(len(ch_mult))]
        for ok, msg in [
            (len(ch_mult) > 0 and min(ch_mult) > 0, f"ch_mult must be non-empty positive integers, got {ch_mult}"),
            (ch > 0 and (ch % 32 == 0 or group_channels > 1),
             f"ch must be a positive multiple of 32 (GroupNorm uses 32 groups; group_channels > 1 allows others), "
             f"got {ch}"),
            (min(height, width) > 0 and height % 2 ** (len(ch_mult) - 1) == 0 == width % 2 ** (len(ch_mult) - 1),
             f"image_size {image_size} is not divisible by 2**(len(ch_mult)-1) = {2 ** (len(ch_mult) - 1)}"),
            (set(attn_resolutions) <= set(sizes),
             f"attn_resolutions {attn_resolutions} must be among the feature map sizes {sizes}"),
            (in_channels > 0 and out_channels > 0,
             f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"),
            (num_res_blocks > 0, f"num_res_blocks must be positive, got {num_res_blocks}"),
            (0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}"),
            (num_classes is None or num_classes > 0, f"num_classes must be None or positive, got {num_classes}"),
        ]:
            if not ok:
                raise ValueError(msg)
        self.config = dict(image_size=height if height == width else [height, width], in_channels=int(in_channels),
                           out_channels=int(out_channels), ch=int(ch), ch_mult=ch_mult,
                           num_res_blocks=int(num_res_blocks), attn_resolutions=attn_resolutions, dropout=float(dropout),
                           num_classes=None if num_classes is None else int(num_classes),
                           group_channels=int(group_channels),
                           **({} if norm_groups is None else {"norm_groups": int(norm_groups)}))
        self.ch, self.num_classes = ch, num_classes
        temb_ch = ch * 4
        # Timestep embedding: sinusoid(ch) -> dense(4ch) -> swish -> dense(4ch)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        # Extension (classifier-free guidance, Ho & Salimans 2021): one learned vector per class plus a "null"
        # class K, the label of an unconditional prediction
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        # Hook (latent diffusion, Rombach et al. 2022, Sec. 3.3: captions.CaptionUNet): a subclass's encoder of the
        # condition tau_theta(y), built here so that its weights keep their place, and its width (None: no condition)
        context_dim = self.build_condition(temb_ch, **condition)

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chs, block_in = [ch], ch  # channels of every activation the up path will concatenate
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if sizes[i] in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, self.cross_attention(block_in, context_dim)))
                skip_chs.append(block_in)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                skip_chs.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in, self.cross_attention(block_in, context_dim))
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        up = []  # built from the lowest resolution, stored by level (up[0] = full resolution) as in the key list
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes the downsample/conv_in output
                level.block.append(ResnetBlock(block_in + skip_chs.pop(), ch * ch_mult[i], temb_ch, dropout))
                block_in = ch * ch_mult[i]
                if sizes[i] in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, self.cross_attention(block_in, context_dim)))
            if i != 0:
                level.upsample = Upsample(block_in)
            up.append(level)
        self.up = nn.ModuleList(up[::-1])

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        regroup(self, group_channels, norm_groups)
        self.reset_parameters()

    def build_condition(self, temb_ch):
        """Hook for a subclass conditioned through cross-attention (captions.CaptionUNet): build the condition's
        encoder, return the width of what it gives cross_attention to read. The paper's net has none: None."""
        return None

    def cross_attention(self, channels, context_dim):
        """Hook: the block after each self-attention that reads the condition (AttnBlock's cross); the paper's: none."""
        return None

    @torch.no_grad()
    def reset_parameters(self):
        """The original initialisation: variance_scaling(fan_avg, uniform) = Xavier uniform, zero biases; the last
        layer of each residual branch (a ResnetBlock's conv2, an attention's proj_out, a cross-attention's too) and
        the output conv get scale 1e-10 (init_scale=0): the net starts near 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            last = m.conv2 if isinstance(m, ResnetBlock) else getattr(m, "proj_out", None)
            if last is not None:
                nn.init.xavier_uniform_(last.weight, gain=1e-5)  # gain = sqrt(scale)
        nn.init.xavier_uniform_(self.conv_out.weight, gain=1e-5)

    def forward(self, x, t, y=None):
        """x: (B, C, H, W); t: (B,) integer timestep indices (0-d broadcasts); y: (B,) class labels or None (the
        null label)."""
        t = t if t.dim() else t.expand(x.shape[0])
        temb = self.embed(t, y)
        return self.decode(*self.encode(x, temb), temb)

    def embed(self, t, y=None, extra=None):
        """What every residual block is told: dense(swish(dense(sinusoid(t)))), plus the class embedding, plus
        `extra` (another conditioning's embedding, e.g. a super-resolution model's augmentation level), through
        swish, which every block applies before its temb_proj: done once here."""
        emb = timestep_embedding(t, self.ch).to(self.temb.dense[0].weight.dtype)  # float64 nets for tests too
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](emb)))
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y  # None = the null label
            temb = temb + self.label_emb(y)  # after the MLP, as improved/guided-diffusion add their label_emb
        elif y is not None:
            raise ValueError("y given but this UNet is unconditional (num_classes=None)")
        return F.silu(temb if extra is None else temb + extra)

    def encode(self, x, temb, context=None):
        """The down path and the middle: -> (the middle's output, every activation the up path concatenates).
        context: what cross-attention reads in a conditioned subclass (a caption model's tau_theta(y), (B, L, 4ch))."""
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h, context)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb), context), temb), hs

    def decode(self, h, hs, temb, context=None):
        """The up path, each block taking [h, the matching down-path activation], then the output layers."""
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h, context)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
