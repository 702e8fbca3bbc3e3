"""Latent diffusion's first stage on held-out images: the reconstruction's PSNR (dB on [0, 255]; D of the posterior
mean, clamped to [-1, 1]) and the latents' statistics before and after the scale factor that the diffusion run
measures on its training images (runs.first_stage; Rombach et al. 2022, Sec. 4.3.2 and Appendix D.1).
  python docs/measure/autoencoder.py AE_RUN TRAIN HELD_OUT [REC.npz]   # TRAIN, HELD_OUT: "shapes" or .npy/.npz files
REC.npz: the first 256 reconstructions D(mean of q_E(z | x)), as sample.py --npz writes samples: `python metrics.py
REC.npz` is then what a latent model on this first stage approaches as it learns the latents (an optimistic
floor: its samples are decoded from draws of q_E, not from its mean), in the samples' units.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
from autoencoder import latent_scale  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data import load_file, make_shapes  # noqa: E402
from imagefiles import from_uint8, to_uint8, write_npz  # noqa: E402


def images(spec, n, size, channels, seed):
    return make_shapes(n or 10000, size, channels, seed=seed)[0] if spec == "shapes" else load_file(spec)[0][:n]


torch.set_num_threads(2)
ae, _, _, desc = load_model(sys.argv[1])
size, c = ae.config["image_size"], ae.config["in_channels"]
train = images(sys.argv[2], None, size, c, 0)
train = from_uint8(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1024]])  # as a run
held = from_uint8(images(sys.argv[3], 512, size, c, 1))
scale = latent_scale(ae, train, torch.Generator().manual_seed(0))
with torch.no_grad():
    q = ae.encode(held)
    z = q.sample(torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(1)))
    rec = ae.decode(q.mean).clamp(-1, 1)
mse = ((rec - held) ** 2).flatten(1).mean(1)
psnr = 10 * torch.log10(4 / mse)
print(f"{desc}: latent {tuple(z.shape[1:])} for images {size}x{size}x{c}")
print(f"held-out PSNR {psnr.mean():.2f} dB (per-image mean; median {psnr.median():.2f}, worst {psnr.min():.2f}) "
      f"on {len(held)} images; of the mean squared error {10 * torch.log10(4 / mse.mean()):.2f} dB")
print(f"scale factor (1 / std of z on {len(train)} training images): {scale:.4f}")
for name, v in (("before", z), ("after", z * scale)):
    per = v.transpose(0, 1).flatten(1)
    print(f"latents {name} scaling: mean {v.mean():+.4f} std {v.std():.4f}; per channel std "
          + " ".join(f"{s:.3f}" for s in per.std(1).tolist()))
if len(sys.argv) > 4:
    write_npz(sys.argv[4], {"arr_0": to_uint8(rec[:256])})
    print(f"wrote {sys.argv[4]}: the first 256 reconstructions")
