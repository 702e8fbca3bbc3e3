"""Where x0 is clipped under classifier guidance (Algorithm 2's eps shift), measured on the quick-start model
guided by the quick-start classifier: ours (shift the network's eps, then clip the x0 it implies) against
guided-diffusion's (clip the network's x0 first, shift the eps of the clipped x0, and do not clip again).
  python docs/measure/guidance_clip.py out-shapes out-clf        # docs/guidance.md's table
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
from checkpoint import build_diffusion, load_model  # noqa: E402
from ddpm import extract  # noqa: E402
from guidance import classifier_grad, classifier_guided_eps, model_fn  # noqa: E402
from imagefiles import to_uint8  # noqa: E402
from metrics import classify, shapes_distance  # noqa: E402
from samplers import sample_loop  # noqa: E402

torch.set_num_threads(2)
net, config, _, _ = load_model(sys.argv[1])
clf, _, _, _ = load_model(sys.argv[2])
d = build_diffusion(config)
fn = model_fn(net)
n = 128
y = torch.arange(4).repeat_interleave(n // 4)


def clipped_first(diffusion, model, cond_fn):
    """guided-diffusion's condition_score: eps from the clipped x0, shifted; the sampler must then not clip."""
    def f(x, t):
        x0 = diffusion.predict_start(x, t, model(x, t)).clamp(-1, 1)
        eps = diffusion.predict_noise_from_start(x, t, x0)
        return eps - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x) * cond_fn(x, t)
    return f


for sampler, steps in (("ddpm", 100), ("ddim", 50)):
    for s in (1.0, 3.0):
        cond = classifier_grad(clf, y, s)
        for name, model, clip in (("ours: shift, then clip", classifier_guided_eps(d, fn, cond), True),
                                  ("guided-diffusion: clip, shift, no clip", clipped_first(d, fn, cond), False)):
            t0 = time.time()
            x = sample_loop(d, model, (n, 3, 16, 16), sampler, steps, generator=torch.Generator().manual_seed(0),
                            clip_denoised=clip)
            u = to_uint8(x)
            acc = (classify(u) == y).float().mean().item()
            print(f"| {sampler} {steps} | s = {s} | {name} | {acc:.1%} | {shapes_distance(u):.1f} | {time.time() - t0:.0f} s |", flush=True)
