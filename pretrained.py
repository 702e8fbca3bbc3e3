"""
The paper's released CIFAR-10 weights in both public layouts, read into unet.UNet: the TF-scope state dict of the
PyTorch port of model-790000.ckpt, and diffusers' google/ddpm-cifar10-32 (UNet2DModel: config.json and a
.safetensors or .bin file), the safetensors format read without the safetensors package. Imports only torch, the
standard library and unet.py, so it can be copied with unet.py alone.
"""
import ctypes
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch

from unet import UNet, image_hw, num_groups


# The released files this project has read, by MD5, as their publisher lists them (pesser/pytorch_diffusion, the
# PyTorch port of the paper's TF checkpoints; where to download them: docs/sampling.md).
RELEASED_MD5 = {
    "1fa350b952534ae442b1d5235cce5cd3": "ema_diffusion_cifar10_model/model-790000.ckpt, the EMA weights the paper "
                                        "evaluates",
    "82ed3067fd1002f5cf4c339fb80c4669": "diffusion_cifar10_model/model-790000.ckpt, the raw weights (not the EMA)",
}
PAPER_PARAMETERS = 35_746_307  # the CIFAR-10 network (Appendix B)
DIFFUSERS_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # diffusers' prediction_type names


def identify(path, net):
    """What a weights file is, for the line that says what was loaded: a released file known by its MD5, or the
    paper's CIFAR-10 network by its parameter count (in a file of another MD5), or another network."""
    path = Path(path)
    md5 = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() and path.suffix in (".ckpt", ".pt", ".pth") \
        else None
    if md5 in RELEASED_MD5:
        return f"MD5 {md5}: {RELEASED_MD5[md5]}"
    count = sum(p.numel() for p in net.parameters())
    return ("the paper's CIFAR-10 network" if count == PAPER_PARAMETERS else f"a {count:,}-parameter U-Net") + (
        f", MD5 {md5} (not a released file's)" if md5 else "")


def load_pretrained(path):
    """The released weights as a UNet in eval mode. path: a TF-scope state dict (.ckpt/.pt/.pth, e.g. the
    PyTorch port of model-790000.ckpt), this project's checkpoint (EMA weights), or the diffusers UNet2DModel
    layout (google/ddpm-cifar10-32: a folder with config.json, or a .safetensors/.bin file). The architecture
    comes from the config where there is one, else from the tensor shapes. ValueError/OSError if unreadable."""
    state_dict, config = _read_weights(path)
    try:
        net = UNet(**(config or _infer_config(state_dict)))
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: cannot tell the UNet configuration from these weights "
                         f"({type(e).__name__}: {e})") from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{path}: weights do not fit the UNet: {msg[:300]}") from None
    return net.eval()


# -----------------------------------------------------------------------------
# the released weights

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


# diffusers UNet2DModel's names -> the TF-scope names of this UNet, applied in order as substring replacements (the
# mid block's before the general ".resnets."); to_diffusers_state_dict applies them the other way round
DIFFUSERS_NAMES = [("time_embedding.linear_1.", "temb.dense.0."), ("time_embedding.linear_2.", "temb.dense.1."),
                   ("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
                   ("mid_block.attentions.0.", "mid.attn_1."), ("mid_block.resnets.1.", "mid.block_2."),
                   (".resnets.", ".block."), (".attentions.", ".attn."), (".downsamplers.0.", ".downsample."),
                   (".upsamplers.0.", ".upsample."), (".time_emb_proj.", ".temb_proj."),
                   (".conv_shortcut.", ".nin_shortcut."),
                   ("class_embedding.", "label_emb.")]  # num_class_embeds = K + 1: the K classes and the null label
# inside attention blocks only (".norm." alone is too common to rename back by substring)
DIFFUSERS_ATTENTION_NAMES = [(".group_norm.", ".norm."), (".to_out.0.", ".proj_out."),
                             (".proj_attn.", ".proj_out.")]  # diffusers' old attention names


def convert_diffusers_state_dict(sd):
    """Rename a diffusers UNet2DModel state dict to the TF-scope names this UNet uses. diffusers numbers its
    up_blocks from the lowest resolution, the TF scopes by level (up.0 = full resolution); its attention
    projections are Linear layers where ours (and the original's) are 1x1 convolutions."""
    num_levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
    renames = DIFFUSERS_NAMES + DIFFUSERS_ATTENTION_NAMES
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
    "attn_norm_num_groups": (None, None), "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"), "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
}


