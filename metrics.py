"""
A sample-quality number for the built-in shapes data, where no Inception network is at hand: the Frechet distance
between features of generated images and of held-out real ones (the formula of the FID, Heusel et al. 2017), the
features taken from a small classifier trained here on the shapes, which also says which class it sees. Lower is
better; two sets of real images score near 0. It ranks samplers and models on the built-in data; it is not the
FID, and its values are not comparable with FIDs.

Its features were learnt to tell the four shapes apart, so they are nearly blind to blur and noise that leave a
shape recognisable (docs/distillation.md shows it ranking fuzzy blobs above clean shapes). A second number, in
pixels, sees those: each sample's RMSE to its nearest held-out real shape, in levels of 255, beside the same
number for real shapes (its floor). It measures fidelity only: a model that draws one shape well scores well.
  python metrics.py samples.npz        # both numbers for sample.py --npz files (and the class accuracy)
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import load_file, make_shapes
from imagefiles import from_uint8
from runtime import USER_ERRORS, ArgumentParser, error_line

REFERENCE_SEED = 1    # the held-out images (train.py trains on seed 0)
CLASSIFIER_SEED = 2   # the classifier's own training images
FLOOR_SEED = 3        # real shapes measured as samples are: the floor of the nearest-real number


class ShapesClassifier(nn.Module):
    """Three 3x3 conv layers (ReLU, 2x2 average pooling between them), a global average, a linear layer to the
    4 classes. features() is the 128-d average, the representation the distance is measured in."""

    def __init__(self, channels, width=32, num_classes=4):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, 4 * width, 3, padding=1)])
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2)
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


_classifiers = {}


def shapes_classifier(image_size, channels, steps=600, batch_size=128, progress=None, captions=False):
    """The classifier for (image_size, channels) shapes, trained once per process (seconds on a CPU), on the CPU,
    deterministically and without touching the global random state. progress(step, steps, loss) every 100 steps.
    captions=True: of the captioned shapes, its 16 classes 4 colour + kind (data.CAPTIONS)."""
    key = (image_size, channels, captions)
    if key not in _classifiers:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(CLASSIFIER_SEED)
            images, labels = make_shapes(8192, image_size, channels, seed=CLASSIFIER_SEED, captions=captions)
            x = from_uint8(images)
            net = ShapesClassifier(channels, num_classes=16 if captions else 4)
            optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
            for step in range(steps):
                idx = torch.randint(0, len(x), (batch_size,))
                loss = F.cross_entropy(net(x[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if progress is not None and (step + 1) % 100 == 0:
                    progress(step + 1, steps, loss.item())
        _classifiers[key] = net.eval().requires_grad_(False)
    return _classifiers[key]


@torch.no_grad()
def features(images, batch_size=1024):
    """The classifier's features of uint8 (N, H, W, C) images."""
    net = shapes_classifier(images.shape[1], images.shape[3])
    return torch.cat([net.features(from_uint8(b)) for b in images.split(batch_size)])


@torch.no_grad()
def classify(images, batch_size=1024, captions=False):
    """The shape class (0 square, 1 disk, 2 triangle, 3 cross) the classifier sees in uint8 (N, H, W, C) images;
    captions=True: the captioned shapes' class, 4 colour + kind."""
    net = shapes_classifier(images.shape[1], images.shape[3], captions=captions)
    return torch.cat([net(from_uint8(b)).argmax(1) for b in images.split(batch_size)])


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to the rows of a and b, in
    float64; Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum().item() + (torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross).item()


def shapes_distance(images, n_reference=2000):
    """The quality number: the Frechet distance from uint8 (N, H, W, C) samples to n_reference held-out shapes of
    the same size and channels."""
    reference, _ = make_shapes(n_reference, images.shape[1], images.shape[3], seed=REFERENCE_SEED)
    return frechet_distance(features(images), features(reference))


@functools.lru_cache(maxsize=2)
def _real_rows(n, image_size, channels):
    return from_uint8(make_shapes(n, image_size, channels, seed=REFERENCE_SEED)[0]).flatten(1)


def nearest_real(images, n_reference=20000, chunk=256):
    """The mean over uint8 (N, H, W, C) samples of the RMSE, in levels of 255, to the nearest of n_reference
    held-out real shapes of the same size and channels (nearest_rmse)."""
    return nearest_rmse(images, _real_rows(n_reference, images.shape[1], images.shape[3]), chunk)


