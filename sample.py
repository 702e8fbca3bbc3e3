"""
Sample from a DDPM (Ho, Jain, Abbeel 2020): Algorithm 2 from a train.py checkpoint or the paper's released
CIFAR-10 weights; DDIM and DPM-Solver++ with fewer steps; classifier-free guidance; the reverse process as a strip
(Figure 6); and the test-set NLL bound in bits/dim (Table 1, Eq. 5).
  python sample.py out/ckpt.pt --n 64                                    # grid, 1000 steps of Algorithm 2
  python sample.py out --sampler dpm++ --steps 20                        # DPM-Solver++(2M), 20 network calls
  python sample.py model-790000.ckpt --n 50000 --npz s.npz               # released weights, for FID
  torchrun --nproc_per_node=8 sample.py out --n 50000 --npz s.npz        # the same file, 8 GPUs
  python sample.py out --class 0,1,2,3 --guidance 3                      # class-conditional, guided
  python sample.py out --nll cifar10                                     # NLL bound on the CIFAR-10 test split
A command line: nothing imports this file.
"""
import argparse
import math
import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint import build_diffusion, load_model
from data import atomic_write, from_uint8, load_eval_images, load_file, save_grid, to_uint8, write_npz
from ddpm import rate_distortion
from cascade import augment, conditioned, downsample, upsample
from distill import consistency_sample
from guidance import classifier_grad, model_fn
from runtime import Progress, StopSignal, close_distributed, init_distributed
from samplers import SAMPLERS, SPACINGS, sample_loop

GRID_MAX = 256  # the PNG shows at most this many samples; --npz keeps all of them
# the super-resolution stages' conditioning augmentation at sampling time: none, 50 and 150 measured on the built-in
# data gave the same quality within noise (README, Resolution), so the default leaves the stage's input untouched
DEFAULT_COND_AUG = -1


def aug_level(value):
    """--cond-aug: a timestep index, or none (-1)."""
    return -1 if value == "none" else int(value)
FID_MIN = 10_000  # fewer samples than this make an FID that is not comparable with published ones

# -----------------------------------------------------------------------------
# classes, grids and the trajectory strip


def parse_classes(spec, num_classes, names):
    """'3' or '1,5,7' (or class names, where the checkpoint has them) -> list of ints in 0..num_classes-1."""
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s in names:
            out.append(names.index(s))
        elif s.lstrip("-").isdigit() and 0 <= int(s) < num_classes:
            out.append(int(s))
        else:
            raise SystemExit(f"error: --class {s}: not a class of this model (0..{num_classes - 1}"
                             + (f" or one of {','.join(names)})" if names else ")"))
    return out


