"""
Images in and out: the training data (CIFAR-10, the built-in shapes, a user's .npy/.npz/.pt file) as uint8
tensors, and the files samples go to (PNG grids, the .npz that FID tools read). Standard library and torch only:
no numpy, no Pillow, no torchvision.
"""
import ast
import codecs
import contextlib
import ctypes
import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import sys
import tarfile
import urllib.request
import zipfile
import zlib

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def first_line(e):
    """An exception as one short line (for the one-line error messages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# -----------------------------------------------------------------------------
# writing: PNG grids and .npz, atomically

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


def npy_header(t):
    """.npy format 1.0: magic, version, little-endian header length, a python dict literal padded with spaces
    and a newline so the data starts on a 64-byte boundary."""
    descr = {torch.uint8: "|u1", torch.int64: "<i8"}[t.dtype]
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(t.shape)!r}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def write_npz(path, arrays):
    """arrays: {"arr_0": uint8 tensor, ...} -> an uncompressed .npz as numpy.savez writes it, atomically.
    The zip entries carry a fixed date, so the same arrays give the same file byte for byte."""
    assert sys.byteorder == "little", "the .npy headers say little-endian"
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, t in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as out:  # zip64: 50k samples at 256x256 pass 4 GB
                    out.write(npy_header(t))
                    for chunk in t.contiguous().view(-1).split(1 << 24):  # a CPU tensor's bytes, without numpy
                        out.write(ctypes.string_at(chunk.data_ptr(), chunk.numel() * chunk.element_size()))
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# reading: uint8 images (N, H, W, C) and int64 labels (N,) or None

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


def load_data(spec, data_dir, image_size):
    """The training set named by train.py's --data: uint8 images (N, C, H, W), int64 labels (N,) or None."""
    if spec == "cifar10":
        return load_cifar10(data_dir)
    if spec == "shapes":
        images, labels = make_shapes(SHAPES_N, image_size, 3, seed=0)
    elif os.path.exists(spec):
        images, labels = load_file(spec)
    else:
        raise SystemExit(f"error: --data {spec}: not cifar10, shapes, or an existing .npy/.npz/.pt file")
    return images.permute(0, 3, 1, 2).contiguous(), labels


def load_eval_images(spec, data_dir, image_size, channels):
    """uint8 (N,H,W,C): 'cifar10' is CIFAR-10's 10,000 test images (test_batch), 'shapes' 1,000 held-out built-in
    images (seed 1; train.py trains on seed 0), else a user's .npy/.npz/.pt."""
    if spec == "shapes":
        return make_shapes(1000, image_size, channels, seed=1)[0]
    if spec != "cifar10":
        return load_file(spec)[0]
    test_batch = os.path.join(data_dir, "cifar-10-batches-py", "test_batch")
    if not os.path.exists(test_batch):
        load_cifar10(data_dir)  # finds, or downloads, and extracts the archive
    try:
        return read_cifar_batch(test_batch)[0].permute(0, 2, 3, 1)
    except Exception as e:
        raise SystemExit(f"error: cannot read {test_batch}: {e}")
