"""
Sample from a DDPM (Ho, Jain, Abbeel 2020): Algorithm 2 from a train.py checkpoint or the paper's released
CIFAR-10 weights; DDIM with fewer steps; classifier-free guidance; the reverse process as a strip (Figure 6);
and the test-set NLL bound in bits/dim (Table 1, Eq. 5).
  python sample.py out/ckpt.pt --n 64                                    # grid, 1000 steps of Algorithm 2
  python sample.py model-790000.ckpt --steps 100 --n 50000 --npz s.npz   # released weights, DDIM, for FID
  python sample.py out --class 0,1,2,3 --guidance 3                      # class-conditional, guided
  python sample.py out --nll cifar10                                     # NLL bound on the CIFAR-10 test split
"""
import argparse
import math
import os
import time

import torch

from checkpoint import build_diffusion, load_model
from data import CIFAR10_CLASSES, load_eval_images, save_grid, to_uint8, write_npz
from guidance import model_fn
from runtime import resolve_device
from samplers import SAMPLERS, SPACINGS, sample_loop

GRID_MAX = 256  # the PNG shows at most this many samples; --npz keeps all of them

def parse_classes(spec, num_classes, names):
    """'3' or '1,5,7' (or class names, for a CIFAR-10 model) -> list of ints in 0..num_classes-1."""
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


# -----------------------------------------------------------------------------
# sampling