def class_counts(n, k):
    """n samples spread evenly over k classes: the counts differ by at most one."""
    return [n // k + (i < n % k) for i in range(k)]


def grid_images(images, classes):
    """The samples for the PNG: one row per class when classes are given (short rows padded with black)."""
    x = from_uint8(images)
    if classes is None:
        return x[:GRID_MAX], None
    counts = class_counts(len(x), len(classes))
    per_row = max(1, min(max(counts), GRID_MAX // len(classes)))
    rows, start = [], 0
    for count in counts:  # the labels run in blocks, one per entry of --class
        block = x[start:start + min(count, per_row)]
        rows.append(torch.cat([block, -torch.ones(per_row - len(block), *x.shape[1:])]))
        start += count
    return torch.cat(rows), per_row


def trajectory_recorder(num_calls, n_keep, points=10):
    """A callback for the sampling loops keeping x_t and the predicted x0 of the first n_keep samples at
    `points` evenly spaced steps, the last included (the paper's Figure 6)."""
    keep = {round(k * (num_calls - 1) / max(points - 1, 1)) for k in range(min(points, num_calls))}
    frames, calls = [], [0]
    def callback(i, x, pred_x0):
        if calls[0] in keep:
            frames.append((x[:n_keep].float().cpu(), pred_x0[:n_keep].float().cpu()))
        calls[0] += 1
    return callback, frames


def save_trajectory(path, frames):
    """Two rows per sample, time running left to right: x_t, then the predicted x0 at the same step."""
    cols = len(frames)
    rows = []
    for s in range(frames[0][0].shape[0]):
        rows += [torch.stack([f[0][s] for f in frames]), torch.stack([f[1][s] for f in frames])]
    save_grid(path, torch.cat(rows), nrow=cols)


def describe_sampler(args, diffusion):
    T = diffusion.num_timesteps
    if args.sampler == "consistency":
        last = f", last noise level {args.consistency_last}" if args.steps > 1 else ""
        steps = f"{args.steps} step{'s' if args.steps > 1 else ''}"
        return f"consistency model, {steps}{last} (Song et al. 2023, Algorithm 1)"
    if args.sampler == "ddpm" and args.steps == T and args.spacing == "trailing":
        return f"Algorithm 2, {T} steps, {diffusion.var_type}"
    name = {"ddpm": "ancestral (DDIM eta 1)", "ddim": f"DDIM eta {args.eta or 0.0}", "dpm++": "DPM-Solver++(2M)"}[
        args.sampler]
    return f"{name}, {args.steps} steps ({args.spacing} spacing)"

# -----------------------------------------------------------------------------
# sampling: batches, each seeded by its index, spread over the torchrun processes


def finished_batches(args, labels, shape):
    """--resume: the batches already in the --npz a stopped run wrote (its first images), checked against this run."""
    if not os.path.exists(args.npz):
        print(f"note: --resume: {args.npz} does not exist yet; starting from the first batch")
        return 0, None
    images, saved_labels = load_file(args.npz)
    k = len(images)
    if tuple(images.shape[1:]) != shape or k > args.n or (k % args.batch_size and k != args.n):
        raise SystemExit(f"error: --resume: {args.npz} holds {k} images of shape {tuple(images.shape[1:])}, which "
                         f"are not whole batches of {args.batch_size} of this run's {args.n} {shape} samples")
    if (labels is None) != (saved_labels is None) or (labels is not None and
                                                        not torch.equal(saved_labels, labels[:k])):
        raise SystemExit(f"error: --resume: the labels in {args.npz} are not this run's (--class, --n)")
    return -(-k // args.batch_size), images


def upsample_stage(stage, x_lr, generator):
    """One stage of a cascade (Ho et al. 2021): the super-resolution model's sampler, conditioned on x_lr upsampled to
    its size and augmented to the level stage.cond_aug (-1: none), the augmentation noise drawn from generator."""
    B, C = x_lr.shape[:2]
    s = torch.full((B,), stage.cond_aug, device=x_lr.device)
    cond = upsample(x_lr, stage.size)
    cond = augment(stage.diffusion, cond, s, torch.randn(cond.shape, generator=generator, device=x_lr.device))
    return sample_loop(stage.diffusion, conditioned(stage.net, cond, s), (B, C, stage.size, stage.size), stage.sampler,
                       stage.steps, stage.eta, stage.spacing, generator=generator)


@torch.no_grad()
def run_sampling(args, net, diffusion, device, names, rank, world, classifier=None, stages=(), given=None):
    """Batches of samples from net; with a classifier, classifier guidance (scale args.classifier_scale) toward the
    --class labels, which then need not be the model's own (an unconditional model has none). stages: a cascade's
    super-resolution models, each drawing from the output of the one before; given: low-resolution images that
    stand in for the base model's samples (sample.py SR_CKPT --low-res IMAGES)."""
    c, s = net.config["in_channels"], (stages[-1].size if stages else net.config["image_size"])
    num_classes = net.config.get("num_classes")
    label_classes = classifier.num_classes if classifier is not None else num_classes
    classes = parse_classes(args.class_, label_classes, names) if args.class_ is not None else None
    labels = None if classes is None else \
        torch.cat([torch.full((k,), label) for label, k in zip(classes, class_counts(args.n, len(classes)))])
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if num_classes is not None and classes is None:
        say(f"note: class-conditional model and no --class: unconditional samples (the null label {num_classes})")
    if args.npz and args.n < FID_MIN:
        say(f"warning: {args.n} samples; an FID from fewer than {FID_MIN:,} is biased upwards and not comparable "
            f"with published ones, which use 50,000 (README: FID)")
    n_batches = math.ceil(args.n / args.batch_size)
    first, done = 0, {}  # done: batch index -> uint8 (b, H, W, C)
    agreement = [0.0, 0]  # a cascade's squared error of area-downsampled output against its input, and its count
    if args.resume:
        first, images = finished_batches(args, labels, (s, s, c))
        if first:
            done = dict(enumerate(images.split(args.batch_size)))
            say(f"resuming: {len(images)} samples of {args.n} in {args.npz}")
    first_stage = f"the {args.n} given images" if given is not None else describe_sampler(args, diffusion)
    say(f"sampling {args.n} images {s}x{s}x{c}: {first_stage}, batch {args.batch_size}, seed "
        f"{args.seed}, {world} x {device}" + (f", classes {classes}" if classes else "")
        + (f", guidance {args.guidance}" if classes and num_classes else "")
        + (f", classifier scale {args.classifier_scale}" if classifier is not None else "")
        + "".join(f", then up to {st.size}x{st.size} by {st.sampler} in {st.steps} steps, conditioning augmentation "
                  f"{'none' if st.cond_aug < 0 else st.cond_aug}" for st in stages)
        + (", bf16" if args.bf16 else ""))
    steps = (0 if given is not None else args.steps) + sum(stage.steps for stage in stages)  # network calls a sample
    progress = Progress(total=(n_batches - first) * args.batch_size * steps)

    def carry_up(x, g):
        """x through the cascade's stages; the agreement of the output with x (CDM: the super-resolution sample,
        area-downsampled, should give back its low-resolution input), on the [0, 255] scale."""
        x_lr = x
        for stage in stages:
            x = upsample_stage(stage, x, g)
        if stages:
            agreement[0] += ((downsample(x, x_lr.shape[-1]) - x_lr.clamp(-1, 1)) * 127.5).square().sum().item()
            agreement[1] += x_lr.numel()
        return to_uint8(x)

    def draw(b, work_before):
        """Batch b: its own seed, seed * 1_000_003 + b, so the same seed gives the same files on any number of
        processes, and two seeds never share a batch's noise (runs with seeds 0, 1, ... can be pooled for FID)."""
        bs = min(args.batch_size, args.n - b * args.batch_size)
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        if given is not None:  # the low-resolution images, through the cascade's stages
            x = from_uint8(given[b * args.batch_size: b * args.batch_size + bs].to(device))
            return carry_up(x, g)
        y = labels[b * args.batch_size: b * args.batch_size + bs].to(device) if labels is not None else None
        if num_classes is None:  # an unconditional model: the labels are the classifier's alone
            fn = model_fn(net, None, 0.0, args.bf16)
        else:
            y_model = y if y is not None else torch.full((bs,), num_classes, device=device)
            fn = model_fn(net, y_model, args.guidance if classes else 0.0, args.bf16)
        cond_fn = None
        if classifier is not None and y is not None and args.classifier_scale != 0:  # s = 0: the unguided sampler
            cond_fn = classifier_grad(classifier, y, args.classifier_scale)
        record, frames = trajectory_recorder(args.steps, min(bs, 4)) if args.trajectory and b == 0 else (None, None)
        calls = [0]
        def callback(i, x, pred_x0):
            if record:
                record(i, x, pred_x0)
            calls[0] += 1
            if master and progress.due():  # a batch of the full net on a CPU takes hours: say it is moving
                say(f"  batch {b + 1}: step {calls[0]}/{args.steps} | eta "
                    f"{progress.eta(work_before + world * bs * calls[0])}", flush=True)
        base = (bs, c, net.config["image_size"], net.config["image_size"])
        if args.sampler == "consistency":
            x = consistency_sample(diffusion, fn, base, args.steps, generator=g, callback=callback,
                                   last=args.consistency_last)
        else:
            x = sample_loop(diffusion, fn, base, args.sampler, args.steps, args.eta, args.spacing,
                            generator=g, clip_denoised=not args.no_clip, callback=callback, cond_fn=cond_fn)
        if frames:
            save_trajectory(args.trajectory, frames)
            say(f"wrote {args.trajectory}: x_t (odd rows) and predicted x0 (even rows) at {len(frames)} steps")
        return carry_up(x, g)

    with StopSignal() as stop:
        for r in range(math.ceil((n_batches - first) / world)):  # every rank runs every round, to agree on stopping
            b = first + r * world + rank
            if b < n_batches:
                done[b] = draw(b, r * world * args.batch_size * steps)
            finished = min(n_batches, first + (r + 1) * world)
            count = min(args.n, finished * args.batch_size)
            say(f"batch {finished:>{len(str(n_batches))}}/{n_batches} | {count:>{len(str(args.n))}}/{args.n} images | "
                f"{steps} steps | {(count - first * args.batch_size) / (time.time() - progress.start):7.2f} img/s | "
                f"eta {progress.eta((finished - first) * args.batch_size * steps)}", flush=True)
            if stop.agreed(world, device):
                break
    if world > 1:  # every rank's batches to rank 0
        parts = [None] * world if master else None
        dist.gather_object({b: v for b, v in done.items() if b >= first}, parts, dst=0)
        if master:
            for part in parts:
                done.update(part)
    if not master:
        return
    if agreement[1]:
        say(f"cascade: the output area-downsampled to its input's size differs from it by RMSE "
            f"{math.sqrt(agreement[0] / agreement[1]):.2f} levels of 255" + (" (rank 0's batches)" if world > 1 else ""))
    prefix = 0
    while prefix in done:
        prefix += 1
    images = torch.cat([done[b] for b in range(prefix)]) if prefix else torch.zeros(0, s, s, c, dtype=torch.uint8)
    complete = prefix == n_batches
    if images.shape[0]:
        x, nrow = grid_images(images, classes)
        save_grid(args.out, x, nrow)
        print(f"wrote {args.out}" + (f" (first {len(x)} of {len(images)})" if len(x) < len(images) else ""))
    if args.npz and images.shape[0]:
        kept = labels[:len(images)] if labels is not None else None
        write_npz(args.npz, {"arr_0": images, **({"arr_1": kept} if kept is not None else {})})
        print(f"wrote {args.npz}: arr_0 uint8 {tuple(images.shape)}" + (", arr_1 int64 labels" if classes else ""))
    if not complete:
        kept = f"{len(images)} of {args.n} samples are in {args.npz}" if args.npz else "no --npz was asked for"
        print(f"stopped: {kept}; run the same command with --resume to draw the rest", flush=True)
        raise SystemExit(stop.exit_code)

# -----------------------------------------------------------------------------
# the likelihood: Eq. (5) in bits/dim on held-out data (Table 1's NLL column)


@torch.no_grad()
def run_nll(args, net, diffusion, device, num_classes):
    c, s = net.config["in_channels"], net.config["image_size"]
    images = load_eval_images(args.nll, args.data_dir, s, c)[:args.n]
    if tuple(images.shape[1:]) != (s, s, c):
        raise SystemExit(f"error: --nll {args.nll}: images are {tuple(images.shape[1:])} (H,W,C), "
                         f"the model's {(s, s, c)}")
    if num_classes is not None:
        print(f"note: class-conditional model: the bound is of the unconditional model (null label {num_classes})")
    T = diffusion.num_timesteps
    print(f"NLL bound on {len(images)} images of {args.nll}: {T} terms per image, {device}")
    sums, n = {k: 0.0 for k in ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")}, 0
    curve = torch.zeros(2, T + 1, dtype=torch.float64)  # rate and squared distortion summed over images (Sec. 4.3)
    progress = Progress(total=len(images) * T)
    with StopSignal() as stop:
        for i in range(0, len(images), args.batch_size):
            x0 = from_uint8(images[i:i + args.batch_size].to(device))  # as in training
            y = torch.full((len(x0),), num_classes, device=device) if num_classes is not None else None
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i // args.batch_size)  # x_t, per batch
            calls = [0]
            def callback(k):
                calls[0] += 1
                if progress.due():
                    print(f"  images {i + 1}-{i + len(x0)}: term {calls[0]}/{T} | eta "
                          f"{progress.eta(i * T + len(x0) * calls[0])}", flush=True)
            bpd = diffusion.calc_bpd_loop(model_fn(net, y, 0.0, args.bf16), x0, not args.no_clip, generator=g,
                                          callback=callback)
            for k in sums:
                sums[k] += bpd[k].sum().item()
            rate, distortion = rate_distortion(bpd)
            curve += torch.stack([rate.sum(0), distortion.square().sum(0)]).double().cpu()
            n = i + len(x0)
            m = {k: v / n for k, v in sums.items()}
            print(f"{n:>{len(str(len(images)))}}/{len(images)} | bpd {m['total_bpd']:.4f} | L_T {m['prior_bpd']:.4f} | "
                  f"sum L_t-1 {m['vb_bpd']:.4f} | L_0 {m['decoder_bpd']:.4f} | "
                  f"{n / (time.time() - progress.start):.2f} img/s | eta {progress.eta(n * T)}", flush=True)
            if stop.signum is not None:
                print(f"stopped after {n} of {len(images)} images; the bound over those:")
                break
    print(f"NLL <= {m['total_bpd']:.4f} bits/dim over {n} images = L_T {m['prior_bpd']:.4f} + "
          f"sum L_t-1 {m['vb_bpd']:.4f} + L_0 {m['decoder_bpd']:.4f}")
    rate, rmse = curve[0] / n, (curve[1] / n).sqrt()  # the RMSE over all pixels of all images
    print(f"progressive coding (Sec. 4.3, Figure 5): rate {rate[T - 1]:.4f} bits/dim and distortion "
          f"{m['decoder_bpd']:.4f} bits/dim, an RMSE of {rmse[T - 1]:.4f} on [0, 255], once x_1 is received "
          f"(paper, CIFAR-10 test set: 1.78, 1.97 and 0.95)")
    if args.csv:
        rows = "".join(f"{k + 1},{T - k},{rate[k]:.6f},{rmse[k]:.6f}\n" for k in range(T + 1))
        atomic_write(args.csv, lambda f: f.write(("reverse_step,t,rate_bpd,distortion_rmse\n" + rows).encode()))
        print(f"wrote {args.csv}: rate and distortion after each of the {T} reverse steps and after x_0 (t = 0)")
    if stop.signum is not None:
        raise SystemExit(stop.exit_code)


def source_images(spec, args, net, device):
    """--shared-latents / --interpolate: the --index images of cifar10 (test split), shapes (held out) or a file,
    in [-1, 1], (N, C, H, W)."""
    c, s = net.config["in_channels"], net.config["image_size"]
    images = load_eval_images(spec, args.data_dir, s, c)
    if tuple(images.shape[1:]) != (s, s, c):
        raise SystemExit(f"error: {spec}: images are {tuple(images.shape[1:])} (H,W,C), the model's {(s, s, c)}")
    index = [int(v) for v in args.index.split(",")]
    if max(index) >= len(images) or min(index) < 0:
        raise SystemExit(f"error: --index {args.index}: {spec} has {len(images)} images")
    return from_uint8(images[index].to(device))


def paper_times(args, T):
    """--times as the paper counts them (t in 1..T), -> 0-based indices."""
    times = [int(v) for v in args.times.split(",")]
    if not all(1 <= t <= T for t in times):
        raise SystemExit(f"error: --times {args.times}: each t must be in 1..{T}")
    return times, [t - 1 for t in times]


@torch.no_grad()
def run_shared_latents(args, net, diffusion, device, fn):
    """Figure 7: each image noised to x_t (q, fixed noise) for each t, and several x_0 ~ p(x_0 | x_t) drawn from it.
    One row per (image, t): the image, x_t, then the draws. Large t keeps only the coarse attributes."""
    x0 = source_images(args.shared_latents, args, net, device)
    times, indices = paper_times(args, diffusion.num_timesteps)
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    rows = []
    for k, x in enumerate(x0):
        for t, i in zip(times, indices):
            x_t = diffusion.q_sample(x[None], torch.tensor([i], device=device), noise[k:k + 1])
            draws = diffusion.p_sample_loop(fn, (args.draws, *x.shape), x_t.expand(args.draws, -1, -1, -1), g,
                                            start=i)
            rows.append(torch.cat([x[None], x_t.clamp(-1, 1), draws]))
            print(f"image {k}, t = {t}: {args.draws} draws", flush=True)
    save_grid(args.out, torch.cat(rows), nrow=args.draws + 2)
    print(f"wrote {args.out}: one row per image and t ({args.times}): the image, x_t, {args.draws} draws from "
          f"p(x_0 | x_t)")


@torch.no_grad()
def run_interpolation(args, net, diffusion, device, fn):
    """Sec. 4.4, Figures 8 and 9: two images encoded to x_t with q (noise fixed), their latents mixed linearly and
    decoded (decoder noise fixed across lambda); one row per t: the first image, the lambdas 0..1, the second."""
    x0 = source_images(args.interpolate, args, net, device)
    if len(x0) != 2:
        raise SystemExit("error: --interpolate needs two images: --index A,B")
    times, indices = paper_times(args, diffusion.num_timesteps)
    lambdas = torch.linspace(0, 1, args.lambdas).tolist()
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    rows = []
    for t, i in zip(times, indices):
        mixed = diffusion.interpolate(fn, x0[:1], x0[1:], torch.tensor([i], device=device), lambdas, noise[:1],
                                      noise[1:], generator_seed=args.seed)
        rows.append(torch.cat([x0[:1], mixed[:, 0], x0[1:]]))
        print(f"t = {t}: {len(lambdas)} interpolants", flush=True)
    save_grid(args.out, torch.cat(rows), nrow=len(lambdas) + 2)
    print(f"wrote {args.out}: one row per t ({args.times}): image A, lambda = 0..1 in {len(lambdas)} steps, image B")

# -----------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description="Sample from a DDPM checkpoint or the paper's released CIFAR-10 "
                                "weights, or report its NLL bound in bits/dim.")
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder; or released weights: the TF-scope state dict "
      "(model-790000.ckpt) or the diffusers google/ddpm-cifar10-32 folder, .safetensors or .bin")
    a("-n", "--n", "--num-samples", dest="n", type=int, default=None,
      help="samples to draw (default 64); with --nll, images to evaluate (default all). Under torchrun write -n or "
           "--num-samples: torchrun's own parser rejects --n as ambiguous")
    a("--batch-size", type=int, default=128, help="images per batch (default 128)")
    a("--sampler", default=None, choices=SAMPLERS + ("consistency",), help="ddpm: Algorithm 2 (with fewer steps: ancestral on the "
      "spaced chain); ddim (Song et al. 2021); dpm++: DPM-Solver++(2M) (Lu et al. 2022); consistency: a consistency "
      "model's own. Default: a distilled student's own, else ddpm for --steps T, ddim for fewer")
    a("--steps", type=int, default=None, help="network evaluations (default T)")
    a("--consistency-last", type=float, default=0.821, help="multistep consistency sampling: the noise level "
      "(sigma / alpha) the last step adds back, the ones before falling geometrically to it from x_T's; 0.821 is "
      "Song et al.'s searched CIFAR-10 value for 2 steps")
    a("--spacing", default="trailing", choices=SPACINGS, help="which timesteps --steps K < T visits: trailing "
      "(default) starts at T-1 for every K; uniform and quadratic are the DDIM paper's (its CIFAR-10 FIDs: "
      "--sampler ddim --spacing quadratic --eta 0 --no-clip)")
    a("--eta", type=float, default=None, help="ddim: noise, 0 deterministic (default), 1 ancestral-like. Given alone "
      "it selects ddim")
    a("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] (the literal Algorithm 2; "
      "the original code clips)")
    a("--no-ema", action="store_true", help="use the raw weights instead of their EMA (train.py checkpoints)")
    a("--class", dest="class_", default=None, metavar="K[,K...]", help="class-conditional models: a class index "
      "or name, or a comma-separated list (the samples spread evenly over it, one grid row per class)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance w: eps = (1+w) eps(x,c) - w eps(x,null); "
      "0 (default) is the plain conditional model")
    a("--classifier", default="", help="classifier guidance (Dhariwal & Nichol 2021): a train.py --classifier "
      "checkpoint steering this model, unconditional or not, toward --class")
    a("--classifier-scale", type=float, default=1.0, help="with --classifier: the gradient scale s (0: no guidance)")
    a("--upsample", action="append", default=[], metavar="SR_CKPT", help="a cascade (Ho et al. 2021): carry the "
      "samples up through this super-resolution model (train.py --low-res); repeat for more stages")
    a("--upsample-sampler", action="append", default=[], choices=SAMPLERS, help="each --upsample stage's sampler, "
      "in order (one value: every stage; default ddpm)")
    a("--upsample-steps", action="append", default=[], type=int, help="each --upsample stage's steps (default T)")
    a("--cond-aug", type=aug_level, default=DEFAULT_COND_AUG, help="the super-resolution stages' conditioning "
      "augmentation: the low-resolution image noised to this timestep index, or none (default none: 50 and 150 "
      "measured no better on the built-in data, README)")
    a("--low-res", default="", help="with a super-resolution checkpoint as the model: the .npy/.npz/.pt of "
      "low-resolution uint8 images N,H,W,C to carry up")
    a("--seed", type=int, default=0, help="random seed, default 0 (batch b uses seed * 1000003 + b)")
    a("--out", default="samples.png", help="PNG grid of the samples (default samples.png in the current folder)")
    a("--npz", default="", help="also write all samples as uint8 N,H,W,C under arr_0 (labels under arr_1), for FID")
    a("--resume", action="store_true", help="continue a stopped run: keep the samples its --npz holds and draw "
      "the rest (the same command otherwise; the result is the uninterrupted run's)")
    a("--trajectory", default="", help="PNG strip of the reverse process of the first batch's first samples: x_t "
      "and predicted x0 at 10 steps (cf. the paper's Figure 6)")
    a("--nll", default="", help="instead of sampling, report the NLL bound in bits/dim (Eq. 5) on 'cifar10' "
      "(its test split), 'shapes' (held-out built-in images) or a .npy/.npz/.pt of uint8 images N,H,W,C")
    a("--csv", default="", help="with --nll: also write the rate-distortion curve of progressive coding (Sec. 4.3, "
      "Figure 5) as CSV: the rate (bits/dim) and distortion (RMSE on [0, 255]) after each reverse step")
    a("--shared-latents", default="", metavar="DATA", help="the paper's Figure 7 instead of sampling: --index images "
      "of cifar10 (test), shapes (held out) or a file, noised to each of --times, then --draws samples of x_0 from "
      "each")
    a("--interpolate", default="", metavar="DATA", help="the paper's Figures 8 and 9 (Sec. 4.4) instead of sampling: "
      "the two --index images of DATA interpolated in latent space at each of --times")
    a("--index", default="0,1", help="with --shared-latents / --interpolate: which images of DATA")
    a("--times", default="250,500,750,1000", help="with --shared-latents / --interpolate: the t (1..T, the paper's "
      "counting) to noise to")
    a("--draws", type=int, default=4, help="with --shared-latents: samples drawn from each x_t")
    a("--lambdas", type=int, default=9, help="with --interpolate: interpolants from lambda = 0 to 1")
    a("--data-dir", default="./data", help="where --nll cifar10 finds cifar-10-batches-py or the archive "
      "(default ./data, as train.py)")
    a("--device", default="auto", help="auto (default), cpu, cuda or mps")
    a("--compile", action="store_true", help="torch.compile the network; on CUDA with CUDA graphs (mode "
      "reduce-overhead), so each of the T network calls is one graph launch. Compiling takes a minute or more")
    a("--tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA (faster; off by default, so the "
      "network runs in true fp32 as the paper's numbers do)")
    a("--bf16", action="store_true", help="bf16 autocast for the network on CUDA (faster; the diffusion math stays "
      "fp32). Off by default: the paper's numbers are fp32")
    return p


def check_args(args):
    for k in ("n", "batch_size", "steps"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")
    if args.eta is not None and args.eta < 0:
        raise SystemExit("error: --eta must be >= 0")
    if args.guidance < 0:
        raise SystemExit("error: --guidance must be >= 0")
    if not args.consistency_last > 0:
        raise SystemExit("error: --consistency-last must be a positive noise level")
    if args.nll and (args.class_ is not None or args.guidance or args.steps or args.eta is not None or args.npz or
                     args.trajectory or args.sampler or args.resume or args.classifier):
        raise SystemExit("error: --nll uses all T steps of the model itself; drop --class/--guidance/--sampler/"
                         "--steps/--eta/--npz/--trajectory/--resume")
    if (args.shared_latents or args.interpolate) and (args.nll or args.npz or args.resume):
        raise SystemExit("error: --shared-latents and --interpolate write --out only; drop --nll/--npz/--resume")
    if args.csv and not args.nll:
        raise SystemExit("error: --csv is the rate-distortion table of --nll")
    if args.resume and not args.npz:
        raise SystemExit("error: --resume continues from the samples in --npz; give the --npz of the stopped run")
    for flag, path in (("--out", args.out), ("--npz", args.npz), ("--trajectory", args.trajectory)):
        if path and not os.path.isdir(os.path.dirname(path) or "."):  # find out now, not after hours of sampling
            raise SystemExit(f"error: {flag} {path}: folder {os.path.dirname(path)} does not exist")


def load_classifier(args, diffusion, net, device):
    """--classifier: a train.py --classifier checkpoint, checked against the diffusion model it is to guide."""
    classifier, config, meta, desc = load_model(args.classifier)
    if meta["kind"] != "classifier":
        raise SystemExit(f"error: --classifier {args.classifier} is not a classifier (train.py --classifier)")
    other = build_diffusion(config).to(device)
    if other.num_timesteps != diffusion.num_timesteps or not torch.allclose(other.betas, diffusion.betas):
        raise SystemExit(f"error: --classifier {args.classifier} was trained for another diffusion (T = "
                         f"{other.num_timesteps}, {config.get('schedule')}); the model's is T = "
                         f"{diffusion.num_timesteps}: train it with the model's --timesteps and --schedule")
    a, b = classifier.config, net.config
    if (a["image_size"], a["in_channels"]) != (b["image_size"], b["in_channels"]):
        raise SystemExit(f"error: --classifier {args.classifier} sees {a['image_size']}x{a['image_size']}x"
                         f"{a['in_channels']} images, the model draws {b['image_size']}x{b['image_size']}x"
                         f"{b['in_channels']}")
    if b.get("num_classes") is not None and b["num_classes"] != a["num_classes"]:
        raise SystemExit(f"error: --classifier {args.classifier} has {a['num_classes']} classes, the model "
                         f"{b['num_classes']}")
    print(f"classifier guidance: {desc}, scale {args.classifier_scale}")
    return classifier.to(device), meta.get("class_names")


def load_stages(args, net, meta, diffusion, device):
    """A cascade (Ho et al. 2021): the super-resolution stages of --upsample, in order, checked to chain (each stage's
    low resolution the size below it, the same channels); and, for a super-resolution checkpoint as the model, the
    --low-res images it starts from (it is then the first stage)."""
    models, given = [(path, *load_model(path)[:3]) for path in args.upsample], None
    if meta["kind"] == "sr":
        if not args.low_res:
            raise SystemExit(f"error: {args.ckpt} is a super-resolution model (train.py --low-res): give it images "
                             f"with --low-res IMAGES, or follow a base model: sample.py BASE --upsample {args.ckpt}")
        given = load_file(args.low_res)[0]
        models.insert(0, (args.ckpt, net, None, meta))  # None: the model's own diffusion
        size, channels = given.shape[1], given.shape[3]
    elif args.low_res:
        raise SystemExit(f"error: --low-res is for a super-resolution checkpoint; {args.ckpt} is a {meta['kind']} model")
    else:
        size, channels = net.config["image_size"], net.config["in_channels"]
    stages = []
    for k, (path, stage_net, diffusion_config, stage_meta) in enumerate(models):
        c = stage_net.config
        if stage_meta["kind"] != "sr":
            raise SystemExit(f"error: --upsample {path} is not a super-resolution model (train.py --low-res)")
        if c["low_res"] != size or c["in_channels"] != channels:
            raise SystemExit(f"error: the cascade does not chain: {path} takes {c['low_res']}x{c['low_res']}x"
                             f"{c['in_channels']} images up to {c['image_size']}x{c['image_size']}, the stage below "
                             f"gives {size}x{size}x{channels}")
        stage_diffusion = diffusion if diffusion_config is None else build_diffusion(diffusion_config).to(device)
        pick = lambda values, default: values[min(k, len(values) - 1)] if values else default
        if diffusion_config is None:  # the model itself, given images: its own --sampler and --steps
            sampler, steps = args.sampler, args.steps
        else:
            sampler, steps = pick(args.upsample_sampler, "ddpm"), pick(args.upsample_steps, stage_diffusion.num_timesteps)
        stages.append(SimpleNamespace(net=stage_net.to(device), diffusion=stage_diffusion, size=c["image_size"],
                                      sampler=sampler, steps=steps, eta=None, spacing=args.spacing,
                                      cond_aug=args.cond_aug))
        size = c["image_size"]
    return stages, given


def choose_sampler(args, T, kind, sampling):
    """The sampler and steps: the flags, or a student's own (its checkpoint says how it samples)."""
    if kind == "consistency":
        if args.sampler not in (None, "consistency"):
            raise SystemExit(f"error: a consistency model samples with its own sampler (Song et al. 2023, "
                             f"Algorithm 1), not --sampler {args.sampler}; --steps K gives K steps")
        args.sampler, args.steps = "consistency", args.steps or 1
        return
    if kind == "progressive" and args.sampler is None:
        args.sampler, args.steps = "ddim", args.steps or sampling["steps"]
    args.steps = args.steps or T
    if args.steps > T:
        raise SystemExit(f"error: --steps {args.steps} is more than the model's T = {T}")
    if args.sampler is None:  # as before --sampler existed: all T steps are Algorithm 2, fewer (or --eta) DDIM
        args.sampler = "ddpm" if args.steps == T and args.eta is None else "ddim"
    if args.sampler == "consistency":
        raise SystemExit("error: --sampler consistency is for consistency models (train.py --distill consistency)")
    if args.sampler == "ddpm" and args.eta not in (None, 1.0):
        raise SystemExit("error: --sampler ddpm has no --eta (it is eta 1); use --sampler ddim")
    if args.sampler == "dpm++" and args.eta not in (None, 0.0):
        raise SystemExit("error: --sampler dpm++ is deterministic (an ODE solver) and takes no --eta; for a stochastic "
                         "sampler use --sampler ddpm (ancestral) or ddim --eta E")


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    rank, _, world, device = init_distributed(args.device)
    if device.type == "cuda":  # fp32 means fp32: cuDNN would use TF32 for convolutions by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.bf16 and device.type != "cuda":
        print(f"note: --bf16 is for CUDA; running fp32 on {device.type}")
        args.bf16 = False
    net, diffusion_config, meta, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    if meta["kind"] == "classifier":
        raise SystemExit(f"error: {args.ckpt} is a classifier (train.py --classifier); it guides a diffusion model: "
                         f"sample.py MODEL --classifier {args.ckpt} --class K")
    net.to(device)
    try:
        diffusion = build_diffusion(diffusion_config).to(device)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {args.ckpt}: bad diffusion_config ({e})")
    T, num_classes = diffusion.num_timesteps, net.config.get("num_classes")
    if args.compile:  # the batch shape is fixed, so one graph serves every step (a smaller last batch: one more)
        net = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None)
    if rank == 0:
        print(f"loaded {desc}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, T={T}")
    if args.nll or args.shared_latents or args.interpolate:
        if world > 1:
            raise SystemExit("error: --nll, --shared-latents and --interpolate run in one process (not torchrun)")
        if meta["kind"] not in ("diffusion",):
            raise SystemExit(f"error: {args.ckpt} is a {meta['kind']} model; the bound and Sec. 4's experiments are "
                             f"for a diffusion model's own reverse process")
        if args.nll:
            return run_nll(args, net, diffusion, device, num_classes)
        y = torch.full((args.draws,), num_classes, device=device) if num_classes is not None else None
        if args.shared_latents:
            return run_shared_latents(args, net, diffusion, device, model_fn(net, y, 0.0, args.bf16))
        y = y[:1] if y is not None else None
        return run_interpolation(args, net, diffusion, device, model_fn(net, y, 0.0, args.bf16))
    n_asked, args.n = args.n, args.n or 64
    choose_sampler(args, T, meta["kind"], meta["sampling"])
    classifier, names = None, meta.get("class_names") or ()
    if args.classifier:
        classifier, classifier_names = load_classifier(args, diffusion, net, device)
        names = classifier_names or names
        if args.class_ is None:
            raise SystemExit("error: --classifier needs --class K[,K...]: the classes to guide toward")
    elif args.class_ is not None and num_classes is None:
        raise SystemExit("error: --class needs a class-conditional model (train.py --class-cond) or a --classifier; "
                         "this model is unconditional")
    if args.guidance and (args.class_ is None or num_classes is None):
        raise SystemExit("error: --guidance needs --class and a class-conditional model")
    stages, given = load_stages(args, net, meta, diffusion, device)
    if given is not None:  # every image given, unless --n asks for fewer
        args.n = min(n_asked or len(given), len(given))
    run_sampling(args, net, diffusion, device, names, rank, world, classifier, stages, given)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
    finally:
        close_distributed()
