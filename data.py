"""
The data sets, as uint8 images (N, H, W, C) and int64 labels (N,) or None: CIFAR-10 (downloaded and unpickled
without numpy), the built-in shapes, a user's .npy/.npz/.pt file or folder of images; and inpainting masks.
Standard library and torch only: no numpy, no torchvision. The files themselves are imagefiles.py's.
"""
import codecs
import contextlib
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.request
import zipfile
import zlib

import torch

from imagefiles import first_line, read_image, read_npy, read_npz, read_png

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
# a folder of images, each read by imagefiles.read_image, cropped and resized to one size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


def load_edit_images(spec, mask_spec, image_size, channels, data_dir="./data"):
    """The images an edit starts from (sample.py --edit: a file or folder, read as load_data reads them), checked to
    be of the model's image_size (an int or [H, W]) and channels, and their masks (--mask: load_mask) or None, one
    for all the images or one each. -> (uint8 (N, H, W, C), float (M, 1, H, W) or None)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = load_data(spec, data_dir, image_size if h == w else (h, w))[0]
    if tuple(images.shape[1:]) != (h, w, channels):
        raise ValueError(f"--edit {spec}: images are {tuple(images.shape[1:])} (H,W,C), the model's {(h, w, channels)}")
    mask = load_mask(mask_spec, h, w) if mask_spec else None
    if mask is not None and len(mask) not in (1, len(images)):
        raise ValueError(f"--mask {mask_spec}: {len(mask)} masks for {len(images)} images (give one, or one each)")
    return images, mask


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