def class_counts(n, k):
    """n samples spread evenly over k classes: the counts differ by at most one."""
    return [n // k + (i < n % k) for i in range(k)]


def grid_images(images, classes):
    """The samples for the PNG: one row per class when classes are given (short rows padded with black)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
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
    """A callback for p_sample_loop / ddim_sample_loop keeping x_t and the predicted x0 of the first n_keep
    samples at `points` evenly spaced steps, the last included (the paper's Figure 6)."""
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
    if args.sampler == "ddpm" and args.steps == T and args.spacing == "trailing":
        return f"Algorithm 2, {T} steps, {diffusion.var_type}"
    name = {"ddpm": "ancestral (DDIM eta 1)", "ddim": f"DDIM eta {args.eta or 0.0}",
            "dpm++": "SDE-DPM-Solver++(2M)" if args.eta == 1 else "DPM-Solver++(2M)"}[args.sampler]
    return f"{name}, {args.steps} steps ({args.spacing} spacing)"


@torch.no_grad()
def run_sampling(args, net, diffusion, device, num_classes, names):
    c, s = net.config["in_channels"], net.config["image_size"]
    classes = parse_classes(args.class_, num_classes, names) if args.class_ is not None else None
    labels = None if classes is None else \
        torch.cat([torch.full((k,), label) for label, k in zip(classes, class_counts(args.n, len(classes)))])
    if num_classes is not None and classes is None:
        print(f"note: class-conditional model and no --class: unconditional samples (the null label {num_classes})")
    how = describe_sampler(args, diffusion)
    print(f"sampling {args.n} images {s}x{s}x{c}: {how}, batch {args.batch_size}, seed {args.seed}, {device}"
          + (f", classes {classes}, guidance {args.guidance}" if classes else "") + (", bf16" if args.bf16 else ""))
    out, n_batches, t0 = [], math.ceil(args.n / args.batch_size), time.time()
    for b in range(n_batches):
        bs = min(args.batch_size, args.n - b * args.batch_size)
        # one seed per batch, seed * 1_000_003 + b: the same seed gives the same files, and two seeds never share
        # a batch's noise (so runs with seeds 0, 1, ... can be pooled for FID)
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        if labels is not None:
            y = labels[b * args.batch_size: b * args.batch_size + bs].to(device)
        else:
            y = torch.full((bs,), num_classes, device=device) if num_classes is not None else None
        fn = model_fn(net, y, args.guidance if classes else 0.0, args.bf16)
        num_steps, tick = args.steps, [time.time(), 0]
        record, frames = trajectory_recorder(num_steps, min(bs, 4)) if args.trajectory and b == 0 else (None, None)
        def callback(i, x, pred_x0):
            if record:
                record(i, x, pred_x0)
            tick[1] += 1
            if time.time() - tick[0] > 30:  # a batch of the full net on a CPU takes hours: say it is moving
                print(f"  batch {b + 1}: step {tick[1]}/{num_steps}", flush=True)
                tick[0] = time.time()
        shape, clip = (bs, c, s, s), not args.no_clip
        x = sample_loop(diffusion, fn, shape, args.sampler, args.steps, args.eta, args.spacing, generator=g,
                        clip_denoised=clip, callback=callback)
        out.append(to_uint8(x))
        if frames:
            save_trajectory(args.trajectory, frames)
            print(f"wrote {args.trajectory}: x_t (odd rows) and predicted x0 (even rows) at {len(frames)} steps")
        done, dt = b * args.batch_size + bs, time.time() - t0
        print(f"batch {b + 1:>{len(str(n_batches))}}/{n_batches} | {done:>{len(str(args.n))}}/{args.n} images | "
              f"{num_steps} steps | {done / dt:7.2f} img/s | eta {(args.n - done) * dt / done:6.0f}s",
              flush=True)
    images = torch.cat(out)
    x, nrow = grid_images(images, classes)
    save_grid(args.out, x, nrow)
    print(f"wrote {args.out}" + (f" (first {len(x)} of {args.n})" if len(x) < args.n else ""))
    if args.npz:
        write_npz(args.npz, {"arr_0": images, **({"arr_1": labels} if labels is not None else {})})
        print(f"wrote {args.npz}: arr_0 uint8 {tuple(images.shape)}" + (", arr_1 int64 labels" if classes else ""))

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
    print(f"NLL bound on {len(images)} images of {args.nll}: {diffusion.num_timesteps} terms per image, {device}")
    sums, t0 = {k: 0.0 for k in ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")}, time.time()
    for i in range(0, len(images), args.batch_size):
        x0 = images[i:i + args.batch_size].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # as in training
        y = torch.full((len(x0),), num_classes, device=device) if num_classes is not None else None
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i // args.batch_size)  # x_t draws, per batch
        bpd = diffusion.calc_bpd_loop(model_fn(net, y, 0.0, args.bf16), x0, not args.no_clip, generator=g)
        for k in sums:
            sums[k] += bpd[k].sum().item()
        n = i + len(x0)
        m = {k: v / n for k, v in sums.items()}
        print(f"{n:>{len(str(len(images)))}}/{len(images)} | bpd {m['total_bpd']:.4f} | L_T {m['prior_bpd']:.4f} | "
              f"sum L_t-1 {m['vb_bpd']:.4f} | L_0 {m['decoder_bpd']:.4f} | {n / (time.time() - t0):.2f} img/s",
              flush=True)
    print(f"NLL <= {m['total_bpd']:.4f} bits/dim over {n} images = L_T {m['prior_bpd']:.4f} + "
          f"sum L_t-1 {m['vb_bpd']:.4f} + L_0 {m['decoder_bpd']:.4f}")

# -----------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description="Sample from a DDPM checkpoint or the paper's released CIFAR-10 "
                                "weights, or report its NLL bound in bits/dim.")
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder; or released weights: the TF-scope state dict "
      "(model-790000.ckpt) or the diffusers google/ddpm-cifar10-32 folder, .safetensors or .bin")
    a("--n", type=int, default=None, help="samples to draw (default 64); with --nll, images to evaluate (default all)")
    a("--batch-size", type=int, default=128, help="images per batch (default 128)")
    a("--sampler", default=None, choices=SAMPLERS, help="ddpm: Algorithm 2 (with fewer steps: ancestral on the "
      "spaced chain); ddim (Song et al. 2021); dpm++: DPM-Solver++(2M) (Lu et al. 2022). Default: ddpm for --steps "
      "T, ddim for fewer")
    a("--steps", type=int, default=None, help="network evaluations (default T)")
    a("--spacing", default="trailing", choices=SPACINGS, help="which timesteps --steps K < T visits: trailing "
      "(default) starts at T-1 for every K; uniform and quadratic are the DDIM paper's (its CIFAR-10 FIDs: "
      "--spacing quadratic --eta 0 --no-clip)")
    a("--eta", type=float, default=None, help="ddim: noise, 0 deterministic (default), 1 ancestral-like; dpm++: 1 "
      "selects the stochastic SDE-DPM-Solver++. Given alone it selects ddim")
    a("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] (the literal Algorithm 2; "
      "the original code clips)")
    a("--no-ema", action="store_true", help="use the raw weights instead of their EMA (train.py checkpoints)")
    a("--class", dest="class_", default=None, metavar="K[,K...]", help="class-conditional models: a class index, "
      "or a comma-separated list (the samples spread evenly over it, one grid row per class)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance w: eps = (1+w) eps(x,c) - w eps(x,null); "
      "0 (default) is the plain conditional model")
    a("--seed", type=int, default=0, help="random seed, default 0 (batch b uses seed * 1000003 + b)")
    a("--out", default="samples.png", help="PNG grid of the samples (default samples.png in the current folder)")
    a("--npz", default="", help="also write all samples as uint8 N,H,W,C under arr_0 (labels under arr_1), for FID")
    a("--trajectory", default="", help="PNG strip of the reverse process of the first batch's first samples: x_t "
      "and predicted x0 at 10 steps (cf. the paper's Figure 6)")
    a("--nll", default="", help="instead of sampling, report the NLL bound in bits/dim (Eq. 5) on 'cifar10' "
      "(its test split), 'shapes' (held-out built-in images) or a .npy/.npz/.pt of uint8 images N,H,W,C")
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


def main(argv=None):
    args = get_parser().parse_args(argv)
    for k in ("n", "batch_size", "steps"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")
    if args.eta is not None and args.eta < 0:
        raise SystemExit("error: --eta must be >= 0")
    if args.nll and (args.class_ is not None or args.guidance or args.steps or args.eta is not None or args.npz or
                     args.trajectory or args.sampler):
        raise SystemExit("error: --nll uses all T steps of the model itself; drop --class/--guidance/--sampler/"
                         "--steps/--eta/--npz/--trajectory")
    for flag, path in (("--out", args.out), ("--npz", args.npz), ("--trajectory", args.trajectory)):
        if path and not os.path.isdir(os.path.dirname(path) or "."):  # find out now, not after hours of sampling
            raise SystemExit(f"error: {flag} {path}: folder {os.path.dirname(path)} does not exist")
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolution kernels
        # fp32 means fp32: cuDNN would use TF32 for convolutions by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.bf16 and device.type != "cuda":
        print(f"note: --bf16 is for CUDA; running fp32 on {device.type}")
        args.bf16 = False
    net, diffusion_config, train_args, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    net.to(device)
    try:
        diffusion = build_diffusion(diffusion_config).to(device)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {args.ckpt}: bad diffusion_config ({e})")
    T, num_classes = diffusion.num_timesteps, net.config.get("num_classes")
    if args.compile:  # the batch shape is fixed, so one graph serves every step (a smaller last batch: one more)
        net = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None)
    print(f"loaded {desc}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, T={T}")
    if args.nll:
        run_nll(args, net, diffusion, device, num_classes)
        return
    args.n, args.steps = args.n or 64, args.steps or T
    if args.steps > T:
        raise SystemExit(f"error: --steps {args.steps} is more than the model's T = {T}")
    if args.sampler is None:  # as before --sampler existed: all T steps are Algorithm 2, fewer (or --eta) DDIM
        args.sampler = "ddpm" if args.steps == T and args.eta is None else "ddim"
    if args.sampler == "ddpm" and args.eta not in (None, 1.0):
        raise SystemExit("error: --sampler ddpm has no --eta (it is eta 1); use --sampler ddim")
    if args.sampler == "dpm++" and args.eta not in (None, 0.0, 1.0):
        raise SystemExit("error: --sampler dpm++ takes --eta 0 (the ODE solver, default) or 1 (SDE-DPM-Solver++)")
    if args.class_ is not None and num_classes is None:
        raise SystemExit("error: --class needs a class-conditional model (train.py --class-cond); "
                         "this one is unconditional")
    if args.guidance and args.class_ is None:
        raise SystemExit("error: --guidance needs --class (and a class-conditional model)")
    if args.guidance < 0:
        raise SystemExit("error: --guidance must be >= 0")
    names = CIFAR10_CLASSES if num_classes == 10 and train_args.get("data") == "cifar10" else ()
    run_sampling(args, net, diffusion, device, num_classes, names)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
