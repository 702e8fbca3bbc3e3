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
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tarfile
import time
import urllib.request
import zipfile
import zlib

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHAPES_CLASSES = ("square", "disk", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")  # the shapes' palette, in order: each kind's own colour in "shapes"
CAPTIONS = tuple(f"{colour} {kind}" for colour in COLOURS for kind in SHAPES_CLASSES)  # "captions": 4 x kind + colour


def parse_classes(spec, num_classes, names):
    """'3' or '1,5,7' (or class names, where the checkpoint has them) -> list of ints in 0..num_classes-1."""
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s in names:
            out.append(names.index(s))
        elif s.lstrip("-").isdigit() and 0 <= int(s) < num_classes:
            out.append(int(s))
        else:
            raise ValueError(f"--class {s}: not a class of this model (0..{num_classes - 1}"
                             + (f" or one of {','.join(names)})" if names else ")"))
    return out



def first_line(e):
    """An exception as one short line (for the one-line error messages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# -----------------------------------------------------------------------------
# writing: PNG grids and .npz, atomically

def to_uint8(x):
    """[-1, 1] float (N,C,H,W) -> uint8 (N,H,W,C). Rounds, so it inverts the data scaling x/127.5 - 1 exactly."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(images):
    """uint8 (N,H,W,C), as the .npz files and data sets hold images -> float (N,C,H,W) in [-1, 1], the data scaling
    x/127.5 - 1 of training; to_uint8 inverts it."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def atomic_write(path, write):
    """Call write(f) on a temporary file, fsync it, then os.replace it onto path: a crash, a signal or a
    full disk leaves either the old file or the new one, never half of one. An OSError says which file, and that
    the previous one is intact."""
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
            raise OSError(f"could not write {path}: {e.strerror or e} "
                          f"(any previous {os.path.basename(path)} is intact)") from None
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


def class_counts(n, k):
    """n samples spread evenly over k classes: the counts differ by at most one."""
    return [n // k + (i < n % k) for i in range(k)]


def class_grid(images, counts=None, most=256):
    """uint8 (N, H, W, C) -> (images in [-1, 1] for save_grid, its row length): at most `most` of them, or, with the
    counts of the classes the images run through in blocks, one row per class (short rows padded with black)."""
    x = from_uint8(images)
    if counts is None:
        return x[:most], None
    per_row = max(1, min(max(counts), most // len(counts)))
    rows, start = [], 0
    for count in counts:
        block = x[start:start + min(count, per_row)]
        rows.append(torch.cat([block, -torch.ones(per_row - len(block), *x.shape[1:])]))
        start += count
    return torch.cat(rows), per_row


def trajectory_strip(path, num_calls, points=10):
    """(record, save): record(k, x_t, pred_xstart) at the sampler's k-th step keeps the first 4 samples at `points`
    evenly spaced steps, the last included; save() writes them to path, two rows per sample, x_t and the predicted
    x0, time running left to right (the paper's Figure 6)."""
    keep, frames = {round(k * (num_calls - 1) / max(points - 1, 1)) for k in range(min(points, num_calls))}, []
    def record(k, x, pred_xstart):
        if k in keep:
            frames.append((x[:4].float().cpu(), pred_xstart[:4].float().cpu()))
    def save():
        rows = [torch.stack([f[j][s] for f in frames]) for s in range(len(frames[0][0])) for j in (0, 1)]
        save_grid(path, torch.cat(rows), nrow=len(frames))
        return f"wrote {path}: x_t (odd rows) and predicted x0 (even rows) at {len(frames)} steps"
    return record, save


def write_pngs(folder, images, first, labels=None, names=None):
    """uint8 (N, H, W, C) -> one PNG each in folder, named by index from `first` (and the class, where there are
    labels: its name where there are names), each written atomically."""
    for k, image in enumerate(images):
        label = "" if labels is None else f"_{names[labels[k]] if names else int(labels[k])}"
        atomic_write(os.path.join(folder, f"{first + k:06d}{label}.png"), lambda f: f.write(png_bytes(image)))


def npy_header(t):
    """.npy format 1.0: magic, version, little-endian header length, a python dict literal padded with spaces
    and a newline so the data starts on a 64-byte boundary."""
    descr = {torch.uint8: "|u1", torch.int64: "<i8", torch.float64: "<f8"}[t.dtype]
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(t.shape)!r}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def tensor_bytes(t):
    """The bytes of a tensor's elements (contiguous, on the CPU), in chunks, without numpy."""
    for chunk in t.detach().cpu().contiguous().view(-1).split(1 << 24):
        yield ctypes.string_at(chunk.data_ptr(), chunk.numel() * chunk.element_size())


def write_npz(path, arrays, record=None):
    """arrays: {"arr_0": uint8 tensor, ...} -> an uncompressed .npz as numpy.savez writes it, atomically; record: a
    dict stored beside them as record.json (what made the arrays; numpy and the FID tools read arr_0 and ignore it).
    The zip entries carry a fixed date, so the same arrays give the same file byte for byte."""
    assert sys.byteorder == "little", "the .npy headers say little-endian"
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, t in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as out:  # zip64: 50k samples at 256x256 pass 4 GB
                    out.write(npy_header(t))
                    for chunk in tensor_bytes(t):
                        out.write(chunk)
            if record is not None:
                info = zipfile.ZipInfo("record.json", date_time=(1980, 1, 1, 0, 0, 0))
                zf.writestr(info, json.dumps(record, sort_keys=True))
    atomic_write(path, write)


def read_npz(path):
    """Every array of an .npz ({name: tensor}) and its record (write_npz's, or None)."""
    try:
        with zipfile.ZipFile(path) as z:
            arrays = {n[:-4]: read_npy(io.BytesIO(z.read(n))) for n in z.namelist() if n.endswith(".npy")}
            record = json.loads(z.read("record.json")) if "record.json" in z.namelist() else None
    except Exception as e:
        raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    return arrays, record


class BatchFolder:
    """Where a long sampling run keeps its finished batches as they finish: one .npz per batch (arr_0 images,
    arr_1 labels, and what else the run adds) in a folder, each written atomically by the process that drew it, so
    no process waits on another's batch and a stopped run loses only the batches in flight. record.json says what
    made them (check() refuses to mix runs); each process marks when it leaves (rankR.done or rankR.stopped)."""

    def __init__(self, folder, n, batch_size, record):
        self.folder, self.record = folder, record
        self.sizes = [min(batch_size, n - lo) for lo in range(0, n, batch_size)]

    def check(self, npz):
        """For a resume: the folder's record, and that of the .npz a stopped run wrote, must be this run's."""
        path = os.path.join(self.folder, "record.json")
        for what, saved in ((npz, os.path.exists(npz) and read_npz(npz)[1]),
                            (self.folder, os.path.exists(path) and json.load(open(path)))):
            if saved and saved != self.record:
                changed = sorted(k for k in self.record if saved.get(k) != self.record[k])
                raise ValueError(f"--resume: {what} holds samples of another run (its {', '.join(changed)} differ "
                                 f"from this command's)")

    def start(self, resume, npz=""):
        """Once, before anyone draws: a fresh run forgets an earlier run's batches; a resumed one keeps them, and
        takes the whole batches of an .npz that a stopped run of an earlier version wrote without this folder."""
        os.makedirs(self.folder, exist_ok=True)
        for f in os.listdir(self.folder):
            if not resume or f.startswith("rank"):
                os.remove(os.path.join(self.folder, f))
        atomic_write(os.path.join(self.folder, "record.json"), lambda f: f.write(json.dumps(self.record).encode()))
        if resume and npz and os.path.exists(npz) and not self.done(0):
            (images, labels), lo = load_file(npz), 0
            for b, size in enumerate(self.sizes):
                if lo + size <= len(images):
                    self.write(b, {"arr_0": images[lo:lo + size],
                                   **({"arr_1": labels[lo:lo + size]} if labels is not None else {})})
                lo += size

    def path(self, b):
        return os.path.join(self.folder, f"batch_{b:07d}.npz")

    def done(self, b):
        return os.path.exists(self.path(b))

    def drawn(self):
        """Samples in finished batches."""
        return sum(size for b, size in enumerate(self.sizes) if self.done(b))

    def write(self, b, arrays):
        write_npz(self.path(b), arrays)

    def read(self):
        """The finished batches from the first on, as far as they go: {name: the arrays concatenated} ({} if none)."""
        parts = []
        while len(parts) < len(self.sizes) and self.done(len(parts)):
            parts.append(read_npz(self.path(len(parts)))[0])
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def leave(self, rank, stopped):
        open(os.path.join(self.folder, f"rank{rank}.{'stopped' if stopped else 'done'}"), "w").close()

    def wait(self, world, stopping):
        """Until every process has left (stopping(): give up on them); -> whether the run stopped short."""
        marks = lambda: [f for f in os.listdir(self.folder) if f.startswith("rank")]
        while len(marks()) < world and not stopping():
            time.sleep(0.5)
        return stopping() or any(f.endswith(".stopped") for f in marks())

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


# -----------------------------------------------------------------------------
# reading: uint8 images (N, H, W, C) and int64 labels (N,) or None

def make_shapes(n, image_size=32, channels=3, seed=0, captions=False):
    """The built-in labelled data: one shape on a dark background per image, class = shape kind
    (0 square, 1 disk, 2 triangle, 3 cross), each kind in its own colour (RGB) or grey level (C = 1),
    random position, size and background, anti-aliased by 2x2 supersampling. Deterministic in seed.
    captions=True: the colour is drawn apart from the kind, and the class is 4 colour + kind, named by
    CAPTIONS ("red disk"); the images' other random draws are those of the same seed without it.
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
    hue = torch.randint(0, 4, (n,), generator=g) if captions else labels     # drawn last: the rest stays as it was
    colour = palette[hue] * shade[:, None]
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
    return out, (4 * hue + labels if captions else labels)


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
    """One data_batch_k: 10000 images stored as rows of 3072 bytes (R, G, B planes of 32x32), returned uint8
    (N, H, W, C), and their labels."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    _, shape, dtype, _, raw = d[b"data"].state  # ndarray state: (version, shape, dtype, fortran, bytes)
    assert dtype.args[0] in ("u1", b"u1") and shape[1] == 3072, f"unexpected array {dtype.args} {shape}"
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(shape[0], 3, 32, 32).permute(0, 2, 3, 1)
    return images.contiguous(), torch.tensor(d[b"labels"], dtype=torch.int64)


def load_cifar10(data_dir):
    """The 50,000 training images of CIFAR-10, uint8 (N, H, W, C), and their labels: the extracted python batches
    in data_dir, else the archive there (downloaded with the standard library if absent), checked against its MD5
    and extracted."""
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
                raise OSError(f"could not download CIFAR-10 ({getattr(e, 'reason', e)}); "
                              f"fetch {CIFAR10_URL} by hand and put it in {os.path.abspath(data_dir)}/") from None
        with open(archive, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        if md5 != CIFAR10_MD5:
            raise ValueError(f"{archive} has MD5 {md5}, expected {CIFAR10_MD5}: delete it and download it again")
        tmp = os.path.join(data_dir, ".extracting")  # then renamed, so an interrupted extraction leaves no half folder
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # "data" filter: no absolute paths, links or escapes
        os.replace(os.path.join(tmp, "cifar-10-batches-py"), folder)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        batches = [read_cifar_batch(os.path.join(folder, f"data_batch_{k}")) for k in range(1, 6)]
    except Exception as e:
        raise ValueError(f"cannot read the CIFAR-10 batches in {folder}: {first_line(e)}") from None
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


def load_file(path, shape=None):
    """A user's images: .npy, .npz (arr_0 images, arr_1 labels if present) or .pt (a uint8 tensor, a tuple
    (images, labels), or a dict with "images" and "labels"). Layout N,H,W,C (N,H,W and N,C,H,W accepted); square
    images, or shape = (H, W) when the images are asked to be of that shape."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".npz", ".pt", ".pth"):
        raise ValueError(f"--data {path}: unsupported file type {ext or '(none)'} (use .npy, .npz or .pt)")
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
        raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{path}: images must be uint8 in [0, 255] (N,H,W,C), got {got}")
    if images.dim() == 3:  # N,H,W: one channel
        images = images[..., None]
    if images.dim() == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.permute(0, 2, 3, 1)  # N,C,H,W (torch's layout) -> N,H,W,C
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[3] not in (1, 3) or \
            (images.shape[1] != images.shape[2] if shape is None else tuple(images.shape[1:3]) != tuple(shape)):
        need = "H = W" if shape is None else f"H, W = {shape[0]}, {shape[1]} (--image-size)"
        raise ValueError(f"{path}: images must be N x H x W x C with {need} and C = 1 or 3, "
                         f"got shape {tuple(images.shape)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point
                               or labels.shape != images.shape[:1] or labels.min() < 0):
        raise ValueError(f"{path}: labels must be N non-negative integers, "
                         f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    return images, (labels.long() if labels is not None else None)


# -----------------------------------------------------------------------------
# a folder of images: PNG read with the standard library, other formats through Pillow where it is installed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _unfilter(raw, height, stride, bpp):
    """Undo the PNG scanline filters (spec Sec. 9: 0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) -> (height, stride)
    uint8. Sub and Up are vectorised; Average and Paeth depend on the byte to their left, so they loop."""
    out = torch.zeros(height + 1, stride, dtype=torch.uint8)  # row 0: the zero row 'above' the image
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(height, stride + 1)
    for y in range(height):
        kind, line, up = int(rows[y, 0]), rows[y, 1:], out[y]
        if kind == 0:
            out[y + 1] = line
        elif kind == 1:  # Sub: a running sum (mod 256) along each of the bpp interleaved byte streams
            padded = torch.zeros(-(-stride // bpp) * bpp, dtype=torch.int64)
            padded[:stride] = line
            out[y + 1] = (padded.view(-1, bpp).cumsum(0).view(-1)[:stride] % 256).to(torch.uint8)
        elif kind == 2:  # Up
            out[y + 1] = ((line.int() + up.int()) % 256).to(torch.uint8)
        elif kind in (3, 4):
            cur, prev, data = bytearray(stride), bytes(up.tolist()), bytes(line.tolist())
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = prev[i]
                if kind == 3:  # Average
                    cur[i] = (data[i] + ((a + b) >> 1)) & 255
                else:  # Paeth: the neighbour (left, up, up-left) closest to a + b - c
                    c = prev[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[i] = (data[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            out[y + 1] = torch.frombuffer(cur, dtype=torch.uint8)
        else:
            raise ValueError(f"unknown filter type {kind}")
    return out[1:]


def read_png(path):
    """A PNG file -> uint8 (H, W, C), C = 1 (grey) or 3 (colour), with the standard library: bit depths 1-16 (16 is
    rounded to 8), grey, RGB, palette, grey + alpha and RGBA, every filter type; not interlaced. Transparency is
    composited onto white (a transparent background shows as white, as in a viewer)."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, palette, trns, ihdr = 8, [], None, None, None
    while pos + 8 <= len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body, crc = data[pos + 8:pos + 8 + n], data[pos + 8 + n:pos + 12 + n]
        if len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(tag + body) & 0xFFFFFFFF:
            raise ValueError(f"chunk {tag.decode('latin1')} is truncated or corrupt (CRC)")
        if tag == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            palette = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(-1, 3)
        elif tag == b"tRNS":
            trns = body
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + n
    if ihdr is None or not idat:
        raise ValueError("no IHDR or no image data")
    w, h, depth, colour, _, _, interlace = ihdr
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None or depth not in (1, 2, 4, 8, 16) or interlace:
        raise ValueError(f"unsupported PNG (colour type {colour}, bit depth {depth}, interlace {interlace})")
    bits = channels * depth
    rows = _unfilter(zlib.decompress(b"".join(idat)), h, (w * bits + 7) // 8, max(1, bits // 8))
    if depth == 16:
        x = rows.view(h, w * channels, 2)[..., 0]  # the high byte
    elif depth < 8:  # packed samples, most significant bits first
        shifts = torch.arange(8 - depth, -1, -depth, dtype=torch.uint8)
        x = ((rows[..., None] >> shifts) & (2 ** depth - 1)).view(h, -1)[:, :w * channels]
        if colour == 0:
            x = x * (255 // (2 ** depth - 1))  # scale grey to 0..255 (palette indices stay indices)
    else:
        x = rows
    x = x.reshape(h, w, channels)
    alpha = None
    if colour == 3:
        if palette is None:
            raise ValueError("palette image without a PLTE chunk")
        index = x[..., 0].long()
        if trns is not None:
            table = torch.full((256,), 255, dtype=torch.uint8)
            table[:len(trns)] = torch.frombuffer(bytearray(trns), dtype=torch.uint8)
            alpha = table[index]
        x = palette[index.clamp(max=len(palette) - 1)]
    elif colour in (4, 6):
        x, alpha = x[..., :-1], x[..., -1]
    if alpha is not None:  # over white
        a = alpha[..., None].float() / 255
        x = (x.float() * a + 255 * (1 - a)).round().to(torch.uint8)
    return x


def read_image(path):
    """An image file -> uint8 (H, W, C): PNG with the standard library, anything else with Pillow."""
    if path.lower().endswith(".png"):
        return read_png(path)
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{path}: reading {os.path.splitext(path)[1]} files needs Pillow "
                         f"(pip install Pillow); PNG files are read without it") from None
    with Image.open(path) as im:
        im = im.convert("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, -1)


def center_crop_resize(img, size):
    """uint8 (H, W, C) -> the largest centred crop of the aspect ratio of size (an int: square; or (height, width)),
    resized to it: bicubic with antialiasing (PIL's BICUBIC), in both directions; uint8 (height, width, C)."""
    height, width = (size, size) if isinstance(size, int) else size
    h, w, _ = img.shape
    crop_h, crop_w = min(h, w * height // width), min(w, h * width // height)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    x = img[top:top + crop_h, left:left + crop_w].permute(2, 0, 1)[None].float()
    if (crop_h, crop_w) != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True,
                                            align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


def load_folder(path, image_size):
    """Every image file under a folder, centre-cropped to image_size's aspect ratio (an int: square; or (height,
    width)) and resized to it: uint8 (N, H, W, C), C = 1 if all are grey, else 3; labels from the first-level
    subfolders (sorted names, as torchvision's ImageFolder) when the images sit in subfolders, else None; and the
    class names."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"--data {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    tops = [os.path.relpath(f, path).split(os.sep)[0] for f in files]
    classes = sorted(set(tops)) if all(os.sep in os.path.relpath(f, path) for f in files) else None
    images = []
    for f in files:
        try:
            images.append(center_crop_resize(read_image(f), image_size))
        except (ValueError, OSError, zlib.error, RuntimeError) as e:
            raise ValueError(f"cannot read {f}: {first_line(e)}") from None
    colour = any(x.shape[-1] == 3 and not (x == x[..., :1]).all() for x in images)
    images = torch.stack([x.expand(-1, -1, 3) if colour else x[..., :1] for x in images])
    labels = torch.tensor([classes.index(t) for t in tops]) if classes else None
    return images, labels, classes


def load_data(spec, data_dir, image_size):
    """The training set named by train.py's --data: uint8 images (N, H, W, C), int64 labels (N,) or None, and the
    class names (None where the data have none). image_size: an int (the built-in shapes' size, a folder's images
    cropped square; files keep their own square size) or (height, width) (what every image must be, or is cropped
    and resized to)."""
    shape = None if isinstance(image_size, int) else tuple(image_size)
    if shape is not None and spec in ("cifar10", "shapes", "captions") and shape[0] != shape[1]:
        raise ValueError(f"--image-size {shape[0]},{shape[1]}: {spec} images are square")
    if spec == "cifar10":
        return (*load_cifar10(data_dir), CIFAR10_CLASSES)
    if spec == "shapes":
        return (*make_shapes(SHAPES_N, image_size if shape is None else shape[0], 3, seed=0), SHAPES_CLASSES)
    if spec == "captions":
        return (*make_shapes(SHAPES_N, image_size if shape is None else shape[0], 3, seed=0, captions=True), CAPTIONS)
    if os.path.isdir(spec):
        return load_folder(spec, image_size)
    if os.path.exists(spec):
        return (*load_file(spec, shape), None)
    raise FileNotFoundError(f"--data {spec}: not cifar10, shapes, captions, a folder of images, or an existing "
                            f".npy/.npz/.pt file")


MASKS = ("left-half", "right-half", "centre-square")  # the named masks, by the region they fill in


def load_mask(spec, height, width):
    """An inpainting mask as float (M, 1, H, W), 1 = keep, 0 = fill in: a PNG (white = keep, black = fill), an .npy
    or .npz (arr_0) of masks shaped (H, W), (M, H, W) or (M, H, W, 1) with values 0 and 1 (or 255), or the name of
    the region to fill in (MASKS). ValueError for anything that is not two-valued, the wrong size, or all one."""
    mask = torch.ones(1, 1, height, width)
    if spec == "left-half":
        mask[..., :width // 2] = 0
    elif spec == "right-half":
        mask[..., width // 2:] = 0
    elif spec == "centre-square":
        mask[..., height // 4:height - height // 4, width // 4:width - width // 4] = 0
    elif not os.path.isfile(spec):
        raise FileNotFoundError(f"--mask {spec}: no such file, and not one of {', '.join(MASKS)}")
    else:
        try:
            if spec.lower().endswith(".png"):
                m = read_png(spec)
                if not (m == m[..., :1]).all():
                    raise ValueError("a mask is black and white; this PNG has colours")
                m = m[None, ..., 0]
            elif spec.lower().endswith(".npz"):
                m = read_npz(spec)[0]["arr_0"]
            else:
                with open(spec, "rb") as f:
                    m = read_npy(f)
        except (ValueError, OSError, KeyError, zlib.error) as e:
            raise ValueError(f"--mask {spec}: {first_line(e)}") from None
        m = m.squeeze(-1) if m.dim() == 4 and m.shape[-1] == 1 else m
        mask = (m if m.dim() == 3 else m[None]).unsqueeze(1)
        top = 255 if mask.dtype == torch.uint8 and mask.max() > 1 else 1
        if mask.dim() != 4 or mask.shape[-2:] != (height, width):
            raise ValueError(f"--mask {spec}: masks of shape {tuple(m.shape)}, for {height}x{width} images")
        if not ((mask == 0) | (mask == top)).all():
            raise ValueError(f"--mask {spec}: a mask is black (fill in) and white (keep), nothing in between")
        mask = (mask > 0).float()
    if (mask == 0).all() or (mask == 1).all():
        raise ValueError(f"--mask {spec}: the mask " + ("keeps nothing (all black): that is sampling, not inpainting"
                                                        if (mask == 0).all() else "keeps everything: nothing to fill in"))
    return mask


def load_eval_images(spec, data_dir, image_size, channels):
    """uint8 (N,H,W,C): 'cifar10' is CIFAR-10's 10,000 test images (test_batch), 'shapes' (or 'captions') 1,000
    held-out built-in images (seed 1; train.py trains on seed 0), else a user's .npy/.npz/.pt. image_size: the
    model's (height, width)."""
    height, width = image_size
    if spec in ("shapes", "captions"):
        return make_shapes(1000, height, channels, seed=1, captions=spec == "captions")[0]
    if spec != "cifar10":
        return load_file(spec, None if height == width else (height, width))[0]
    test_batch = os.path.join(data_dir, "cifar-10-batches-py", "test_batch")
    if not os.path.exists(test_batch):
        load_cifar10(data_dir)  # finds, or downloads, and extracts the archive
    try:
        return read_cifar_batch(test_batch)[0]
    except Exception as e:
        raise ValueError(f"cannot read {test_batch}: {first_line(e)}") from None
