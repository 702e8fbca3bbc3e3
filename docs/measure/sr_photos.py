"""A super-resolution stage on held-out photographs (docs/measure/photo_patches.py): each 16x16 patch
area-downsampled to 8x8 (or, with DOWN=bicubic, resized by an antialiased bicubic filter, as another tool would) and
carried back up by the stage. Per sampler, CDM's stage and the projected one (cascade.project at every step):
- consistency: RMSE (levels of 255) of the output, area-downsampled, against its 8x8 input;
- detail: the energy of what the 8x8 image does not hold, x - up(down(x)), in the outputs over that of the true
  patches (1: as detailed as the truth; above 1: noise or invented detail; below: too smooth);
- the RMSE of the outputs to the true patches.
First the network's own consistency by t: x0_hat of x_t ~ q(x_t | truth), area-downsampled, against the input.
  python docs/measure/sr_photos.py SR_RUN HELD_OUT.npy ... -- SAMPLER:STEPS[:AUG] ...
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cascade import Stage, downsample, upsample, upsample_stage  # noqa: E402
from checkpoint import build_diffusion, load_model  # noqa: E402
from data import load_file  # noqa: E402
from imagefiles import from_uint8  # noqa: E402

torch.set_num_threads(2)
split = sys.argv.index("--")
net, config, _, desc = load_model(sys.argv[1])
diffusion = build_diffusion(config)
size, low = net.config["image_size"], net.config["low_res"]
print(f"{desc}; inputs by {os.environ.get('DOWN', 'area')} downsampling")
print("| held out | sampler | projected | consistency | detail | RMSE to the truth | time |\n|---|---|---|---|---|---|---|")
for path in sys.argv[2:split]:
    name = os.path.basename(path)
    truth = from_uint8(load_file(path)[0][:128])
    x_lr = downsample(truth, low)
    if os.environ.get("DOWN") == "bicubic":
        x_lr = F.interpolate(truth, size=(low, low), mode="bicubic", antialias=True).clamp(-1, 1)
    detail = lambda x: (x - upsample(downsample(x, low), size)).square().mean().item()
    by_t = []
    for t_ in (0, 100, 300, 500, 700, 900, 999):
        t = torch.full((len(truth),), t_)
        x_t = diffusion.q_sample(truth, t, torch.randn(truth.shape, generator=torch.Generator().manual_seed(t_)))
        with torch.no_grad():
            out = net(x_t, t, upsample(x_lr, size), torch.full_like(t, -1))
        x0 = diffusion.predict_start(x_t, t, out).clamp(-1, 1)
        by_t.append(f"t={t_}: {((downsample(x0, low) - x_lr) * 127.5).square().mean().sqrt().item():.1f}")
    print(f"| {name} | x0_hat of the true x_t, consistency by t | {' '.join(by_t)} | | | | |")
    for spec in sys.argv[split + 1:]:
        sampler, steps, *aug = spec.split(":")
        for project in (False, True):
            stage = Stage(net, diffusion, size, sampler, int(steps), cond_aug=int(aug[0]) if aug else -1,
                          project=project)
            t0 = time.time()
            with torch.no_grad():
                out = upsample_stage(stage, x_lr, torch.Generator().manual_seed(0))
            consistency = ((downsample(out, low) - x_lr) * 127.5).square().mean().sqrt().item()
            to_truth = ((out - truth) * 127.5).square().mean().sqrt().item()
            print(f"| {name} | {spec} | {'yes' if project else 'no'} | {consistency:.2f} | "
                  f"{detail(out) / detail(truth):.2f} | {to_truth:.2f} | {time.time() - t0:.0f} s |", flush=True)
