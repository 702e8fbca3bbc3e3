"""
Sample quality against network evaluations (NFE), for every sampler, on one checkpoint and its distilled students:
from the same x_T, each sampler's distance to the T-step ODE solution (RMSE in pixel levels, 0..255), the quality
number of metrics.py (built-in shapes models), its ratio to Algorithm 2's over all T steps (the reference), the
RMSE to the nearest real shape (metrics.py's second number, which sees the noise and blur the first misses), and
img/s. A progressive student runs at its own steps, a consistency student at each NFE up to 8 (Algorithm 1's
multistep sampling). --compare adds diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M, its defaults) driving
the same network, what a user would otherwise pick.
  python bench_samplers.py out-shapes --students out-pd,out-cd --csv samplers.csv   # docs/distillation.md's table
"""
import argparse
import csv
import time

import torch

from checkpoint import build_diffusion, load_model
from distill import consistency_sample
from guidance import model_fn
from imagefiles import to_uint8
from runtime import USER_ERRORS, ArgumentParser, error_line, resolve_device
from samplers import SPACINGS, ddim_sample_loop, sample_loop
from unet import image_hw

# (label, sampler, eta): the rows of the table
SAMPLERS = [("ddpm (ancestral)", "ddpm", None), ("ddim", "ddim", 0.0), ("dpm++ (2M)", "dpm++", 0.0)]
CONSISTENCY_NFE = 8  # a consistency student's multistep sampling is measured up to this many steps


def get_parser():
    p = ArgumentParser(description="Quality against network evaluations for each sampler.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder")
    a("--n", type=int, default=256, help="samples per sampler and NFE (one batch)")
    a("--nfe", default="1,2,4,8,16,32,64,100,1000", help="network evaluations to measure, comma-separated")
    a("--students", default="", help="checkpoints distilled from this one (train.py --distill), comma-separated")
    a("--spacing", default="trailing", choices=SPACINGS, help="timesteps the samplers visit")
    a("--seed", type=int, default=0, help="seed of x_T and of the samplers' noise")
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--compare", action="store_true", help="also diffusers' DPM-Solver++ 2M (pip install -r requirements-dev.txt)")
    a("--csv", default="", help="also write the rows to this CSV file (figures.py draws it)")
    return p


def diffusers_dpm_solver(diffusion, fn, x_T, steps, threshold=False):
    """diffusers' DPMSolverMultistepScheduler with its defaults (DPM-Solver++ 2M, linspace timesteps, lower-order
    final steps, no thresholding), or with thresholding=True and sample_max_value=1 (dynamic thresholding capped at
    1, i.e. x0_hat clipped to [-1, 1] as ours), on the same schedule, driving the same network from the same x_T."""
    from diffusers import DPMSolverMultistepScheduler
    betas = diffusion.betas.double().cpu()
    sched = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                                        thresholding=threshold, sample_max_value=1.0)
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps.tolist():
        x = sched.step(fn(x, torch.full((len(x),), t, device=x.device, dtype=torch.long)), t, x).prev_sample
    return x


