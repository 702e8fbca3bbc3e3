"""
Train a DDPM (Ho, Jain, Abbeel 2020): Algorithm 1 with the paper's CIFAR-10 recipe as defaults.
  python train.py --data cifar10 --device cuda                       # the paper's run
  torchrun --nproc_per_node=8 train.py --data cifar10                 # data-parallel, same global batch
  python train.py --data shapes --image-size 16 --ch 32 --steps 2000 ...  # CPU, minutes (see README)
The helpers at the top (resolve_device, load_checkpoint, build_diffusion, to_uint8, save_grid,
make_shapes) are imported by sample.py and bench.py.
"""
import argparse
import ast
import codecs
import contextlib
import copy
import hashlib
import io
import math
import os
import pickle
import shutil
import signal
import struct
import tarfile
import time
import urllib.request
import zipfile
import zlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddpm import GaussianDiffusion, make_beta_schedule
from unet import UNet

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


def first_line(e):
    """An exception as one short line (for the one-line error messages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


class NotACheckpoint(SystemExit):
    """A readable torch file that train.py did not write (sample.py then tries it as released weights)."""


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
        raise SystemExit(f"error: cannot read checkpoint {path} (corrupt or truncated?): {first_line(e)}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddpm-checkpoint-v1":
        raise NotACheckpoint(f"error: {path} is not a train.py checkpoint (format ddpm-checkpoint-v1)")
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
    except BaseException as e:  # also KeyboardInterrupt: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise SystemExit(f"error: could not write {path}: {e.strerror or e} "
                             f"(any previous {os.path.basename(path)} is intact)")
        raise


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

# -----------------------------------------------------------------------------
# data: uint8 images (N, C, H, W) and int64 labels (N,) or None

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
SHAPES_N = 10000  # size of the built-in data set


class _Stub:
    """Stands in for numpy.ndarray / numpy.dtype while unpickling, keeping the constructor args and state."""
    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are pickled numpy arrays. Rebuild only what they hold (dicts, lists, bytes, and
    arrays as stubs with their raw bytes) and refuse anything else: no numpy needed, no code run."""
    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return lambda cls, shape, dtype: cls()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return _Stub
        if module == "_codecs" and name == "encode":  # how python 3 protocol-2 pickles store bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a CIFAR-10 batch")


