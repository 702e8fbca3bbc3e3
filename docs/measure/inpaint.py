"""Inpainting and SDEdit on 256 held-out shapes with the quick-start model: the completions' quality
(metrics.py), how often the shapes classifier sees the original's class in the completion (the filled half continues
the known one), and the RMSE of the filled region from the original (0..255).
  python docs/measure/inpaint.py out-shapes        # docs/sampling.md's table
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
from checkpoint import build_diffusion, load_model  # noqa: E402
from data import load_mask, make_shapes  # noqa: E402
from editing import edit_loop, edit_start  # noqa: E402
from guidance import model_fn  # noqa: E402
from imagefiles import from_uint8, to_uint8  # noqa: E402
from metrics import classify, shapes_distance  # noqa: E402

torch.set_num_threads(2)
net, config, _, _ = load_model(sys.argv[1])
d, fn = build_diffusion(config), model_fn(net)
images, labels = make_shapes(256, 16, 3, seed=1)
x0 = from_uint8(images)
print("| what | mask | sampler | quality | class kept | RMSE in the hole | time |\n|---|---|---|---|---|---|---|")
print(f"| the originals | | | {shapes_distance(images):.1f} | {(classify(images) == labels).float().mean():.1%} | 0 | |")
for mask_name in ("left-half", "centre-square"):
    mask = load_mask(mask_name, 16, 16)
    hole = (1 - mask).expand_as(x0).bool()
    for label, steps, resample, jump in (("ancestral 100 steps", 100, 1, 1), ("ancestral 100 steps, RePaint r=5 j=5", 100, 5, 5),
                                         ("Algorithm 2, 1000 steps", None, 1, 1)):
        t0 = time.time()
        x = edit_loop(d, fn, x0, mask, steps=steps, resample=resample, jump=jump, generator=torch.Generator().manual_seed(0))
        u = to_uint8(x)
        rmse = ((x - x0)[hole] * 127.5).square().mean().sqrt().item()
        print(f"| inpainting | {mask_name} | {label} | {shapes_distance(u):.1f} | {(classify(u) == labels).float().mean():.1%} | {rmse:.1f} | {time.time() - t0:.0f} s |", flush=True)
for S in (0.25, 0.5, 0.75, 1.0):
    t0 = time.time()
    start = edit_start(1000, S)
    x = edit_loop(d, fn, x0, None, start, round(100 * (start + 1) / 1000), generator=torch.Generator().manual_seed(0))
    u = to_uint8(x)
    rmse = ((x - x0) * 127.5).square().mean().sqrt().item()
    print(f"| SDEdit strength {S} | | ancestral, {round(100 * (start + 1) / 1000)} of 100 steps | {shapes_distance(u):.1f} | {(classify(u) == labels).float().mean():.1%} | {rmse:.1f} (whole image) | {time.time() - t0:.0f} s |", flush=True)