def bench(args):
    device = resolve_device(args.device)
    nfes = [int(v) for v in args.nfe.split(",")]
    net, diffusion_config, meta, desc = load_model(args.ckpt)
    if meta["kind"] != "diffusion" or meta["first_stage"]:
        raise ValueError(f"{args.ckpt}: bench_samplers.py measures a diffusion model on pixels (its students with "
                         f"--students); this is a {'latent ' if meta['first_stage'] else ''}{meta['kind']} model")
    net.to(device)
    diffusion = build_diffusion(diffusion_config).to(device)
    T, c, (h, w) = diffusion.num_timesteps, net.config["in_channels"], image_hw(net.config["image_size"])
    if max(nfes) > T or min(nfes) < 1:
        raise ValueError(f"--nfe values must be in 1..{T}")
    shapes = meta["args"].get("data") == "shapes" and not net.config.get("num_classes")
    if shapes:
        from metrics import nearest_real, shapes_distance
        if args.n < 256:  # the distance's covariances are 128 x 128
            print(f"note: the quality number is unreliable from {args.n} samples (it estimates 128 x 128 covariances; "
                  f"use --n 256 or more); the two RMSE columns are not")
    fn = model_fn(net)
    x_T = torch.randn(args.n, c, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device)
    print(f"{desc}: {args.n} samples {h}x{w}x{c} per row, {args.spacing} spacing, {device}")

    def timed(draw):
        t0 = time.perf_counter()
        with torch.no_grad():
            x = draw()
        return x, args.n / (time.perf_counter() - t0)

    ode, ode_speed = timed(lambda: ddim_sample_loop(diffusion, fn, x_T.shape, T, noise=x_T.clone()))
    rows = []

    def row(name, nfe, x, speed):
        quality = nearest = float("nan")
        if shapes:
            images = to_uint8(x)
            quality, nearest = shapes_distance(images), nearest_real(images)
        reference = rows[0]["quality"] if rows else quality  # rows[0]: Algorithm 2 over all T steps
        r = dict(sampler=name, nfe=nfe, img_per_s=speed, rmse=((x - ode) * 127.5).square().mean().sqrt().item(),
                 quality=quality, ratio=quality / reference, nearest=nearest)
        rows.append(r)
        print(f"| {name} | {nfe} | {r['rmse']:.2f} | {quality:.2f} | {r['ratio']:.2f} | {nearest:.1f} | {speed:.1f} |",
              flush=True)

    print("| sampler | NFE | RMSE to the T-step ODE (0..255) | quality (lower is better) | x Algorithm 2's | nearest real "
          "shape (0..255) | img/s |\n|---|---|---|---|---|---|---|")
    gen = lambda: torch.Generator(device).manual_seed(args.seed + 1)
    row("Algorithm 2, all T steps (the quality reference)", T,
        *timed(lambda: diffusion.p_sample_loop(fn, x_T.shape, noise=x_T.clone(), generator=gen())))
    row("ddim, all T steps (the ODE reference)", T, ode, ode_speed)
    for nfe in nfes:
        for label, sampler, eta in SAMPLERS:
            if nfe == T and sampler != "dpm++":
                continue  # the two references above
            row(label, nfe, *timed(lambda: sample_loop(diffusion, fn, x_T.shape, sampler, nfe, eta, args.spacing,
                                                       noise=x_T.clone(), generator=gen())))
        if args.compare:
            row("diffusers DPM-Solver++ 2M (defaults)", nfe, *timed(lambda: diffusers_dpm_solver(diffusion, fn, x_T, nfe)))
            row("diffusers DPM-Solver++ 2M (thresholding, max 1)", nfe,
                *timed(lambda: diffusers_dpm_solver(diffusion, fn, x_T, nfe, threshold=True)))
    for path in filter(None, args.students.split(",")):
        student, student_config, student_meta, _ = load_model(path)
        own = student_meta.get("sampling")
        if not own or student_meta["first_stage"]:
            raise ValueError(f"{path}: not a distilled student on pixels (train.py --distill writes one)")
        if (student.config["in_channels"], image_hw(student.config["image_size"])) != (c, (h, w)):
            raise ValueError(f"{path}: its images are not {h}x{w}x{c} like {args.ckpt}'s")
        student_diffusion, student_fn = build_diffusion(student_config).to(device), model_fn(student.to(device))
        if own["sampler"] == "consistency":
            for nfe in [n for n in nfes if n <= CONSISTENCY_NFE]:
                row(f"consistency student ({path})", nfe, *timed(lambda: consistency_sample(
                    student_diffusion, student_fn, x_T.shape, nfe, noise=x_T.clone(), generator=gen())))
        else:
            row(f"progressive student ({path})", own["steps"], *timed(lambda: sample_loop(
                student_diffusion, student_fn, x_T.shape, own["sampler"], own["steps"], 0.0, noise=x_T.clone())))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")


def main(argv=None):
    try:
        bench(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