def read_cifar_batch(path):
    """One data_batch_k: 10000 images as rows of 3072 bytes (R, G, B planes of 32x32) and their labels."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    _, shape, dtype, _, raw = d[b"data"].state  # ndarray state: (version, shape, dtype, fortran, bytes)
    assert dtype.args[0] in ("u1", b"u1") and shape[1] == 3072, f"unexpected array {dtype.args} {shape}"
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(shape[0], 3, 32, 32)
    return images, torch.tensor(d[b"labels"], dtype=torch.int64)


def load_cifar10(data_dir):
    """The 50,000 training images of CIFAR-10: the extracted python batches in data_dir, else the archive
    there (downloaded with the standard library if absent), checked against its MD5 and extracted."""
    folder, archive = os.path.join(data_dir, "cifar-10-batches-py"), os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder):
        if not os.path.exists(archive):
            print(f"downloading {CIFAR10_URL} to {archive} (163 MB)", flush=True)
            tmp = archive + ".part"
            try:
                os.makedirs(data_dir, exist_ok=True)
                with urllib.request.urlopen(CIFAR10_URL, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
                os.replace(tmp, archive)
            except OSError as e:  # no network, timeout, full disk
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise SystemExit(f"error: could not download CIFAR-10 ({getattr(e, 'reason', e)}); "
                                 f"fetch {CIFAR10_URL} by hand and put it in {os.path.abspath(data_dir)}/")
        with open(archive, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        if md5 != CIFAR10_MD5:
            raise SystemExit(f"error: {archive} has MD5 {md5}, expected {CIFAR10_MD5}: delete it and download it again")
        tmp = os.path.join(data_dir, ".extracting")  # then renamed, so an interrupted extraction leaves no half folder
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # "data" filter: no absolute paths, links or escapes
        os.replace(os.path.join(tmp, "cifar-10-batches-py"), folder)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        batches = [read_cifar_batch(os.path.join(folder, f"data_batch_{k}")) for k in range(1, 6)]
    except Exception as e:
        raise SystemExit(f"error: cannot read the CIFAR-10 batches in {folder}: {e}")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


NPY_DTYPES = {"|u1": torch.uint8, "|i1": torch.int8, "<i2": torch.int16, "<i4": torch.int32, "<i8": torch.int64,
              "|b1": torch.bool, "<f2": torch.float16, "<f4": torch.float32, "<f8": torch.float64}


def read_npy(f):
    """A .npy array (magic, version, header dict, raw bytes), read with the standard library."""
    if f.read(6) != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    major = f.read(2)[0]  # version 1: 2-byte header length, 2 and 3: 4-byte
    header_len = struct.unpack("<H", f.read(2))[0] if major == 1 else struct.unpack("<I", f.read(4))[0]
    header = ast.literal_eval(f.read(header_len).decode("latin1"))
    descr, shape = header["descr"], tuple(header["shape"])
    if descr not in NPY_DTYPES:
        raise ValueError(f"unsupported dtype {descr}")
    x = torch.frombuffer(bytearray(f.read()), dtype=NPY_DTYPES[descr])[:math.prod(shape)]
    if header["fortran_order"]:
        return x.view(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()
    return x.view(shape)


def load_file(path):
    """A user's images: .npy, .npz (arr_0 images, arr_1 labels if present) or .pt (a uint8 tensor, a tuple
    (images, labels), or a dict with "images" and "labels"). Layout N,H,W,C (N,H,W and N,C,H,W accepted)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".npz", ".pt", ".pth"):
        raise SystemExit(f"error: --data {path}: unsupported file type {ext or '(none)'} (use .npy, .npz or .pt)")
    labels = None
    try:
        if ext == ".npy":
            with open(path, "rb") as f:
                images = read_npy(f)
        elif ext == ".npz":
            with zipfile.ZipFile(path) as z:
                images = read_npy(io.BytesIO(z.read("arr_0.npy")))
                if "arr_1.npy" in z.namelist():
                    labels = read_npy(io.BytesIO(z.read("arr_1.npy")))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                images, labels = obj["images"], obj.get("labels")
            else:
                images, labels = obj if isinstance(obj, (tuple, list)) else (obj, None)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path}: {first_line(e)}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise SystemExit(f"error: {path}: images must be uint8 in [0, 255] (N,H,W,C), got {got}")
    if images.dim() == 3:  # N,H,W: one channel
        images = images[..., None]
    if images.dim() == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.permute(0, 2, 3, 1)  # N,C,H,W (torch's layout) -> N,H,W,C
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise SystemExit(f"error: {path}: images must be N x H x W x C with H = W and C = 1 or 3, "
                         f"got shape {tuple(images.shape)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point
                               or labels.shape != images.shape[:1] or labels.min() < 0):
        raise SystemExit(f"error: {path}: labels must be N non-negative integers, "
                         f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    return images, (labels.long() if labels is not None else None)


def load_data(args):
    """-> uint8 images (N, C, H, W), int64 labels (N,) or None."""
    if args.data == "cifar10":
        return load_cifar10(args.data_dir)
    if args.data == "shapes":
        images, labels = make_shapes(SHAPES_N, args.image_size, 3, seed=0)
    elif os.path.exists(args.data):
        images, labels = load_file(args.data)
    else:
        raise SystemExit(f"error: --data {args.data}: not cifar10, shapes, or an existing .npy/.npz/.pt file")
    return images.permute(0, 3, 1, 2).contiguous(), labels


class Batches:
    """Random batches from the images on their device (for CIFAR-10 on a GPU: 150 MB, gathered by index, so
    the loader never stalls). Each epoch is a fresh permutation from a generator seeded with (seed, epoch),
    so the batch at a step depends on the step alone: resuming needs no sampler state."""
    def __init__(self, images, labels, batch_size, seed, flip):
        if images.shape[0] < batch_size:
            raise SystemExit(f"error: {images.shape[0]} images per process, fewer than the batch of {batch_size}")
        self.images, self.labels, self.batch_size, self.seed, self.flip = images, labels, batch_size, seed, flip
        self.per_epoch, self.epoch, self.perm = images.shape[0] // batch_size, None, None

    def __call__(self, step):
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = torch.Generator(self.images.device).manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.images.shape[0], generator=g, device=self.images.device)
        idx = self.perm[k * self.batch_size:(k + 1) * self.batch_size]
        x = self.images[idx].float() / 127.5 - 1  # [0, 255] -> [-1, 1], as in the paper
        if self.flip:  # random horizontal flips (paper Sec. 4), on the device
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, (self.labels[idx] if self.labels is not None else None)

