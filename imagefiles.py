"""
Image files, read and written with the standard library and torch (no numpy, no Pillow for PNG): PNG grids and one
PNG per sample, any PNG read back, numpy's .npy and the .npz that FID tools read, each written atomically; and the
one layout they hold, uint8 (N, H, W, C), to and from the model's [-1, 1]. The data sets are data.py's.
"""
import ast
import contextlib
import ctypes
import io
import json
import math
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib

import torch


def first_line(e):
    """An exception as one short line (for the one-line error messages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__

# -----------------------------------------------------------------------------
# the layout, uint8 (N, H, W, C), and writing a file atomically

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

# -----------------------------------------------------------------------------
# PNG: grids and one file per sample, written; any PNG read

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

# -----------------------------------------------------------------------------
# numpy's .npy and .npz

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

# -----------------------------------------------------------------------------
# a long sampling run's batches, one .npz each

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
            arrays, lo = read_npz(npz)[0], 0
            images, labels = arrays["arr_0"], arrays.get("arr_1")
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
