"""
Sample quality against network evaluations (NFE), for every sampler, on one checkpoint and its distilled students,
each row over several seeds (a quality number from a few hundred samples moves by a third between seeds): the
quality number of metrics.py (built-in shapes models) as the mean and standard deviation over the seeds, its ratio
to Algorithm 2's over all T steps (the reference; per seed, then the mean and spread), the RMSE to the nearest real
shape (metrics.py's second number, which sees the noise and blur the first misses), and img/s. With --rmse, also each
sampler's distance to the T-step ODE solution from the same x_T (RMSE in pixel levels, 0..255). A progressive student
runs at its own steps, a consistency student at each NFE up to 8 (Algorithm 1's multistep sampling). --compare adds
diffusers' schedulers that people pick instead (DDIM, DPM-Solver++ 2M as ODE and SDE, Euler ancestral, UniPC), each
with its defaults and the model's own betas, driving the same network from the same x_T.
  python bench_samplers.py out-shapes --n 512 --seeds 0,1,2 --nfe 5,10,20,50,100 --compare --csv nfe.csv
"""
import argparse
import csv
import importlib.util
import inspect
import math
import time

import torch

from checkpoint import build_diffusion, load_model
from distill import consistency_sample
from guidance import model_fn
from imagefiles import to_uint8
from pretrained import DIFFUSERS_PREDICTIONS
from runtime import USER_ERRORS, ArgumentParser, error_line, resolve_device
from samplers import SPACINGS, ddim_sample_loop, restart_min_steps, sample_loop
from unet import image_hw

# (label, sampler, eta): our rows
SAMPLERS = [("ddpm (ancestral)", "ddpm", None), ("ddim", "ddim", 0.0), ("dpm++ (2M)", "dpm++", 0.0),
            ("dpm++ (2M SDE)", "dpm++", 1.0), ("restart", "restart", None)]