# -----------------------------------------------------------------------------
# training

def get_lr(step, args):
    """Linear warmup as in the original code: lr * min(step / warmup, 1), step = updates done so far."""
    return args.lr * min(step / args.warmup, 1.0) if args.warmup > 0 else args.lr


def make_optimizer(model, lr, fused, device):
    """Adam as in the paper (betas 0.9, 0.999, eps 1e-8, no weight decay); the fused kernel where there is one."""
    fused = True if fused and device.type in ("cuda", "cpu") else None  # fused CPU Adam needs torch >= 2.4
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def match_layout(optimizer):
    """Give Adam's moments their parameter's memory layout. They load from a checkpoint in the layout they were
    saved in, and fused Adam pairs elements by memory order, not by index: a channels_last parameter with
    NCHW moments would be updated wrongly, without an error (seen with torch 2.13 on the CPU)."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for all parameters at once."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_losses(model, diffusion, x0, y, args):
    """Algorithm 1 lines 2-5 on a batch x0 in [-1, 1] (labels y or None): draw t, then the per-example L_simple.
    Returns (t, losses). train.py --compile compiles this function whole: the t and noise draws, q_sample, the
    network and the loss become one graph (and its backward another)."""
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)  # Alg. 1 line 3 (0-based)
    # Deviation from the paper (fp32 on TPU): bf16 autocast on CUDA; weights, optimizer and loss stay fp32
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=args.bf16 and x0.device.type == "cuda"):
        return t, diffusion.training_losses(lambda x, t: model(x, t, y), x0, t)  # Alg. 1 lines 4-5


def train_step(model, ema, optimizer, diffusion, x0, y, args, stats=None, losses_fn=train_losses):
    """One step of Algorithm 1: L_simple (losses_fn: train_losses, or its compiled form), backward, clip the
    global grad norm, Adam, EMA. args needs grad_clip, ema_decay, p_uncond, bf16. If given, stats (2, 4)
    accumulates the loss sum and count per timestep quartile. Returns device tensors (loss, grad norm): nothing
    here waits for the device. The rest of the step is not compiled: Adam and the EMA are one fused kernel each."""
    if y is not None and args.p_uncond > 0:  # classifier-free guidance: drop the label -> the null class
        y = torch.where(torch.rand(y.shape, device=y.device) < args.p_uncond, torch.full_like(y, ema.num_classes), y)
    t, losses = losses_fn(model, diffusion, x0, y, args)
    loss = losses.mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, args.ema_decay)
    if stats is not None:  # loss by timestep quartile, as improved-diffusion logs it
        q = t * 4 // diffusion.num_timesteps
        stats[0].index_add_(0, q, losses.detach().float())
        stats[1].index_add_(0, q, torch.ones_like(losses, dtype=torch.float32))
    return loss.detach(), grad_norm


@torch.no_grad()
def sample_images(ema, diffusion, n, steps, seed, bf16=True):
    """n EMA samples, the same noise every time (so grids show one set improving), with labels spread over the
    classes for a class-conditional model. steps = 0: Algorithm 2 over all T steps; else that many strided
    steps of DDIM with eta = 1, the stochastic sampler closest to Algorithm 2 (eta = 0 gives noisy images from
    a briefly trained model where eta = 1 and Algorithm 2 give clean ones)."""
    device = diffusion.betas.device
    c, s = ema.config["in_channels"], ema.config["image_size"]
    y, nrow = None, None
    if ema.num_classes:
        nrow = max(1, n // ema.num_classes)  # one row per class
        y = torch.arange(ema.num_classes, device=device).repeat_interleave(nrow)
        n = y.shape[0]
    g = torch.Generator(device).manual_seed(seed)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        net = lambda x, t: ema(x, t, y)
        if steps:
            x = diffusion.ddim_sample_loop(net, (n, c, s, s), steps, eta=1.0, generator=g)
        else:
            x = diffusion.p_sample_loop(net, (n, c, s, s), generator=g)
    return x.float(), nrow


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    m = int(seconds) // 60
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{int(seconds) % 60:02d}s"

# -----------------------------------------------------------------------------
# command line

MODEL_FLAGS = ("ch", "ch_mult", "num_res_blocks", "attn", "dropout", "class_cond", "timesteps", "schedule",
               "image_size")
# never taken from a checkpoint
RUN_FLAGS = ("resume", "device", "compile", "bf16", "tf32", "fused_adam", "channels_last", "out")


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def get_parser():
    p = argparse.ArgumentParser(
        description="Train a DDPM (Ho et al. 2020); defaults are the paper's CIFAR-10 run (Sec. 4, Appendix B).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Short runs need a shorter warmup and a faster EMA than the 800k-step recipe, e.g. --warmup 100 "
               "--ema-decay 0.995 for a few thousand steps: an EMA with decay 0.9999 averages over ~10k steps, so in "
               "a short run it stays near the initial weights and its samples are noise.")
    a = p.add_argument
    a("--data", default="cifar10", help="cifar10, shapes (built-in, labelled, generated in code), or a .npy/.npz/.pt "
      "file of uint8 images N,H,W,C (npz: arr_0 images, arr_1 labels)")
    a("--data-dir", default="./data", help="where cifar10 is looked for (archive or extracted) and downloaded to")
    a("--image-size", type=int, default=32, help="image size of the built-in shapes data (other data: their own size)")
    a("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (the paper's)")
    a("--ch", type=int, default=128, help="U-Net base channels (multiple of 32)")
    a("--ch-mult", type=int_list, default="1,2,2,2", help="channel multiplier per resolution level")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per level")
    a("--attn", type=int_list, default="16", help="resolutions with self-attention (comma-separated, '' for none)")
    a("--dropout", type=float, default=0.1, help="dropout in the residual blocks")
    a("--class-cond", action="store_true", help="train with the labels (for classifier-free guidance)")
    a("--p-uncond", type=float, default=0.1, help="with --class-cond: chance of dropping a label (Ho & Salimans 2021)")
    a("--timesteps", type=int, default=1000, help="T; for T != 1000 the betas are scaled by 1000/T (Nichol & Dhariwal)")
    a("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule (linear: the paper's)")
    a("--batch-size", type=int, default=128, help="global batch size (split across torchrun processes)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate (eps 1e-8, no weight decay)")
    a("--warmup", type=int, default=5000, help="steps of linear learning-rate warmup")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.9999, help="decay of the EMA of the weights used for sampling")
    a("--steps", type=int, default=800000, help="training steps")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default="out", help="run folder: ckpt.pt, samples_<step>.png, log.txt")
    a("--resume", default="", help="run folder or checkpoint to continue from (model and diffusion flags come from it)")
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--compile", action="store_true", help="torch.compile the step's loss: t and noise draws, q_sample, network, "
      "L_simple, in one graph (with torchrun: the network alone)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA (fp32 weights)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls and convolutions on CUDA")
    a("--fused-adam", action=argparse.BooleanOptionalAction, default=True, help="fused Adam kernel (CUDA and CPU)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False,
      help="channels_last (NHWC) weights and batches; off: not yet measured on a GPU, no gain on a CPU")
    a("--log-every", type=int, default=100, help="steps between log lines (and NaN checks)")
    a("--ckpt-every", type=int, default=5000, help="steps between checkpoints (also at the end, on Ctrl-C/SIGTERM)")
    a("--sample-every", type=int, default=20000, help="steps between sample grids, and one at the end (0: none)")
    a("--num-samples", type=int, default=64, help="images in a sample grid")
    a("--sample-steps", type=int, default=0,
      help="sample grids: 0 = Algorithm 2 over all T steps; N = N strided steps (DDIM, eta 1)")
    return p


def get_args(argv=None):
    """Parsed args and the set of flags given explicitly (to tell them apart from defaults on --resume)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def merge_resume_args(args, explicit, saved):
    """On --resume the checkpoint's args hold; flags given now may change training settings, not the model."""
    for k, v in saved.items():
        if k in RUN_FLAGS or not hasattr(args, k):
            continue
        if k not in explicit:
            setattr(args, k, v)
        elif getattr(args, k) != v:
            flag = f"--{k.replace('_', '-')} {getattr(args, k)}"
            if k in MODEL_FLAGS:
                raise SystemExit(f"error: {flag} conflicts with the checkpoint ({v}); drop the flag to resume")
            print(f"note: {flag} overrides the checkpoint's {v}")

