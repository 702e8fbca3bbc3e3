"""The noise-prediction U-Net eps_theta(x_t, t) of DDPM (Ho, Jain, Abbeel 2020, Sec. 4 and Appendix B),
a PixelCNN++-style U-Net after the original diffusion_tf/models/unet.py. Imports only torch and the
standard library; UNet.from_pretrained loads the released CIFAR-10 weights (TF-scope or diffusers layout)."""

import json
import math
import re
import struct
from pathlib import Path

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


def timestep_embedding(t, dim):
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim): [sin, cos] of t * 10000^(-i/(half-1)), i < half."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=1)


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # tf.contrib.layers.group_norm defaults: 32 groups, eps 1e-6


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
        # to allocate and fill, 6% of a CPU sampling step; the compiler fuses the pair either way
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convolutions, residual."""
    use_sdpa = True  # False: the explicit softmax(q k^T / sqrt(C)) v below, for reading and testing (same maths)

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
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
    in the released weights. num_classes=K adds a class embedding (an extension) with label K meaning "no label"."""

    def __init__(self, image_size=32, in_channels=3, out_channels=None, ch=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_classes=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], [int(r) for r in attn_resolutions]
        sizes = [image_size // 2 ** i for i in range(len(ch_mult))]  # feature map size at each level
        for ok, msg in [
            (len(ch_mult) > 0 and min(ch_mult) > 0, f"ch_mult must be non-empty positive integers, got {ch_mult}"),
            (ch > 0 and ch % 32 == 0, f"ch must be a positive multiple of 32 (GroupNorm uses 32 groups), got {ch}"),
            (image_size > 0 and image_size % 2 ** (len(ch_mult) - 1) == 0,
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
        self.config = dict(image_size=int(image_size), in_channels=int(in_channels),
                           out_channels=int(out_channels), ch=int(ch), ch_mult=ch_mult,
                           num_res_blocks=int(num_res_blocks), attn_resolutions=attn_resolutions, dropout=float(dropout),
                           num_classes=None if num_classes is None else int(num_classes))
        self.ch, self.num_classes = ch, num_classes
        temb_ch = ch * 4
        # Timestep embedding: sinusoid(ch) -> dense(4ch) -> swish -> dense(4ch)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        # Extension (issue 6): one learned vector per class plus a "null" class K for dropped labels
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None

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
                    level.attn.append(AttnBlock(block_in))
                skip_chs.append(block_in)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                skip_chs.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        up = []  # built from the lowest resolution, stored by level (up[0] = full resolution) as in the key list
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes the downsample/conv_in output
                level.block.append(ResnetBlock(block_in + skip_chs.pop(), ch * ch_mult[i], temb_ch, dropout))
                block_in = ch * ch_mult[i]
                if sizes[i] in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
            up.append(level)
        self.up = nn.ModuleList(up[::-1])

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The original initialisation: variance_scaling(fan_avg, uniform) = Xavier uniform, zero biases; the last
        layer of each residual branch and the output conv get scale 1e-10 (init_scale=0): the net starts near 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (ResnetBlock, AttnBlock)):
                last = m.conv2 if isinstance(m, ResnetBlock) else m.proj_out
                nn.init.xavier_uniform_(last.weight, gain=1e-5)  # gain = sqrt(scale)
        nn.init.xavier_uniform_(self.conv_out.weight, gain=1e-5)

    def forward(self, x, t, y=None):
        """x: (B, C, H, W); t: (B,) integer timestep indices (0-d broadcasts); y: (B,) class labels or None."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](timestep_embedding(t, self.ch))))
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y  # None = the null label
            temb = temb + self.label_emb(y)  # after the MLP, as improved/guided-diffusion add their label_emb
        elif y is not None:
            raise ValueError("y given but this UNet is unconditional (num_classes=None)")
        temb = F.silu(temb)  # every residual block applies swish before its temb_proj: do it once here

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    @classmethod
    def from_pretrained(cls, path):
        """Load released weights, returned in eval mode. path: a TF-scope state dict (.ckpt/.pt/.pth, e.g. the
        PyTorch port of model-790000.ckpt), this project's checkpoint (EMA weights), or the diffusers UNet2DModel
        layout (google/ddpm-cifar10-32: a folder with config.json, or a .safetensors/.bin file). The architecture
        comes from the config where there is one, else from the tensor shapes."""
        state_dict, config = _read_weights(path)
        try:
            net = cls(**(config or _infer_config(state_dict)))
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: cannot tell the UNet configuration from these weights "
                             f"({type(e).__name__}: {e})") from None
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            msg = " ".join(str(e).split())
            raise ValueError(f"{path}: weights do not fit the UNet: {msg[:300]}") from None
        return net.eval()


# ---------------------------------------------------------------- released weights

def read_safetensors(path):
    """Read a .safetensors file without the safetensors package: 8-byte little-endian header length N,
    N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian data."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    data = bytearray(Path(path).stat().st_size)
    with open(path, "rb") as f:
        f.readinto(data)  # a writable buffer, so torch.frombuffer shares it without a copy
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise ValueError(f"{path}: not a safetensors file, or truncated (bad header length)")
    try:
        header = json.loads(data[8:8 + n])
        body, out = memoryview(data)[8 + n:], {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if end > len(body):
                raise ValueError(f"{path}: truncated (tensor {name} ends past the end of the file)")
            dtype, shape = dtypes[info["dtype"]], info["shape"]
            out[name] = (torch.frombuffer(body[begin:end], dtype=dtype).reshape(shape) if end > begin
                         else torch.empty(shape, dtype=dtype))
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return out


def convert_diffusers_state_dict(sd):
    """Rename a diffusers UNet2DModel state dict to the TF-scope names this UNet uses. diffusers numbers its
    up_blocks from the lowest resolution, the TF scopes by level (up.0 = full resolution); its attention
    projections are Linear layers where ours (and the original's) are 1x1 convolutions."""
    num_levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
    renames = [("time_embedding.linear_1.", "temb.dense.0."), ("time_embedding.linear_2.", "temb.dense.1."),
               ("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
               ("mid_block.attentions.0.", "mid.attn_1."), ("mid_block.resnets.1.", "mid.block_2."),
               (".resnets.", ".block."), (".attentions.", ".attn."), (".downsamplers.0.", ".downsample."),
               (".upsamplers.0.", ".upsample."), (".time_emb_proj.", ".temb_proj."),
               (".conv_shortcut.", ".nin_shortcut."), (".group_norm.", ".norm."), (".to_out.0.", ".proj_out."),
               (".proj_attn.", ".proj_out.")]  # the last one: diffusers' old attention names
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^down_blocks\.", "down.", key)
        new = re.sub(r"^up_blocks\.(\d+)\.", lambda m: f"up.{num_levels - 1 - int(m.group(1))}.", new)
        for old, rep in renames:
            new = new.replace(old, rep)
        new = re.sub(r"\.(?:to_)?(q|k|v)(?:uery|ey|alue)?\.(weight|bias)$", r".\1.\2", new)  # to_q, query -> q
        if re.search(r"\.(q|k|v|proj_out)\.weight$", new) and value.dim() == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[new] = value
    return out


# diffusers UNet2DModel settings under which it computes exactly this network: key -> (needed, diffusers' default)
_DIFFUSERS_NEEDED = {
    "attention_head_dim": (None, 8), "flip_sin_to_cos": (False, True), "freq_shift": (1, 0),
    "downsample_padding": (0, 1), "norm_eps": (1e-6, 1e-5), "norm_num_groups": (32, 32), "act_fn": ("silu", "silu"),
    "center_input_sample": (False, False), "time_embedding_type": ("positional", "positional"),
    "time_embedding_dim": (None, None), "mid_block_scale_factor": (1, 1), "add_attention": (True, True),
    "resnet_time_scale_shift": ("default", "default"), "class_embed_type": (None, None),
    "num_class_embeds": (None, None), "attn_norm_num_groups": (None, None), "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"), "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
}


def _config_from_diffusers(cfg, where):
    """UNet kwargs from a diffusers config.json; ValueError for anything that is not the paper's architecture."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{where}: a {cfg['_class_name']}, not a UNet2DModel")
    for key, (needed, default) in _DIFFUSERS_NEEDED.items():
        if cfg.get(key, default) != needed:
            why = ", single-head attention" if key == "attention_head_dim" else ""
            raise ValueError(f"{where}: {key}={cfg.get(key, default)!r} is not the paper's architecture "
                             f"(needs {needed!r}{why})")
    channels = cfg.get("block_out_channels", [224, 448, 672, 896])
    down = cfg.get("down_block_types", ["DownBlock2D"] + ["AttnDownBlock2D"] * 3)
    up = cfg.get("up_block_types", ["AttnUpBlock2D"] * 3 + ["UpBlock2D"])
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if any(c % channels[0] for c in channels) or set(down) - {"DownBlock2D", "AttnDownBlock2D"} or up != mirrored:
        raise ValueError(f"{where}: block types {down} / {up} or channels {channels} are not the paper's")
    size = cfg.get("sample_size") or 32
    size = size[0] if isinstance(size, (list, tuple)) else size
    return dict(image_size=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                ch=channels[0], ch_mult=[c // channels[0] for c in channels],
                num_res_blocks=cfg.get("layers_per_block", 2),
                attn_resolutions=[size // 2 ** i for i, t in enumerate(down) if t == "AttnDownBlock2D"])


def _infer_config(sd):
    """UNet kwargs from TF-scope tensor shapes. image_size is not stored in the weights: the paper puts attention
    at 16x16, so the first level with attention fixes it (32 for the CIFAR-10 net, 256 for the 256x256 nets)."""
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    ch = sd["conv_in.weight"].shape[0]
    attn_levels = [i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd]
    size = 16 * 2 ** attn_levels[0] if attn_levels else 32 * 2 ** max(levels - 4, 0)
    return dict(image_size=size, in_channels=sd["conv_in.weight"].shape[1],
                out_channels=sd["conv_out.weight"].shape[0], ch=ch,
                ch_mult=[sd[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)],
                num_res_blocks=sum(1 for k in sd if re.fullmatch(r"down\.0\.block\.\d+\.conv1\.weight", k)),
                attn_resolutions=[size // 2 ** i for i in attn_levels],
                num_classes=sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else None)


def _read_weights(path):
    """(state dict with TF-scope keys, UNet kwargs or None) from any of the layouts from_pretrained accepts."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_dir():
        names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        if not any((p / n).is_file() for n in names) and (p / "unet").is_dir():
            p = p / "unet"  # a diffusers pipeline folder (model_index.json, unet/, scheduler/)
        files = [p / n for n in names if (p / n).is_file()]
        if not files:
            raise FileNotFoundError(f"{path}: folder has no diffusion_pytorch_model.safetensors or .bin")
        p = files[0]
    if p.suffix == ".safetensors":
        obj = read_safetensors(p)
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
            first = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"{path}: cannot be read as a PyTorch file ({type(e).__name__}: {first})") from None
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):  # this project's checkpoint: EMA
        config, obj = obj["model_config"], obj.get("ema") or obj.get("model")
    for key in ("state_dict", "ema", "model"):  # other common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}  # DDP / torch.compile prefixes
    if "time_embedding.linear_1.weight" in sd:
        sd = convert_diffusers_state_dict(sd)
        if (p.parent / "config.json").is_file():
            try:
                cfg = json.loads((p.parent / "config.json").read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{p.parent / 'config.json'}: not valid JSON ({e})") from None
            config = _config_from_diffusers(cfg, p.parent / "config.json")
    elif "temb.dense.0.weight" not in sd or "conv_in.weight" not in sd:
        raise ValueError(f"{path}: not DDPM U-Net weights (neither TF-scope keys like temb.dense.0.weight "
                         f"nor diffusers UNet2DModel keys); first key: {next(iter(sd))}")
    return sd, config