# (label, diffusers scheduler, its settings beyond the defaults): --compare's rows
DIFFUSERS = [("diffusers DDIM", "DDIMScheduler", {}),
             ("diffusers DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {}),
             ("diffusers DPM-Solver++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
             ("diffusers Euler ancestral", "EulerAncestralDiscreteScheduler", {}),
             ("diffusers UniPC", "UniPCMultistepScheduler", {})]
CONSISTENCY_NFE = 8  # a consistency student's multistep sampling is measured up to this many steps


def get_parser():
    p = ArgumentParser(description="Quality against network evaluations for each sampler.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder")
    a("--n", type=int, default=512, help="samples per sampler, NFE and seed (one batch)")
    a("--seeds", default="0,1,2", help="seeds of x_T and of the samplers' noise, comma-separated: each row's spread")
    a("--nfe", default="5,10,20,50,100", help="network evaluations to measure, comma-separated")
    a("--students", default="", help="checkpoints distilled from this one (train.py --distill), comma-separated")
    a("--spacing", default="trailing", choices=SPACINGS, help="timesteps our samplers visit")
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--compare", action="store_true", help="also diffusers' schedulers (pip install -r requirements-dev.txt)")
    a("--rmse", action="store_true", help="also the RMSE to the T-step ODE solution (T more network calls a seed)")
    a("--csv", default="", help="also write the rows to this CSV file (figures.py --nfe draws it)")
    return p


def diffusers_sampler(scheduler, settings, diffusion, fn, x_T, steps, seed):
    """A diffusers scheduler by name, with its defaults but the model's betas, T and prediction, driving fn from x_T over
    `steps` network calls; its noise (the stochastic ones) from a generator seeded with seed. Its timesteps may be
    fractional (Euler's interpolate between the model's): the network is called at them, as diffusers calls it."""
    import diffusers
    betas = diffusion.betas.double().cpu()
    sched = getattr(diffusers, scheduler)(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                                          prediction_type=DIFFUSERS_PREDICTIONS[diffusion.mean_type], **settings)
    sched.set_timesteps(steps)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    g = torch.Generator(x_T.device).manual_seed(seed)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = fn(sched.scale_model_input(x, t), torch.full((len(x),), t.item(), device=x.device))
        x = sched.step(eps, t, x, **({"generator": g} if takes_generator else {})).prev_sample
    return x


def spread(values):
    """(mean, standard deviation over the seeds; 0 for one seed)."""
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def load_student(path, teacher, chw, device):
    """(path, its own sampling, its diffusion, its model function) of a student distilled from teacher."""
    student, student_config, student_meta, _ = load_model(path)
    own = student_meta.get("sampling")
    if not own or student_meta["first_stage"]:
        raise ValueError(f"{path}: not a distilled student on pixels (train.py --distill writes one)")
    if (student.config["in_channels"], *image_hw(student.config["image_size"])) != chw:
        raise ValueError(f"{path}: its images are not {chw[1]}x{chw[2]}x{chw[0]} like {teacher}'s")
    return path, own, build_diffusion(student_config).to(device), model_fn(student.to(device))


def draws(args, nfes, diffusion, fn, students, seed):
    """(label, NFE, a function drawing the samples from x_T with noise seeded by seed + 1) for every row: Algorithm 2's
    reference first, then each NFE's samplers, ours and (--compare) diffusers', then the students."""
    T, device = diffusion.num_timesteps, diffusion.betas.device
    gen = lambda: torch.Generator(device).manual_seed(seed + 1)
    yield "Algorithm 2, all T steps (the quality reference)", T, lambda x_T: diffusion.p_sample_loop(
        fn, x_T.shape, noise=x_T, generator=gen())
    if args.rmse:
        yield "ddim, all T steps (the ODE reference)", T, lambda x_T: ddim_sample_loop(diffusion, fn, x_T.shape, T,
                                                                                      noise=x_T)
    for nfe in nfes:
        for label, sampler, eta in SAMPLERS:
            if (nfe == T and sampler in ("ddpm", "ddim")) or (sampler == "restart" and nfe < restart_min_steps()):
                continue  # the references above; restart needs two main steps beside its own
            yield label, nfe, lambda x_T, s=sampler, e=eta, k=nfe: sample_loop(
                diffusion, fn, x_T.shape, s, k, e, args.spacing, noise=x_T, generator=gen())
        for label, scheduler, settings in (DIFFUSERS if args.compare else []):
            yield label, nfe, lambda x_T, s=scheduler, kw=settings, k=nfe: diffusers_sampler(
                s, kw, diffusion, fn, x_T, k, seed + 1)
    for path, own, student_diffusion, student_fn in students:
        if own["sampler"] == "consistency":
            for nfe in [n for n in nfes if n <= CONSISTENCY_NFE]:
                yield f"consistency student ({path})", nfe, lambda x_T, k=nfe: consistency_sample(
                    student_diffusion, student_fn, x_T.shape, k, noise=x_T, generator=gen())
        else:
            yield f"progressive student ({path})", own["steps"], lambda x_T, o=own: sample_loop(
                student_diffusion, student_fn, x_T.shape, o["sampler"], o["steps"], 0.0, noise=x_T)


def bench(args):
    device = resolve_device(args.device)
    nfes, seeds = [int(v) for v in args.nfe.split(",")], [int(v) for v in args.seeds.split(",")]
    net, diffusion_config, meta, desc = load_model(args.ckpt)
    if meta["kind"] != "diffusion" or meta["first_stage"]:
        raise ValueError(f"{args.ckpt}: bench_samplers.py measures a diffusion model on pixels (its students with "
                         f"--students); this is a {'latent ' if meta['first_stage'] else ''}{meta['kind']} model")
    net.to(device)
    diffusion = build_diffusion(diffusion_config).to(device)
    T, c, (h, w) = diffusion.num_timesteps, net.config["in_channels"], image_hw(net.config["image_size"])
    if max(nfes) > T or min(nfes) < 1:
        raise ValueError(f"--nfe values must be in 1..{T}")
    if args.compare and importlib.util.find_spec("diffusers") is None:  # before any sampling, not an hour into it
        raise ValueError("--compare needs diffusers: pip install -r requirements-dev.txt")
    shapes = meta["args"].get("data") == "shapes" and not net.config.get("num_classes")
    if shapes:
        from metrics import nearest_real, shapes_distance
        if args.n < 256:  # the distance's covariances are 128 x 128
            print(f"note: the quality number is unreliable from {args.n} samples (it estimates 128 x 128 covariances; "
                  f"use --n 256 or more); the nearest real shape is not")
    fn = model_fn(net)
    students = [load_student(path, args.ckpt, (c, h, w), device) for path in filter(None, args.students.split(","))]
    print(f"{desc}: {args.n} samples {h}x{w}x{c} per row and seed, seeds {args.seeds}, {args.spacing} spacing, "
          f"{device}")

    results = {}  # (label, nfe) -> {quality, ratio, nearest, rmse, img_per_s: [one value a seed]}
    for seed in seeds:
        x_T = torch.randn(args.n, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
        reference = ode = None
        for label, nfe, draw in draws(args, nfes, diffusion, fn, students, seed):
            t0 = time.perf_counter()
            with torch.no_grad():
                x = draw(x_T.clone())
            speed = args.n / (time.perf_counter() - t0)
            ode = x if "ODE reference" in label else ode
            quality = nearest = float("nan")
            if shapes:
                images = to_uint8(x)
                quality, nearest = shapes_distance(images), nearest_real(images)
            reference = quality if reference is None else reference  # the first row: Algorithm 2
            rmse = ((x - ode) * 127.5).square().mean().sqrt().item() if ode is not None else float("nan")
            r = results.setdefault((label, nfe), {k: [] for k in ("quality", "ratio", "nearest", "rmse", "img_per_s")})
            for k, v in zip(r, (quality, quality / reference, nearest, rmse, speed)):
                r[k].append(v)
            print(f"  seed {seed} | {label} | {nfe} | quality {quality:.2f} | nearest {nearest:.1f} | {speed:.1f} img/s",
                  flush=True)
    summarise(results, len(seeds), args.csv)


def summarise(results, n_seeds, csv_path=""):
    """Each row's mean and spread over the seeds, as a table and (csv_path) a CSV file for figures.py --nfe."""
    rows = []
    print(f"\n| sampler | NFE | quality (mean ± sd over {n_seeds} seeds) | x Algorithm 2's | nearest real shape "
          f"(0..255) | RMSE to the T-step ODE | img/s |\n|---|---|---|---|---|---|---|")
    for (label, nfe), r in results.items():
        row = dict(sampler=label, nfe=nfe, seeds=n_seeds)
        for k, values in r.items():
            row[k], row[k + "_sd"] = spread(values)
        rows.append(row)
        print(f"| {label} | {nfe} | {row['quality']:.2f} ± {row['quality_sd']:.2f} | {row['ratio']:.2f} ± "
              f"{row['ratio_sd']:.2f} | {row['nearest']:.1f} ± {row['nearest_sd']:.1f} | {row['rmse']:.2f} | "
              f"{row['img_per_s']:.1f} |")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
        print(f"wrote {csv_path}")


def main(argv=None):
    try:
        bench(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