# -----------------------------------------------------------------------------

def main(argv=None):
    args, explicit = get_args(argv)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        merge_resume_args(args, explicit, ckpt["args"])
        if "out" not in explicit:  # continue in the folder the checkpoint is in
            args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume) or "."
    for k in ("batch_size", "steps", "log_every", "ckpt_every", "timesteps", "num_samples"):
        if getattr(args, k) <= 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")

    # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; one process per GPU (or several CPU processes with gloo)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    ddp = world > 1
    device = resolve_device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if master and not args.resume and os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; continue it with --resume {args.out} or pick another --out")

    def log(msg, console=True):
        if master:
            if console:
                print(msg, flush=True)
            try:
                with open(os.path.join(args.out, "log.txt"), "a") as f:
                    f.write(msg + "\n")
            except OSError as e:
                raise SystemExit(f"error: could not write {args.out}/log.txt: {e.strerror or e}")

    # data: each process keeps its own shard of the images, on its device
    images, labels = load_data(args)
    if args.class_cond and labels is None:
        raise SystemExit(f"error: --class-cond needs labels, and --data {args.data} has none (npz: put them in arr_1)")
    num_classes = int(labels.max()) + 1 if args.class_cond else None
    images = images[rank::world].to(device)
    labels = labels[rank::world].to(device) if args.class_cond else None
    _, c, s, _ = images.shape
    if master:  # only now: bad data leave no empty run folder behind
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot create --out {args.out}: {e.strerror or e}")

    # model, EMA, optimizer, diffusion
    if ckpt:
        model_config, diffusion_config = ckpt["model_config"], ckpt["diffusion_config"]
        size, channels, classes = model_config["image_size"], model_config["in_channels"], model_config["num_classes"]
        if (size, channels) != (s, c):
            raise SystemExit(f"error: the data are {s}x{s} with {c} channel(s), the checkpoint's model expects "
                             f"{size}x{size} with {channels}")
        if args.class_cond and num_classes > classes:
            raise SystemExit(f"error: the data have {num_classes} classes, the checkpoint's model {classes}")
    else:
        model_config = dict(image_size=s, in_channels=c, ch=args.ch, ch_mult=args.ch_mult,
                            num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn, dropout=args.dropout,
                            num_classes=num_classes)
        scale = 1000 / args.timesteps  # = 1 for the paper's T = 1000
        diffusion_config = dict(schedule=args.schedule, num_timesteps=args.timesteps, beta_start=1e-4 * scale,
                                beta_end=0.02 * scale, mean_type="eps", var_type="fixedlarge")
    torch.manual_seed(args.seed)
    try:
        raw_model = UNet(**model_config)
        diffusion = build_diffusion(diffusion_config).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    raw_model.to(device, memory_format=memory_format)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    optimizer = make_optimizer(raw_model, args.lr, args.fused_adam, device)
    step = 0
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        match_layout(optimizer)
        step = ckpt["step"]
    # --compile: the whole loss computation in one graph; under DDP the network alone (DDP wraps the compiled net)
    model = torch.compile(raw_model) if args.compile and ddp else raw_model
    losses_fn = torch.compile(train_losses) if args.compile and not ddp else train_losses
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # random state: per process, so each rank draws its own t, noise, flips and dropout
    torch.manual_seed(args.seed + rank)
    if ckpt:
        saved = ckpt["rng"]["ranks"]
        if len(saved) == world:
            set_rng_state(saved[rank], device)
        else:
            torch.manual_seed(args.seed + rank + 7919 * step)
            log(f"note: checkpoint from {len(saved)} process(es), now {world}: random streams reseeded")
    batches = Batches(images, labels, args.batch_size // world, args.seed + rank, args.flip)

    def save(step):
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if master:
            ckpt = {"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "model_config": raw_model.config, "diffusion_config": diffusion_config,
                    "args": vars(args), "rng": {"ranks": states}, "format": "ddpm-checkpoint-v1"}
            atomic_write(ckpt_path, lambda f: torch.save(ckpt, f))
        if ddp:
            dist.barrier()

    # Ctrl-C / SIGTERM (pre-emption): finish the step, save, exit. A second signal stops at once; the files
    # on disk are whole either way, since every write is atomic.
    stop = []
    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"{'resuming at step ' + str(step) if ckpt else 'training'}: {args.data} {images.shape[0] * world} images "
        f"{s}x{s}x{c}, {n_params / 1e6:.2f}M params, batch {args.batch_size} on {world} x {device}, "
        f"T={diffusion.num_timesteps}")
    log("args: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), console=False)

    # the loop. acc: loss sum, grad-norm sum, loss sum per t quartile (4), count per quartile (4); on the
    # device, read only at sync points (log, checkpoint, samples), so the GPU never waits for Python
    acc = torch.zeros(10, device=device)
    t_last, step_last, n_logs = time.time(), step, 0
    while step < args.steps:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, y = batches(step)
        x0 = x0.contiguous(memory_format=memory_format)  # a no-op unless --channels-last
        loss, grad_norm = train_step(model, ema, optimizer, diffusion, x0, y, args, acc[2:].view(2, 4), losses_fn)
        acc[0] += loss
        acc[1] += grad_norm
        step += 1
        do_log = step % args.log_every == 0 or step == args.steps
        do_ckpt = step % args.ckpt_every == 0 or step == args.steps
        do_sample = args.sample_every > 0 and (step % args.sample_every == 0 or step == args.steps)
        if not (do_log or do_ckpt or do_sample or (stop and not ddp)):
            continue
        # sync point: all ranks agree on NaN and on stopping (a signal may reach them at different steps)
        finite = torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
        status = torch.stack([acc[0], (~finite).float(), torch.tensor(float(bool(stop)), device=device)])
        if ddp:
            dist.all_reduce(status)
        loss_sum, bad_params, stopping = status.tolist()
        if not math.isfinite(loss_sum) or bad_params:
            last = (f"{ckpt_path} (the last good checkpoint) is intact" if os.path.exists(ckpt_path)
                    else "no checkpoint was written")
            raise SystemExit(f"error: loss became {loss_sum / max(step - step_last, 1):.4g} by step {step}: training "
                             f"diverged; {last}. Resume it with a lower --lr or a longer --warmup.")
        if do_log:
            if ddp:
                dist.all_reduce(acc)
            v, n = acc.tolist(), (step - step_last) * world
            dt = time.time() - t_last
            img_s = (step - step_last) * args.batch_size / dt
            eta = format_eta((args.steps - step) * args.batch_size / img_s)
            log(f"step {step:>{len(str(args.steps))}d}/{args.steps} | loss {v[0] / n:.4f} | lr {lr:.2e} | "
                f"gnorm {v[1] / n:.2f} | {img_s:7.1f} img/s | eta {eta}")
            if n_logs % 10 == 0:
                log("  loss by t quartile: " + " | ".join(f"q{i} {v[2 + i] / max(v[6 + i], 1):.4f}" for i in range(4)))
            acc.zero_()
            t_last, step_last, n_logs = time.time(), step, n_logs + 1
        t_work = time.time()
        if do_ckpt or stopping:
            save(step)
        if do_sample and master and not stopping:
            x, nrow = sample_images(ema, diffusion, args.num_samples, args.sample_steps, args.seed, args.bf16)
            save_grid(os.path.join(args.out, f"samples_{step:07d}.png"), x, nrow)
        t_last += time.time() - t_work  # checkpoints and samples do not count against img/s
        if stopping:
            log(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume {args.out}")
            raise SystemExit(130 if stop == [signal.SIGINT] else 0)
    log(f"done: {step} steps; checkpoint {ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        raise SystemExit("error: interrupted")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