def _config_from_diffusers(cfg, where):
    """UNet kwargs from a diffusers config.json; ValueError for anything that is not the paper's architecture."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{where}: a {cfg['_class_name']}, not a UNet2DModel")
    groups = cfg.get("norm_num_groups", 32)  # another count than the paper's 32: an extension (network_groups)
    for key, (needed, default) in _DIFFUSERS_NEEDED.items():
        if key != "norm_num_groups" and cfg.get(key, default) != needed:
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
    classes = cfg.get("num_class_embeds")
    return dict(image_size=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                ch=channels[0], ch_mult=[c // channels[0] for c in channels],
                num_res_blocks=cfg.get("layers_per_block", 2),
                attn_resolutions=[size // 2 ** i for i, t in enumerate(down) if t == "AttnDownBlock2D"],
                dropout=cfg.get("dropout", 0.0), num_classes=None if classes is None else classes - 1,
                **({} if groups == 32 else {"norm_groups": groups,  # and the channels each group holds, as its rule
                                            "group_channels": max(d for d in (1, 2, 4, 8, 16, 32)
                                                                  if d <= min(channels) // groups)}))


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

# -----------------------------------------------------------------------------
# writing: a model of this project as a diffusers folder


def write_safetensors(path, tensors, metadata=None):
    """A .safetensors file without the safetensors package: 8-byte little-endian header length, the JSON header
    ({name: dtype, shape, data_offsets}, and __metadata__ strings), the tensors' little-endian bytes; written to a
    temporary file and renamed, so a failure leaves no half file."""
    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        blobs.append(ctypes.string_at(t.data_ptr(), size))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the format recommends
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_diffusers_state_dict(sd):
    """The inverse of convert_diffusers_state_dict: TF-scope names to diffusers UNet2DModel's (up blocks numbered
    from the lowest resolution, attention projections as Linear layers)."""
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    renames = [(ours, theirs) for theirs, ours in DIFFUSERS_NAMES]
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^down\.", "down_blocks.", key)
        new = re.sub(r"^up\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.", new)
        for old, rep in renames:
            new = new.replace(old, rep)
        if ".attentions." in new:
            new = re.sub(r"\.norm\.", ".group_norm.", new)
            new = re.sub(r"\.(q|k|v)\.(weight|bias)$", r".to_\1.\2", new).replace(".proj_out.", ".to_out.0.")
            value = value[:, :, 0, 0] if value.dim() == 4 else value  # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        out[new] = value
    return out


def diffusers_config(config):
    """diffusers UNet2DModel's config.json for a UNet of this project (its config): the paper's network in
    diffusers' terms (_DIFFUSERS_NEEDED; up blocks listed lowest resolution first)."""
    if config.get("captions"):
        raise ValueError("a caption model's cross-attention and caption encoder have no place in diffusers' "
                         "UNet2DModel (its UNet2DConditionModel is another network)")
    groups, gc = config.get("norm_groups"), config.get("group_channels", 1)
    if groups is None:  # saved before network_groups: each layer's count from its width
        if any(num_groups(config["ch"] * m, gc) < 32 for m in config["ch_mult"]):
            raise ValueError(f"this network, saved before one group count for the whole network, has layers with "
                             f"fewer than 32 groups of {gc} channels and others with 32, where diffusers' UNet2DModel "
                             f"takes one count for all: a run trained now exports (docs/training.md)")
        groups = 32
    side = min(image_hw(config["image_size"]))  # attention at a level whose shorter side is an attn resolution
    down = ["AttnDownBlock2D" if side // 2 ** i in config["attn_resolutions"] else "DownBlock2D"
            for i in range(len(config["ch_mult"]))]
    classes = config.get("num_classes")
    return dict({k: needed for k, (needed, _) in _DIFFUSERS_NEEDED.items()}, norm_num_groups=groups,
                _class_name="UNet2DModel",
                sample_size=config["image_size"], in_channels=config["in_channels"],
                out_channels=config["out_channels"], block_out_channels=[config["ch"] * m for m in config["ch_mult"]],
                layers_per_block=config["num_res_blocks"], down_block_types=down,
                up_block_types=[t.replace("Down", "Up") for t in reversed(down)], dropout=config["dropout"],
                num_class_embeds=None if classes is None else classes + 1)


def write_diffusers(folder, net, scheduler):
    """A folder that diffusers' UNet2DModel.from_pretrained and DDPMPipeline.from_pretrained load (flat: both read
    the root), and that load_pretrained reads back: config.json, diffusion_pytorch_model.safetensors (written here,
    without the safetensors package), scheduler_config.json (the scheduler's settings, given) and model_index.json."""
    config = diffusers_config(net.config)  # before any file: a network diffusers cannot hold leaves no folder behind
    os.makedirs(folder, exist_ok=True)
    files = {"config.json": config, "scheduler_config.json": scheduler,
             "model_index.json": {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", scheduler["_class_name"]],
                                  "unet": ["diffusers", "UNet2DModel"]}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                      to_diffusers_state_dict(net.state_dict()), {"format": "pt"})
