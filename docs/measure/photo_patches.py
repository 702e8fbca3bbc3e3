"""Patches of photographs the project never trains on by default: scikit-image's bundled samples (read here with
scikit-image, an extra for this measurement only, never by the project). A training set from four photographs
(astronaut, coffee, rocket, Hubble deep field) at three scales (area-downsampled by 1, 2 and 4), and held-out sets
from two others (a cat, a stained tissue slide), and fresh 32x32 patches of the training photographs (val32.npy, the
reference of docs/measure/photo_samples.py), as uint8 N,H,W,C .npy files that train.py --data takes.
  python docs/measure/photo_patches.py OUT_DIR
"""
import os
import sys

import numpy as np
import skimage.data as d
import torch
import torch.nn.functional as F


def scales(img):
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for k in (1, 2, 4):
        yield (F.avg_pool2d(x, k) if k > 1 else x)[0].permute(1, 2, 0)


def patches(imgs, n, seed, size):
    g = np.random.default_rng(seed)
    pyramid = [s for im in imgs for s in scales(im)]
    out = []
    for _ in range(n):
        p = pyramid[g.integers(len(pyramid))]
        h, w = p.shape[:2]
        y, x = g.integers(h - size + 1), g.integers(w - size + 1)
        out.append(p[y:y + size, x:x + size])
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8).numpy()


out = sys.argv[1]
train = [d.astronaut(), d.coffee(), d.rocket(), d.hubble_deep_field()]
np.save(os.path.join(out, "train16.npy"), patches(train, 20000, 0, 16))
np.save(os.path.join(out, "heldout_chelsea16.npy"), patches([d.chelsea()], 512, 1, 16))
np.save(os.path.join(out, "heldout_ihc16.npy"), patches([d.immunohistochemistry()], 512, 2, 16))
np.save(os.path.join(out, "train32.npy"), patches(train, 20000, 3, 32))
np.save(os.path.join(out, "heldout32.npy"), patches([d.chelsea(), d.immunohistochemistry()], 512, 4, 32))
np.save(os.path.join(out, "val32.npy"), patches(train, 512, 5, 32))
