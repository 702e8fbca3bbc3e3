"""Tests of data.py and imagefiles.py, images in and out: PNG grids written and PNG files of every colour type, bit
depth and filter read with the standard library, folders and .npy/.npz/.pt files as training data (one layout out:
uint8 N,H,W,C), the built-in shapes, the CIFAR-10 batches without numpy, the .npz that FID tools read, and bad files
as one clear error each."""
import contextlib
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import zlib

import pytest
import torch

import data
import imagefiles
from conftest import decode_png, py2_cifar_batch
from ddpm import GaussianDiffusion


def test_save_grid_png_roundtrip(tmp_path):
    """save_grid writes a valid PNG whose pixels are to_uint8 of the images, in grid order, grey and RGB."""
    for c in (1, 3):
        x = torch.rand(5, c, 6, 6) * 2 - 1
        imagefiles.save_grid(tmp_path / f"g{c}.png", x, nrow=3, pad=2)
        img = decode_png(tmp_path / f"g{c}.png")
        assert img.shape == (2 + 2 * 8, 2 + 3 * 8, c)
        u = imagefiles.to_uint8(x)
        assert torch.equal(img[2:8, 2:8], u[0]) and torch.equal(img[10:16, 10:16], u[4])  # index 4: row 1, column 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_to_uint8_inverts_data_scaling():
    """to_uint8(x / 127.5 - 1) == x for every byte value."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(imagefiles.to_uint8(x.float() / 127.5 - 1), x.permute(0, 2, 3, 1))


def encode_png(path, samples, colour, filters, depth=8, palette=None, trns=None):
    """A PNG encoder written from the spec, for the tests: samples uint8 (H, W, C) as the colour type stores them
    (grey, RGB, palette index, grey + alpha, RGBA), row y filtered with filters[y % len(filters)] (0 None, 1 Sub,
    2 Up, 3 Average, 4 Paeth), bit depth 1-16 (16: each sample's byte written twice), IDAT split in two."""
    h, w, c = samples.shape
    rows = []
    for y in range(h):
        vals = samples[y].flatten().tolist()
        if depth == 16:
            line = bytes(v for s in vals for v in (s, s))
        elif depth < 8:
            per = 8 // depth
            vals += [0] * (-len(vals) % per)
            line = bytes(sum(v << (8 - depth * (k + 1)) for k, v in enumerate(vals[i:i + per]))
                         for i in range(0, len(vals), per))
        else:
            line = bytes(vals)
        rows.append(line)
    bpp = max(1, c * depth // 8)
    out, prev = b"", bytes(len(rows[0]))
    for y, line in enumerate(rows):
        f = filters[y % len(filters)]
        enc = bytearray()
        for i, x in enumerate(line):
            a, b, cc = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            p = a + b - cc
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - cc) else b if abs(p - b) <= abs(p - cc) else cc
            enc.append((x - [0, a, b, (a + b) // 2, paeth][f]) % 256)
        out += bytes([f]) + enc
        prev = line
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    z = zlib.compress(out)
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
    if palette is not None:
        body += chunk(b"PLTE", bytes(palette.flatten().tolist()))
    if trns is not None:
        body += chunk(b"tRNS", bytes(trns))
    body += chunk(b"IDAT", z[:len(z) // 2]) + chunk(b"IDAT", z[len(z) // 2:]) + chunk(b"IEND", b"")
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + body)


def test_png_folder_loads_as_the_same_tensor_as_the_npz(tmp_path):
    """--data FOLDER: PNG files written with every filter type (rows cycling None, Sub, Up, Average, Paeth) in
    RGB, and in grey, read with the standard library to the same uint8 tensor as the .npz of the same images
    (the file order sorted, no resize where they already have --image-size); class subfolders give labels."""
    np = pytest.importorskip("numpy")
    images, labels = data.make_shapes(6, 16, 3, seed=4)
    for k in range(6):
        os.makedirs(tmp_path / "rgb" / f"class{labels[k]}", exist_ok=True)
        encode_png(tmp_path / "rgb" / f"class{labels[k]}" / f"{k}.png", images[k], 2, [k % 5, 4, 3, 2, 1, 0])
    np.savez(tmp_path / "rgb.npz", images.numpy())
    got, got_labels, names = data.load_data(str(tmp_path / "rgb"), "", 16)
    order = sorted(range(6), key=lambda k: (f"class{labels[k]}", f"{k}.png"))
    want, _, _ = data.load_data(str(tmp_path / "rgb.npz"), "", 16)
    assert torch.equal(got, want[order]) and got.dtype == torch.uint8
    assert names == sorted({f"class{v}" for v in labels.tolist()})
    assert [names[v] for v in got_labels.tolist()] == [f"class{labels[k]}" for k in order]
    grey = images[..., :1]
    os.makedirs(tmp_path / "grey")
    for k in range(6):
        encode_png(tmp_path / "grey" / f"{k}.png", grey[k], 0, [0, 1, 2, 3, 4])
    got, got_labels, _ = data.load_data(str(tmp_path / "grey"), "", 16)
    assert got_labels is None and torch.equal(got, grey)


def test_png_colour_types_depths_and_transparency(tmp_path):
    """The decoder against the spec: palette (8-bit and 4-bit indices), 16-bit grey (its high byte), 1-bit grey
    (0 and 255), RGBA and grey + alpha composited over white, a palette with tRNS transparency."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=g)
    palette = torch.randint(0, 256, (16, 3), dtype=torch.uint8, generator=g)
    index = torch.randint(0, 16, (5, 7, 1), dtype=torch.uint8, generator=g)
    for depth in (8, 4):
        encode_png(tmp_path / "p.png", index, 3, [0, 1, 2, 3, 4], depth, palette)
        assert torch.equal(imagefiles.read_png(tmp_path / "p.png"), palette[index[..., 0].long()])
    grey = torch.randint(0, 256, (5, 7, 1), dtype=torch.uint8, generator=g)
    encode_png(tmp_path / "g16.png", grey, 0, [4, 3], 16)
    assert torch.equal(imagefiles.read_png(tmp_path / "g16.png"), grey)
    bits = torch.randint(0, 2, (5, 7, 1), dtype=torch.uint8, generator=g)
    encode_png(tmp_path / "g1.png", bits, 0, [0, 2], 1)
    assert torch.equal(imagefiles.read_png(tmp_path / "g1.png"), bits * 255)
    alpha = torch.randint(0, 256, (5, 7, 1), dtype=torch.uint8, generator=g)
    over_white = lambda x, a: (x.float() * a.float() / 255 + 255 * (1 - a.float() / 255)).round().to(torch.uint8)
    encode_png(tmp_path / "rgba.png", torch.cat([rgb, alpha], 2), 6, [1, 4])
    assert torch.equal(imagefiles.read_png(tmp_path / "rgba.png"), over_white(rgb, alpha))
    encode_png(tmp_path / "ga.png", torch.cat([grey, alpha], 2), 4, [3, 2])
    assert torch.equal(imagefiles.read_png(tmp_path / "ga.png"), over_white(grey, alpha))
    trns = [0] * 16
    encode_png(tmp_path / "pt.png", index, 3, [0], 8, palette, trns)  # every entry fully transparent
    assert (imagefiles.read_png(tmp_path / "pt.png") == 255).all()


def test_folder_resize_crop_and_bad_files(tmp_path):
    """A folder's images are centre-cropped to a square and resized to --image-size (bicubic, antialiased): a
    40x24 image of a 24x24 square in the middle comes out as that square, resized; a corrupt PNG or a JPEG with no
    Pillow installed is one line naming the file; a folder with no images is one line."""
    img = torch.zeros(24, 40, 3, dtype=torch.uint8)
    img[:, 8:32] = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    os.makedirs(tmp_path / "imgs")
    encode_png(tmp_path / "imgs" / "a.png", img, 2, [1])
    got, _, _ = data.load_data(str(tmp_path / "imgs"), "", 12)
    square = img[:, 8:32].permute(2, 0, 1)[None].float()
    want = torch.nn.functional.interpolate(square, size=(12, 12), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    assert got.shape == (1, 12, 12, 3) and (got.float() - want.round().clamp(0, 255)).abs().max() <= 1
    blob = (tmp_path / "imgs" / "a.png").read_bytes()
    (tmp_path / "imgs" / "b.png").write_bytes(blob[: len(blob) - 20])
    with pytest.raises(ValueError, match=r"^cannot read .*b\.png"):
        data.load_data(str(tmp_path / "imgs"), "", 12)
    os.remove(tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "c.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    if importlib.util.find_spec("PIL") is None:
        with pytest.raises(ValueError, match=r"c\.jpg: reading \.jpg files needs Pillow \(pip install Pillow\)"):
            data.load_data(str(tmp_path / "imgs"), "", 12)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image files"):
        data.load_data(str(tmp_path / "empty"), "", 12)


def test_make_shapes_deterministic_and_learnable():
    """Same seed, same data; labels 0..3 balanced; a nearest-centroid classifier on the mean colour of the
    brightest pixels (a 'simple classifier') recognises the class of nearly every image."""
    x, y = data.make_shapes(800, 16, 3, seed=1)
    x2, y2 = data.make_shapes(800, 16, 3, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.uint8 and x.shape == (800, 16, 16, 3)
    assert set(y.tolist()) == {0, 1, 2, 3} and torch.bincount(y).min() > 150
    feats = x.float().flatten(1, 2).topk(20, dim=1).values.mean(1)  # per channel, brightest pixels
    centroids = torch.stack([feats[y == k].mean(0) for k in range(4)])
    pred = torch.cdist(feats, centroids).argmin(1)
    assert (pred == y).float().mean() > 0.95
    g, _ = data.make_shapes(10, 8, 1)
    assert g.shape == (10, 8, 8, 1)


def test_read_npy_matches_numpy(tmp_path):
    """The stdlib .npy reader gives numpy's array for the dtypes and layouts users save."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    for a in [rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), rng.integers(0, 9, (7,)).astype(np.int64),
              np.asfortranarray(rng.integers(0, 256, (2, 5, 5), dtype=np.uint8)),
              rng.random((2, 3)).astype(np.float32)]:
        np.save(tmp_path / "a.npy", a)
        with open(tmp_path / "a.npy", "rb") as f:
            assert torch.equal(imagefiles.read_npy(f), torch.from_numpy(np.ascontiguousarray(a)))


def test_cifar10_batches_parsed_without_numpy(tmp_path, monkeypatch):
    """CIFAR-10's pickled batches (numpy arrays inside dicts, as Python 2 wrote them) are read by the
    restricted unpickler to the exact bytes (numpy, if present, reads the same file to the same array);
    download (faked), MD5 check and extraction work; anything else in a pickle is refused; a wrong archive
    MD5 and an offline download each give one clear line."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = torch.randint(0, 256, (20, 3072), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for k in range(1, 6):
        (folder / f"data_batch_{k}").write_bytes(py2_cifar_batch(bytes(raw.flatten().tolist()), list(range(20))))
    images, labels = data.load_cifar10(str(tmp_path))
    assert images.shape == (100, 32, 32, 3) and labels.tolist()[:20] == list(range(20))
    chw = lambda x: x.permute(0, 3, 1, 2).reshape(len(x), 3072)  # the batches store R, G, B planes
    assert torch.equal(chw(images[:20]), raw) and torch.equal(images[20:40], images[:20])
    with contextlib.suppress(ImportError):
        import numpy as np
        with open(folder / "data_batch_1", "rb") as f:
            assert np.array_equal(pickle.load(f, encoding="bytes")[b"data"], raw.numpy())
        with open(folder / "data_batch_2", "wb") as f:  # a python 3 pickle of a numpy array reads the same
            pickle.dump({b"data": raw.numpy(), b"labels": list(range(20))}, f, protocol=2)
        assert torch.equal(chw(data.read_cifar_batch(folder / "data_batch_2")[0]), raw)
    with open(folder / "data_batch_1", "wb") as f:  # anything but arrays, lists and bytes is refused
        pickle.dump({b"data": GaussianDiffusion}, f)
    with pytest.raises(ValueError, match="cannot read the CIFAR-10 batches"):
        data.load_cifar10(str(tmp_path))
    empty = tmp_path / "other"
    empty.mkdir()
    (empty / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="MD5"):
        data.load_cifar10(str(empty))

    # the download path, offline: a fake server hands out a tar.gz of the batches; MD5 checked, then extracted
    (folder / "data_batch_1").write_bytes(py2_cifar_batch(bytes(raw.flatten().tolist()), list(range(20))))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive))
    images2, _ = data.load_cifar10(str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path / "fresh")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert images2.shape == (100, 32, 32, 3)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=r"fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand"):
        data.load_cifar10(str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "nothing" / "cifar-10-python.tar.gz.part")




def test_crops_keep_the_asked_aspect_ratio():
    """center_crop_resize to (height, width): the largest centred crop of that aspect ratio, resized; a file of
    H x W images is read when H, W are asked for, and refused as not square otherwise."""
    img = torch.arange(30 * 40 * 1, dtype=torch.float32).view(30, 40, 1).to(torch.uint8)
    assert data.center_crop_resize(img, (30, 20)).shape == (30, 20, 1)
    assert torch.equal(data.center_crop_resize(img, (30, 20)), img[:, 10:30])  # no resize: the crop itself
    assert torch.equal(data.center_crop_resize(img, (15, 40)), img[7:22])
    assert data.center_crop_resize(img, 12).shape == (12, 12, 1)