@torch.no_grad()
def nearest_rmse(images, reference, chunk=256):
    """The mean over uint8 (N, H, W, C) images of the RMSE, in levels of 255, to the nearest row of reference
    (images in [-1, 1], flattened as from_uint8(...).flatten(1) lays them out): nearest_rmses' mean."""
    return nearest_rmses(images, reference, chunk).mean().item()


@torch.no_grad()
def nearest_rmses(images, reference, chunk=256):
    """Each image's RMSE, in levels of 255, to its nearest row of reference. The nearest is found by torch.cdist
    (fast, float32 through a matrix product), its RMSE then computed directly, so an exact match scores exactly 0."""
    rmse = []
    for b in images.split(chunk):
        x = from_uint8(b).flatten(1)
        rmse.append((x - reference[torch.cdist(x, reference).argmin(1)]).square().mean(1).sqrt() * 127.5)
    return torch.cat(rmse)


def bootstrap(images, n_reference=2000, resamples=20, seed=0):
    """Both numbers with their spread over the samples: shapes_distance and nearest_real, then the standard deviation
    of each, recomputed on `resamples` draws of the samples with replacement (the features and each sample's
    nearest-real RMSE computed once, for the numbers and their draws). A resample repeats samples, which moves the
    quality number up a little; its spread is what a reader needs. -> (quality, its sd, nearest, its sd)."""
    reference, _ = make_shapes(n_reference, images.shape[1], images.shape[3], seed=REFERENCE_SEED)
    f, f_ref = features(images), features(reference)
    rmse = nearest_rmses(images, _real_rows(20000, images.shape[1], images.shape[3]))
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(images), (len(images),), generator=g) for _ in range(resamples)]
    quality = torch.tensor([frechet_distance(f[i], f_ref) for i in draws])
    nearest = torch.stack([rmse[i].mean() for i in draws])
    return frechet_distance(f, f_ref), quality.std().item(), rmse.mean().item(), nearest.std().item()


def main(argv=None):
    """python metrics.py SAMPLES.npz [...]: the two numbers of each file of shapes samples (sample.py --npz), and,
    where the file holds labels (class-conditional or guided sampling), how often the classifier sees the
    asked-for class."""
    p = ArgumentParser(description="The shapes quality number (lower is better) and the RMSE to the nearest real "
                                   "shape of sample.py --npz files.")
    p.add_argument("npz", nargs="+", help=".npz files of uint8 shapes samples (arr_0), labels in arr_1 if any")
    p.add_argument("--reference", type=int, default=2000, help="held-out real images the quality number compares "
                                                               "with (the nearest real shape: among 20000)")
    args = p.parse_args(argv)
    try:
        report(args)
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


def report(args):
    print("the shapes quality number: a Frechet distance in the features of a small classifier of the built-in shapes "
          "(lower is better; two sets of real shapes score about 1), nearly blind to noise and blur that leave a shape "
          "recognisable; then each sample's RMSE to its nearest real shape, which sees them (and not diversity). Both "
          "are defined for the built-in shapes only: not the FID, and other images get numbers that mean nothing",
          flush=True)
    for path in args.npz:
        images, labels = load_file(path)
        size = "x".join(map(str, images.shape[1:]))
        shapes_classifier(images.shape[1], images.shape[3], progress=lambda k, n, loss: print(
            f"  training the feature classifier for {size} shapes: step {k}/{n} | loss {loss:.3f}", flush=True))
        real, _ = make_shapes(len(images), images.shape[1], images.shape[3], seed=FLOOR_SEED)
        quality, q_sd, nearest, n_sd = bootstrap(images, args.reference)
        line = (f"{path}: {len(images)} samples | quality {quality:.2f} ± {q_sd:.2f} | "
                f"nearest real shape {nearest:.1f} ± {n_sd:.1f} levels of 255 (real shapes "
                f"{nearest_real(real):.1f}; ± a bootstrap's sd over the samples)")
        if labels is not None:
            line += f" | asked-for class seen {(classify(images) == labels).float().mean().item():.1%}"
        print(line)


if __name__ == "__main__":
    main()
