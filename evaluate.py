"""
The paper's Sec. 4.3-4.4 on a trained model: the NLL bound in bits/dim on held-out data (Table 1, Eq. 5) with
the rate-distortion curve of progressive coding (Sec. 4.3, Figure 5), samples that share a latent (Figure 7),
and interpolation in latent space (Sec. 4.4, Figures 8-9).
  python evaluate.py out --nll cifar10                               # NLL bound on the CIFAR-10 test split
  python evaluate.py out-shapes --nll shapes -n 256 --csv rd.csv     # and the rate-distortion curve
  python evaluate.py out-shapes --shared-latents shapes --index 0,1,2 --out shared.png
  python evaluate.py out-shapes --interpolate shapes --index 3,7 --out interp.png
A command line: nothing imports this file.
"""
import time

import torch

from checkpoint import PAPER_KIND, build_diffusion, load_model
from data import load_eval_images
from ddpm import rate_distortion
from guidance import model_fn
from imagefiles import atomic_write, from_uint8, save_grid
from runtime import USER_ERRORS, ArgumentParser, Progress, StopSignal, error_line, resolve_device, set_tf32
from unet import image_hw

# -----------------------------------------------------------------------------
# Table 1's NLL column: Eq. (5) in bits/dim on held-out data; Sec. 4.3's rate-distortion


@torch.no_grad()
def run_nll(args, net, diffusion, device, num_classes):
    c, (h, w) = net.config["in_channels"], image_hw(net.config["image_size"])
    images = load_eval_images(args.nll, args.data_dir, (h, w), c)[:args.n]
    if tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"--nll {args.nll}: images are {tuple(images.shape[1:])} (H,W,C), the model's {(h, w, c)}")
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
    c, (h, w) = net.config["in_channels"], image_hw(net.config["image_size"])
    images = load_eval_images(spec, args.data_dir, (h, w), c)
    if tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"{spec}: images are {tuple(images.shape[1:])} (H,W,C), the model's {(h, w, c)}")
    index = integers(args.index, "--index")
    if max(index) >= len(images) or min(index) < 0:
        raise ValueError(f"--index {args.index}: {spec} has {len(images)} images")
    return from_uint8(images[index].to(device))


def integers(spec, flag):
    try:
        return [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {spec}: give integers separated by commas") from None


def paper_times(args, T):
    """--times as the paper counts them (t in 1..T), -> 0-based indices."""
    times = integers(args.times, "--times")
    if not all(1 <= t <= T for t in times):
        raise ValueError(f"--times {args.times}: each t must be in 1..{T}")
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
        raise ValueError("--interpolate needs two images: --index A,B")
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
    p = ArgumentParser(description="The paper's Sec. 4.3-4.4 on a train.py checkpoint or the released "
                                "weights: the NLL bound and rate-distortion, shared latents, interpolation.")
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder, or the released weights (either layout)")
    a("--nll", default="", help="the NLL bound in bits/dim (Eq. 5) on 'cifar10' (its test split), 'shapes' (held-out "
      "built-in images) or a .npy/.npz/.pt of uint8 images N,H,W,C")
    a("--csv", default="", help="with --nll: also write the rate-distortion curve of progressive coding (Sec. 4.3, "
      "Figure 5) as CSV: the rate (bits/dim) and distortion (RMSE on [0, 255]) after each reverse step")
    a("--shared-latents", default="", metavar="DATA", help="Figure 7: --index images of cifar10 (test), shapes (held "
      "out) or a file, noised to each of --times, then --draws samples of x_0 from each")
    a("--interpolate", default="", metavar="DATA", help="Figures 8 and 9 (Sec. 4.4): the two --index images of DATA "
      "interpolated in latent space at each of --times")
    a("--index", default="0,1", help="with --shared-latents / --interpolate: which images of DATA")
    a("--times", default="250,500,750,1000", help="with --shared-latents / --interpolate: the t (1..T, the paper's "
      "counting) to noise to")
    a("--draws", type=int, default=4, help="with --shared-latents: samples drawn from each x_t")
    a("--lambdas", type=int, default=9, help="with --interpolate: interpolants from lambda = 0 to 1")
    a("-n", "--n", dest="n", type=int, default=None, help="with --nll: images to evaluate (default all)")
    a("--batch-size", type=int, default=128, help="images per batch (default 128)")
    a("--seed", type=int, default=0, help="random seed (x_t of batch b: seed * 1000003 + b)")
    a("--out", default="evaluate.png", help="the PNG of --shared-latents / --interpolate")
    a("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] (the literal Algorithm 2)")
    a("--no-ema", action="store_true", help="the raw weights instead of their EMA (train.py checkpoints)")
    a("--data-dir", default="./data", help="where cifar10 finds cifar-10-batches-py or the archive")
    a("--device", default="auto", help="auto (default), cpu, cuda or mps")
    a("--tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA (off: true fp32, as the paper's)")
    a("--bf16", action="store_true", help="bf16 autocast for the network on CUDA (off by default)")
    return p


def evaluate(args):
    jobs = [j for j in ("nll", "shared_latents", "interpolate") if getattr(args, j)]
    if len(jobs) != 1:
        raise ValueError("give one of --nll DATA, --shared-latents DATA, --interpolate DATA")
    for k in ("n", "batch_size", "draws", "lambdas"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive")
    if args.csv and not args.nll:
        raise ValueError("--csv is the rate-distortion table of --nll")
    device = resolve_device(args.device)
    set_tf32(device, args.tf32)
    args.bf16 = args.bf16 and device.type == "cuda"
    net, diffusion_config, meta, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    if meta["kind"] != PAPER_KIND or meta["first_stage"]:
        raise ValueError(f"{args.ckpt} is a {'latent ' if meta['first_stage'] else ''}{meta['kind']} model; the bound "
                         f"and Sec. 4's experiments are for a diffusion model's own reverse process on pixels")
    net.to(device)
    diffusion = build_diffusion(diffusion_config).to(device)
    num_classes = net.config.get("num_classes")
    print(f"loaded {desc}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, T={diffusion.num_timesteps}")
    if args.nll:
        return run_nll(args, net, diffusion, device, num_classes)
    y = torch.full((args.draws,), num_classes, device=device) if num_classes is not None else None
    if args.shared_latents:
        return run_shared_latents(args, net, diffusion, device, model_fn(net, y, 0.0, args.bf16))
    y = y[:1] if y is not None else None
    return run_interpolation(args, net, diffusion, device, model_fn(net, y, 0.0, args.bf16))


def main(argv=None):
    """python evaluate.py CKPT --nll DATA | --shared-latents DATA | --interpolate DATA. Bad input: one 'error:' line."""
    try:
        evaluate(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
