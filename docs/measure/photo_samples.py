"""Samples of a model trained on photographs' patches (docs/measure/photo_patches.py), which metrics.py (made for
the shapes) cannot score. Each number is given for the samples and for fresh real patches of the same photographs,
as many as the samples (val32.npy: the reference, what real patches score; blur lowers the nearest-patch RMSE, and
the Frechet distance of a few hundred images is noisy, so reconstructions can score below it):
- layout: the Frechet distance between Gaussians fitted to the images area-downsampled to 8x8 (192 numbers in
  [-1, 1]) and to the same of the training patches: colours and coarse layout, and their diversity;
- nearest: each image's RMSE (levels of 255) to its nearest training patch: fidelity at full resolution (a model
  that copies its training patches goes far below the reference);
- detail: the energy of what 16x16 cannot hold, x - up(down(x)), over that of the fresh patches (1: as detailed;
  above: noise; below: blur);
- colour: the mean and standard deviation of each channel, levels of 255.
  python docs/measure/photo_samples.py TRAIN32.npy VAL32.npy SAMPLES.npz [...]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from data import load_file  # noqa: E402
from imagefiles import from_uint8  # noqa: E402
from metrics import frechet_distance, nearest_rmse  # noqa: E402

torch.set_num_threads(2)
train = from_uint8(load_file(sys.argv[1])[0])
val_images = load_file(sys.argv[2])[0]
val = from_uint8(val_images)
train_rows, train_layout = train.flatten(1), F.avg_pool2d(train, 4).flatten(1)
down_up = lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
detail = lambda x: (x - down_up(x)).square().mean().item()


def line(name, images, reference):
    x = from_uint8(images)
    colour = " ".join(f"{m:.0f}+-{s:.0f}" for m, s in zip(((x.mean((0, 2, 3)) + 1) * 127.5).tolist(),
                                                            (x.std((0, 2, 3)) * 127.5).tolist()))
    print(f"| {name} | {len(x)} | {frechet_distance(F.avg_pool2d(x, 4).flatten(1), train_layout):.2f} | "
          f"{nearest_rmse(images, train_rows):.2f} | {detail(x) / detail(reference):.2f} | {colour} |", flush=True)


print("| images | n | layout (FD at 8x8) | nearest training patch | detail | colour (R G B) |\n|---|---|---|---|---|---|")
for path in sys.argv[3:]:
    images = load_file(path)[0]
    reference = val[:len(images)]
    if path == sys.argv[3]:
        line(f"fresh patches of the training photographs ({os.path.basename(sys.argv[2])}, the reference)",
             val_images[:len(images)], reference)
    line(os.path.basename(path), images, reference)
