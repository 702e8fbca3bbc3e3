"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) with and without clipping each step's f to [-1, 1]
before noise is added back (the reference code's denoiser clips; the paper's Algorithm 1 does not say), on a
consistency student of the built-in shapes: quality (metrics.py) at 2, 3 and 4 steps, 256 samples, seed 0.
  python docs/measure/consistency_clip.py out-cd        # docs/distillation.md's table
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
from checkpoint import build_diffusion, load_model  # noqa: E402
from distill import consistency_sample  # noqa: E402
from guidance import model_fn  # noqa: E402
from imagefiles import to_uint8  # noqa: E402
from metrics import shapes_distance  # noqa: E402

torch.set_num_threads(2)
net, config, _, desc = load_model(sys.argv[1])
d, fn = build_diffusion(config), model_fn(net)
shape = (256, net.config["in_channels"], net.config["image_size"], net.config["image_size"])
print(f"{desc}\n| steps | f clipped between steps | quality |\n|---|---|---|")
for steps in (2, 3, 4):
    for clip in (False, True):
        x = consistency_sample(d, fn, shape, steps, generator=torch.Generator().manual_seed(0), clip_between=clip)
        print(f"| {steps} | {'yes' if clip else 'no'} | {shapes_distance(to_uint8(x)):.1f} |", flush=True)
