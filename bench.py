"""
Time the training step (Algorithm 1: forward, backward, clip, Adam, EMA) and the sampling step (one step of
Algorithm 2) of the paper's CIFAR-10 U-Net as train.py and sample.py run them; print ms/step, img/s, peak memory
and achieved TFLOP/s. --compare times the same network as HF diffusers' UNet2DModel in this process, alternating.
  python bench.py                          # the paper's net at batch 128 on a GPU (batch 8 on a CPU)
  python bench.py --no-bf16 --no-sdpa      # turn fast paths off, one at a time, to see what each is worth
  python bench.py --compare                # ours vs diffusers (pip install -r requirements-dev.txt)
"""
import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from checkpoint import PAPER_DIFFUSION, build_diffusion
from pretrained import convert_diffusers_state_dict
from guidance import model_fn
from runtime import USER_ERRORS, ArgumentParser, error_line, resolve_device, set_tf32
from training import FAST_PATHS, DiffusionLoss, make_optimizer, train_step
from unet import AttnBlock, UNet

PAPER_FWD_GFLOP, PAPER_TRAIN_GFLOP = 12.4, 37.0  # per 32x32 image (the paper's speed anchors)
SMALL = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))  # for smoke tests


def get_parser():
    on = FAST_PATHS.get  # fast paths default to what train.py does
    p = ArgumentParser(description="Benchmark the DDPM training and sampling steps (defaults: the paper's "
                                "CIFAR-10 net, train.py's fast paths).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, flag = p.add_argument, argparse.BooleanOptionalAction
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--batch-size", type=int, default=None, help="images per step; None: 128 on cuda (the paper's), 8 on cpu")
    a("--warmup", type=int, default=None, help="untimed steps of each kind (compile, caches); None: 3 cuda, 2 cpu")
    a("--iters", type=int, default=None, help="timed steps of each kind per round; None: 20 on cuda, 1 on cpu")
    a("--rounds", type=int, default=None, help="timing rounds (implementations alternate), medians reported; "
      "None: 5 on cuda, 9 on cpu")
    a("--small", action="store_true", help="a tiny net (16x16, ch 32, 2 levels) instead of the paper's (smoke tests)")
    a("--dropout", type=float, default=0.1, help="dropout in the residual blocks (the paper's CIFAR-10 value)")
    a("--bf16", action=flag, default=on("bf16"), help="bf16 autocast on CUDA (fp32 weights), as train.py")
    a("--tf32", action=flag, default=on("tf32"), help="TF32 matmuls and convolutions on CUDA, as train.py")
    a("--fused-adam", action=flag, default=on("fused_adam"), help="fused Adam kernel, as train.py")
    a("--channels-last", action=flag, default=on("channels_last"),
      help="channels_last weights and batches, as train.py --channels-last")
    a("--compile", action=flag, default=on("compile"), help="torch.compile the step's loss "
      "computation (as train.py --compile) and the sampling network (as sample.py --compile)")
    a("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
      help="torch.compile mode (reduce-overhead: CUDA graphs); None: torch's default")
    a("--sdpa", action=flag, default=True, help="F.scaled_dot_product_attention in the attention blocks (off: the "
      "explicit softmax(q k^T / sqrt(C)) v, and diffusers' AttnProcessor)")
    a("--peak-tflops", type=float, default=989.0, help="the accelerator's peak, for the fraction printed "
      "(H100 SXM: 989 bf16 dense, 495 TF32)")
    a("--compare", action="store_true", help="also time diffusers' UNet2DModel in the same configuration")
    a("--seed", type=int, default=0, help="random seed")
    return p


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel built to compute UNet(**config) (for the paper's: the google/ddpm-cifar10-32
    configuration), called like ours: model(x, t, y=None) -> eps. diffusers is imported here only."""
    num_classes = None

    def __init__(self, config):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise RuntimeError("--compare needs diffusers: pip install -r requirements-dev.txt") from None
        sizes = [config["image_size"] // 2 ** i for i in range(len(config["ch_mult"]))]
        down = tuple("AttnDownBlock2D" if s in config["attn_resolutions"] else "DownBlock2D" for s in sizes)
        self.net = UNet2DModel(
            sample_size=config["image_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
            block_out_channels=tuple(config["ch"] * m for m in config["ch_mult"]),
            layers_per_block=config["num_res_blocks"], down_block_types=down,
            up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),  # listed lowest resolution first
            attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,  # single head; GroupNorm as the paper's
            downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,  # TF 'SAME' pad; sin then cos, i/(half-1)
            dropout=config["dropout"])

    def forward(self, x, t, y=None):
        return self.net(x, t).sample


def count_gflops(config):
    """Forward and forward+backward GFLOP per image, counted by FlopCounterMode on the meta device (no compute)."""
    with torch.device("meta"):
        net = UNet(**config)
        x = torch.randn(1, config["in_channels"], config["image_size"], config["image_size"])
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as fwd:
        net(x, t)
    with FlopCounterMode(display=False) as fwd_bwd:
        net(x, t).sum().backward()
    return fwd.get_total_flops() / 1e9, fwd_bwd.get_total_flops() / 1e9


class Bench:
    """One implementation set up as train.py sets it up (model, EMA copy, Adam), and its two timed steps."""

    def __init__(self, net, config, diffusion, device, args):
        self.fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=self.fmt)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.optimizer = make_optimizer(self.net, 2e-4, args.fused_adam, device)  # as train.py
        compile = (lambda f: torch.compile(f, mode=args.compile_mode)) if args.compile else (lambda f: f)
        self.loss_fn = DiffusionLoss(diffusion, bf16=args.bf16)
        self.losses, self.ema_model = compile(self.loss_fn.__call__), compile(self.ema)  # as train.py and sample.py
        self.diffusion, self.device = diffusion, device
        self.bf16 = args.bf16 and device.type == "cuda"
        self.step_args = SimpleNamespace(grad_clip=1.0, ema_decay=0.9999, grad_accum=1)  # the paper's
        c, s = config["in_channels"], config["image_size"]
        g = torch.Generator().manual_seed(args.seed)
        self.x0 = (torch.rand(args.batch_size, c, s, s, generator=g) * 2 - 1).to(device)  # a batch in [-1, 1]
        self.x_t, self.i = torch.randn_like(self.x0), diffusion.num_timesteps

    def train(self):
        x0 = self.x0.contiguous(memory_format=self.fmt)  # as train.py: each batch is a fresh tensor
        train_step(self.net, self.ema, self.optimizer, self.loss_fn, x0, None, self.step_args, None, self.losses)

    @torch.no_grad()
    def sample(self):
        """The body of p_sample_loop (t = T-1 down to 0, then again), the EMA net under autocast as sample.py."""
        self.i = (self.i - 1) % self.diffusion.num_timesteps
        t = torch.full((self.x_t.shape[0],), self.i, device=self.device, dtype=torch.long)
        z = torch.randn_like(self.x_t)
        net = model_fn(self.ema_model, None, 0.0, self.bf16)  # sample.py's own wrapper
        self.x_t = self.diffusion.p_sample(net, self.x_t, t, z)

    def time(self, step, iters):
        """Seconds per step over iters steps; the device is synchronized before and after, never inside."""
        sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(self.device.type,
                                                                                            lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        return (time.perf_counter() - t0) / iters


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
    return f"{rss / 2**30:.2f} GiB (maxrss of the whole process)"


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def build_nets(config, args):
    """{"ours": UNet} and with --compare {"diffusers": ...} holding the same weights, after checking that they are
    the same network: equal parameter counts, and the same eps on a batch of 2 (fp32). Returns nets, max |diff|."""
    nets, diff = {"ours": UNet(**config)}, None
    if args.compare:
        theirs = DiffusersUNet(config)
        if not args.sdpa:  # the same explicit attention on their side
            from diffusers.models.attention_processor import Attention, AttnProcessor
            for m in theirs.modules():
                if isinstance(m, Attention):
                    m.set_processor(AttnProcessor())
        counts = [sum(p.numel() for p in n.parameters()) for n in (nets["ours"], theirs)]
        if counts[0] != counts[1]:
            raise RuntimeError(f"parameter counts differ: ours {counts[0]:,}, diffusers {counts[1]:,}")
        nets["ours"].load_state_dict(convert_diffusers_state_dict(theirs.net.state_dict()))  # released key names
        x = torch.randn(2, config["in_channels"], config["image_size"], config["image_size"])
        t = torch.tensor([10, 900])
        with torch.no_grad():
            diff = (nets["ours"].eval()(x, t) - theirs.eval()(x, t)).abs().max().item()
        nets["ours"].train()
        theirs.train()
        nets["diffusers"] = theirs
    return nets, diff


def bench(args):
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    for k, default in (("batch_size", 128 if cuda else 8), ("warmup", 3 if cuda else 2), ("iters", 20 if cuda else 1),
                       ("rounds", 5 if cuda else 9)):
        setattr(args, k, default if getattr(args, k) is None else getattr(args, k))
    for k in ("batch_size", "iters", "rounds"):
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive")
    if args.warmup < 0 or not 0 <= args.dropout < 1:
        raise ValueError("--warmup must be >= 0 and --dropout in [0, 1)")
    set_tf32(device, args.tf32)
    AttnBlock.use_sdpa = args.sdpa
    torch.manual_seed(args.seed)

    config = UNet(**dict(SMALL if args.small else {}, dropout=args.dropout)).config  # default: the paper's net
    fwd_gflop, train_gflop = count_gflops(config)
    diffusion = build_diffusion(PAPER_DIFFUSION).to(device)  # T = 1000, linear betas 1e-4..0.02
    nets, diff = build_nets(config, args)
    onoff = lambda b: "on" if b else "off"
    print(f"device: {device} ({machine(device)}), torch {torch.__version__}")
    print(f"fast paths: bf16 {onoff(args.bf16 and cuda)}, tf32 {onoff(args.tf32 and cuda)} (these two: CUDA only), "
          f"fused adam {onoff(args.fused_adam)}, sdpa {onoff(args.sdpa)}, "
          f"channels_last {onoff(args.channels_last)}, compile {onoff(args.compile)}")
    print(f"network: {'small test net' if args.small else 'the paper CIFAR-10 U-Net'}, "
          + ", ".join(f"{k} {sum(p.numel() for p in n.parameters()):,} params" for k, n in nets.items()))
    paper = "" if args.small else f" (paper: {PAPER_FWD_GFLOP} and ~{PAPER_TRAIN_GFLOP:.0f})"
    print(f"FLOPs per image (FlopCounterMode): forward {fwd_gflop:.2f}, train step {train_gflop:.2f} GFLOP{paper}")
    if diff is not None:
        print(f"same network: diffusers' weights load into ours, max |eps_ours - eps_diffusers| = {diff:.1e} (fp32)")
    print(f"batch {args.batch_size}, warmup {args.warmup}, {args.iters} timed step(s) x {args.rounds} rounds per kind")

    benches = {k: Bench(n, config, diffusion, device, args) for k, n in nets.items()}
    for b in benches.values():
        for step in [b.train] * args.warmup + [b.sample] * args.warmup:
            step()
    times = {k: {"train": [], "sample": []} for k in benches}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for kind in ("train", "sample"):
        for r in range(args.rounds):
            for k in list(benches)[::1 if r % 2 == 0 else -1]:  # ABBA: the two adjacent in time, so drift cancels
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times[k][kind].append(benches[k].time(getattr(benches[k], kind), args.iters))
                if cuda and r == 0:
                    print(f"  {k} {kind}: peak memory {peak_memory(device)}")
            print(f"  {kind} round {r + 1}: " + ", ".join(
                f"{k} {args.batch_size / v[kind][-1]:.2f} img/s" for k, v in times.items()), flush=True)
    cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)  # CPU seconds per second while timing

    ips = {k: {kind: args.batch_size / statistics.median(v) for kind, v in d.items()} for k, d in times.items()}
    for k in benches:
        print(f"--- {k}")
        for kind, gflop, what in (("train", train_gflop, "train step (fwd+bwd+Adam+EMA)"),
                                  ("sample", fwd_gflop, "sampling step (1 reverse step)")):
            tflops = ips[k][kind] * gflop / 1e3
            mfu = f" = {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g}" if cuda else ""
            print(f"{what:31s}: {1e3 * statistics.median(times[k][kind]):9.1f} ms | {ips[k][kind]:9.2f} img/s | "
                  f"{tflops:7.3f} TFLOP/s{mfu}")
        hours, minutes = 800_000 * 128 / ips[k]["train"] / 3600, 50_000 * 1000 / ips[k]["sample"] / 60
        print(f"at these rates: 800k steps at batch 128: {hours:,.1f} h; 50k samples x 1000 steps: {minutes:,.1f} min")
    if not cuda:
        print(f"peak memory: {peak_memory(device)}")
        shared = " (fewer than threads: the CPU was shared with other processes, figures low and noisy)" \
            if cores < 0.8 * torch.get_num_threads() else ""
        print(f"while timing, this process used {cores:.2f} cores on average{shared}")
    if args.compare:
        # ours/theirs within each round (adjacent in time, so load from other processes mostly cancels), median
        ratio = {kind: statistics.median(b / a for a, b in zip(times["ours"][kind], times["diffusers"][kind]))
                 for kind in ("train", "sample")}
        print("\n| impl | train img/s | sample img/s |\n|---|---|---|")
        for k in benches:
            print(f"| {k} | {ips[k]['train']:.2f} | {ips[k]['sample']:.2f} |")
        print(f"| ratio ours/diffusers (median of per-round ratios) | {ratio['train']:.3f} | {ratio['sample']:.3f} |")


def main(argv=None):
    try:
        bench(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
