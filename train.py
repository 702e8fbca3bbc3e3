"""
Train a DDPM (Ho, Jain, Abbeel 2020): Algorithm 1 with the paper's CIFAR-10 recipe as defaults.
  python train.py --data cifar10 --device cuda                       # the paper's run
  torchrun --nproc_per_node=8 train.py --data cifar10                 # data-parallel, same global batch
  python train.py --data shapes --image-size 16 --ch 32 --steps 2000 ...  # CPU, minutes (see README)
The helpers at the top (resolve_device, load_checkpoint, build_diffusion, to_uint8, save_grid,
make_shapes) are imported by sample.py and bench.py.
"""
import contextlib
import math
import os
import struct
import zlib

import torch

from ddpm import GaussianDiffusion, make_beta_schedule

# -----------------------------------------------------------------------------
# helpers shared with sample.py and bench.py

def resolve_device(name):
    """'auto' | 'cpu' | 'cuda[:k]' | 'mps' -> torch.device; one clear line if it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown device '{name}' (use auto, cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but no CUDA device is available to torch "
                         f"{torch.__version__} (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit(f"error: --device {name} asked for, but MPS is not available (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unsupported device '{name}' (use auto, cpu, cuda or mps)")
    return device


def load_checkpoint(path):
    """A checkpoint written by train.py (the file, or the run folder holding ckpt.pt), loaded on the CPU."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        # weights_only: a checkpoint holds tensors and plain python values only, so nothing in it can run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot read checkpoint {path} (corrupt or truncated?): {msg}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddpm-checkpoint-v1":
        raise SystemExit(f"error: {path} is not a train.py checkpoint (format ddpm-checkpoint-v1)")
    return ckpt


def build_diffusion(diffusion_config):
    """GaussianDiffusion from the checkpoint's "diffusion_config" dict."""
    c = diffusion_config
    betas = make_beta_schedule(c.get("schedule", "linear"), c.get("num_timesteps", 1000),
                               c.get("beta_start", 1e-4), c.get("beta_end", 0.02))
    return GaussianDiffusion(betas, mean_type=c.get("mean_type", "eps"), var_type=c.get("var_type", "fixedlarge"))


def to_uint8(x):
    """[-1, 1] float (N,C,H,W) -> uint8 (N,H,W,C). Rounds, so it inverts the data scaling x/127.5 - 1 exactly."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def atomic_write(path, write):
    """Call write(f) on a temporary file, fsync it, then os.replace it onto path: a crash, a signal or a
    full disk leaves either the old file or the new one, never half of one. OSError -> one line, exit."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(f"error: could not write {path}: {e.strerror or e} (any previous {os.path.basename(path)} is intact)")


def png_bytes(img):
    """uint8 (H,W,C) with C = 1 or 3 -> PNG file bytes (8-bit grey or RGB, no filtering), stdlib only."""
    h, w, c = img.shape
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    # every scanline starts with filter type 0 (None)
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), img.reshape(h, w * c)], dim=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(bytes(rows.flatten().tolist()))) +
            chunk(b"IEND", b""))


def save_grid(path, images, nrow=None, pad=2):
    """Images in [-1, 1] (N,C,H,W), C = 1 or 3 -> one PNG grid of nrow columns (default: about square)."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    grid = torch.zeros(pad + ncol_rows * (h + pad), pad + nrow * (w + pad), c, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    data = png_bytes(grid)
    atomic_write(path, lambda f: f.write(data))


def make_shapes(n, image_size=32, channels=3, seed=0):
    """The built-in labelled data: one shape on a dark background per image, class = shape kind
    (0 square, 1 disk, 2 triangle, 3 cross), each kind in its own colour (RGB) or grey level (C = 1),
    random position, size and background, anti-aliased by 2x2 supersampling. Deterministic in seed.
    Returns uint8 images (n, H, W, C) and int64 labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    s = image_size
    labels = torch.randint(0, 4, (n,), generator=g)
    radius = s * (0.2 + 0.15 * torch.rand(n, generator=g))                  # half-size in pixels
    cx = radius + 1 + (s - 2 * radius - 2) * torch.rand(n, generator=g)     # keep the shape inside
    cy = radius + 1 + (s - 2 * radius - 2) * torch.rand(n, generator=g)
    shade = 0.75 + 0.25 * torch.rand(n, generator=g)                        # brightness jitter
    background = 40 * torch.rand(n, channels, generator=g)
    palette = torch.tensor([[230, 60, 50], [60, 200, 70], [70, 110, 240], [240, 210, 40]], dtype=torch.float32)
    if channels == 1:
        palette = torch.tensor([[255.0], [200.0], [150.0], [100.0]])
    colour = palette[labels] * shade[:, None]
    sub = 2                                                                  # samples per pixel side
    coords = (torch.arange(s * sub, dtype=torch.float32) + 0.5) / sub
    dx = coords[None, None, :] - cx[:, None, None]                           # (n, 1, s*sub) and (n, s*sub, 1)
    dy = coords[None, :, None] - cy[:, None, None]
    r = radius[:, None, None]
    cover = torch.empty(n, s, s)
    for k, inside in enumerate([
            lambda dx, dy, r: (dx.abs() <= r) & (dy.abs() <= r),                                    # square
            lambda dx, dy, r: dx ** 2 + dy ** 2 <= r ** 2,                                          # disk
            lambda dx, dy, r: (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2),                  # triangle
            lambda dx, dy, r: ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))]):
        idx = (labels == k).nonzero()[:, 0]
        for j in idx.split(1024):                                            # chunks bound the memory
            mask = inside(dx[j], dy[j], r[j]).float()
            cover[j] = torch.nn.functional.avg_pool2d(mask[:, None], sub)[:, 0]   # fraction of pixel covered
    cover = cover[..., None]
    img = background[:, None, None, :] * (1 - cover) + colour[:, None, None, :] * cover
    out = img.round().clamp(0, 255).to(torch.uint8)
    return out, labels
