"""
Time the training step (Algorithm 1: forward, backward, clip, Adam, EMA) and the sampling step (one step of
Algorithm 2) of the paper's CIFAR-10 U-Net, exactly as train.py runs them, and print img/s, ms/step, peak
memory and achieved TFLOP/s. --compare times the same network as HF diffusers' UNet2DModel, in this process.
  python bench.py                          # the paper's net at batch 128 on a GPU (batch 8 on a CPU)
  python bench.py --no-bf16 --no-sdpa      # turn fast paths off, one at a time, to see what each is worth
  python bench.py --compare                # ours vs diffusers, alternating (pip install -r requirements-dev.txt)
"""
import argparse
import copy
import os
import platform
import resource
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import train
from train import build_diffusion, resolve_device, train_step
from unet import AttnBlock, UNet, convert_diffusers_state_dict

PAPER_FWD_GFLOP, PAPER_TRAIN_GFLOP = 12.4, 37.0  # per 32x32 image (PAPER.md speed anchors)
SMALL = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))  # for CI smoke tests


def get_parser():
    # The fast paths default to what train.py does: its own flag defaults, read from its parser
    train_defaults = vars(train.get_parser().parse_args([]))
    on = lambda name: bool(train_defaults.get(name, False))
    p = argparse.ArgumentParser(description="Benchmark the DDPM training and sampling steps (defaults: the paper's "
                                "CIFAR-10 net and train.py's fast paths).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--batch-size", type=int, default=None, help="images per step; None: 128 on cuda (the paper's), 4 on cpu (so --compare takes minutes)")
    a("--warmup", type=int, default=None, help="untimed steps of each kind first (compile, allocator, caches); None: 3 on cuda, 1 on cpu")
    a("--iters", type=int, default=None, help="timed steps of each kind per round; None: 20 on cuda, 1 on cpu")
    a("--rounds", type=int, default=None, help="timing rounds, alternating implementations, medians reported; None: 5 with --compare, else 3")
    a("--small", action="store_true", help="a tiny net (16x16, ch 32, 2 levels) instead of the paper's, for smoke tests")
    a("--dropout", type=float, default=0.1, help="dropout in the residual blocks (the paper's CIFAR-10 value)")
    a("--timesteps", type=int, default=1000, help="T (sets which timesteps the sampling steps walk through)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=on("bf16"), help="bf16 autocast on CUDA, as train.py (fp32 weights)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=on("tf32"), help="TF32 matmuls/convolutions on CUDA, as train.py")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=on("channels_last"),
      help="channels_last weights and activations; the input batch stays NCHW, so the noise drawn is unchanged")
    a("--compile", action=argparse.BooleanOptionalAction, default=on("compile"), help="torch.compile the network (train.py --compile)")
    a("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
      help="torch.compile mode (reduce-overhead: CUDA graphs); None: torch's default")
    a("--sdpa", action=argparse.BooleanOptionalAction, default=True,
      help="F.scaled_dot_product_attention in the attention blocks (off: explicit softmax(q k^T) v; diffusers: AttnProcessor)")
    a("--fused-adam", action=argparse.BooleanOptionalAction, default=on("fused_adam"), help="fused Adam kernel on CUDA, as train.py")
    a("--peak-tflops", type=float, default=989.0, help="the accelerator's peak, for the fraction printed (H100 SXM bf16 dense: 989)")
    a("--compare", action="store_true", help="also time diffusers' UNet2DModel in the same configuration, alternating rounds")
    a("--seed", type=int, default=0, help="random seed")
    return p


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel with the same architecture as UNet(**config) (google/ddpm-cifar10-32 for the
    paper's), called like ours: model(x, t, y=None) -> eps. diffusers is imported here only, for --compare."""
    num_classes = None

    def __init__(self, config):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise SystemExit("error: --compare needs diffusers: pip install -r requirements-dev.txt")
        sizes = [config["image_size"] // 2 ** i for i in range(len(config["ch_mult"]))]
        down = tuple("AttnDownBlock2D" if s in config["attn_resolutions"] else "DownBlock2D" for s in sizes)
        self.net = UNet2DModel(
            sample_size=config["image_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
            block_out_channels=tuple(config["ch"] * m for m in config["ch_mult"]), layers_per_block=config["num_res_blocks"],
            down_block_types=down, up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),  # lowest res first
            attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,  # single head; TF padding
            flip_sin_to_cos=False, freq_shift=1, dropout=config["dropout"])  # sin then cos, 10000^(-i/(half-1))

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
    with FlopCounterMode(display=False) as train:
        net(x, t).sum().backward()
    return fwd.get_total_flops() / 1e9, train.get_total_flops() / 1e9


class Bench:
    """One implementation set up as train.py sets it up: model, EMA copy, Adam; and its two timed steps."""

    def __init__(self, net, config, diffusion, device, args):
        self.net = net.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        fused = True if device.type == "cuda" and args.fused_adam else None  # as train.py: foreach Adam elsewhere
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        compile = (lambda m: torch.compile(m, mode=args.compile_mode)) if args.compile else (lambda m: m)
        self.model, self.ema_model = compile(self.net), compile(self.ema)
        self.diffusion, self.device, self.args = diffusion, device, args
        self.step_args = SimpleNamespace(grad_clip=1.0, ema_decay=0.9999, p_uncond=0.0, bf16=args.bf16)  # paper's recipe
        g = torch.Generator().manual_seed(args.seed)
        c, s = config["in_channels"], config["image_size"]
        self.x0 = (torch.rand(args.batch_size, c, s, s, generator=g) * 2 - 1).to(device)  # a batch in [-1, 1]
        self.x_t, self.i = torch.randn_like(self.x0), 0

    def train(self):
        train_step(self.model, self.ema, self.optimizer, self.diffusion, self.x0, None, self.step_args)

    @torch.no_grad()
    def sample(self):  # the body of p_sample_loop, with the EMA network under autocast as sample.py runs it
        i = self.diffusion.num_timesteps - 1 - self.i % self.diffusion.num_timesteps
        self.i += 1
        t = torch.full((self.x_t.shape[0],), i, device=self.device, dtype=torch.long)
        z = torch.randn_like(self.x_t)
        def net(x, t):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.bf16 and self.device.type == "cuda"):
                return self.ema_model(x, t)
        self.x_t = self.diffusion.p_sample(net, self.x_t, t, z)

    def time(self, step, iters):
        """Seconds per step over iters steps; the device is synchronized before and after only."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        return (time.perf_counter() - t0) / iters


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (maxrss of the whole process)"


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    for k, default in (("batch_size", 128 if cuda else 4), ("warmup", 3 if cuda else 1), ("iters", 20 if cuda else 1),
                       ("rounds", 5 if args.compare else 3)):
        setattr(args, k, default if getattr(args, k) is None else getattr(args, k))
    for k in ("batch_size", "iters", "rounds", "timesteps"):
        if getattr(args, k) <= 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")
    if args.warmup < 0 or not 0 <= args.dropout < 1:
        raise SystemExit("error: --warmup must be >= 0 and --dropout in [0, 1)")
    if cuda and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    AttnBlock.use_sdpa = args.sdpa
    torch.manual_seed(args.seed)

    config = UNet(**dict(SMALL if args.small else {}, dropout=args.dropout)).config  # defaults: the paper's CIFAR-10 net
    fwd_gflop, train_gflop = count_gflops(config)
    scale = 1000 / args.timesteps
    diffusion = build_diffusion(dict(num_timesteps=args.timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale)).to(device)
    nets = {"ours": UNet(**config)}
    if args.compare:
        theirs = DiffusersUNet(config)
        if not args.sdpa:  # the same explicit attention on their side
            from diffusers.models.attention_processor import Attention, AttnProcessor
            for m in theirs.modules():
                if isinstance(m, Attention):
                    m.set_processor(AttnProcessor())
        # Same architecture: their weights load into ours under the released key names, and both compute the same eps
        nets["ours"].load_state_dict(convert_diffusers_state_dict(theirs.net.state_dict()))
        x, t = torch.randn(2, config["in_channels"], config["image_size"], config["image_size"]), torch.tensor([10, 900])
        with torch.no_grad():
            diff = (nets["ours"].eval()(x, t) - theirs.eval()(x, t)).abs().max().item()
        nets["diffusers"] = theirs.train()
        nets["ours"].train()
    counts = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}

    print(f"device: {device} ({machine(device)}), torch {torch.__version__}")
    print(f"fast paths: bf16 {'on' if args.bf16 and cuda else 'off'}, tf32 {'on' if args.tf32 and cuda else 'off'}, "
          f"fused adam {'on' if args.fused_adam and cuda else 'off'}, sdpa {'on' if args.sdpa else 'off'}, channels_last "
          f"{'on' if args.channels_last else 'off'}, compile {'on' if args.compile else 'off'} (bf16/tf32/fused: CUDA only)")
    print(f"network: {'small test net' if args.small else 'paper CIFAR-10 U-Net'}, " + ", ".join(f"{k} {v:,} params" for k, v in counts.items()))
    paper = f" (paper: {PAPER_FWD_GFLOP} and ~{PAPER_TRAIN_GFLOP:.0f})" if not args.small else ""
    print(f"FLOPs per image (FlopCounterMode): forward {fwd_gflop:.2f} GFLOP, train step {train_gflop:.2f} GFLOP{paper}")
    if args.compare:
        if counts["ours"] != counts["diffusers"]:
            raise SystemExit(f"error: parameter counts differ: {counts}")
        print(f"same network: diffusers' weights load into ours; max |eps_ours - eps_diffusers| = {diff:.1e} (fp32, batch 2)")
    print(f"batch {args.batch_size}, warmup {args.warmup}, {args.iters} timed steps x {args.rounds} round(s) per kind")

    benches = {k: Bench(n, config, diffusion, device, args) for k, n in nets.items()}
    for b in benches.values():
        for _ in range(args.warmup):
            b.train()
        for _ in range(args.warmup):
            b.sample()
    times = {k: {"train": [], "sample": []} for k in benches}
    for r in range(args.rounds):
        order = list(benches) if r % 2 == 0 else list(benches)[::-1]  # ABBA...: drift in the machine cancels
        for k in order:
            for kind in ("train", "sample"):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times[k][kind].append(benches[k].time(getattr(benches[k], kind), args.iters))
                if cuda and r == 0:
                    print(f"  {k} {kind} peak memory {peak_memory(device)}")
            if args.rounds > 1:
                print(f"  round {r + 1} {k:9s}: train {args.batch_size / times[k]['train'][-1]:8.2f} img/s, "
                      f"sample {args.batch_size / times[k]['sample'][-1]:8.2f} img/s", flush=True)

    ips = {k: {kind: args.batch_size / statistics.median(v) for kind, v in d.items()} for k, d in times.items()}
    for k in benches:
        print(f"--- {k}")
        for kind, gflop in (("train", train_gflop), ("sample", fwd_gflop)):
            tflops = ips[k][kind] * gflop / 1e3
            mfu = f" = {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g}" if cuda else ""
            what = "train step (fwd+bwd+Adam+EMA)" if kind == "train" else "sampling step (1 reverse step)"
            print(f"{what:31s}: {1e3 * statistics.median(times[k][kind]):9.1f} ms | {ips[k][kind]:9.2f} img/s | "
                  f"{tflops:7.3f} TFLOP/s{mfu}")
        hours = 800_000 * 128 / ips[k]["train"] / 3600
        minutes = 50_000 * diffusion.num_timesteps / ips[k]["sample"] / 60
        print(f"at these rates: 800k steps at batch 128 take {hours:,.1f} h; 50k samples x {diffusion.num_timesteps} "
              f"steps take {minutes:,.1f} min")
    if not cuda:
        print(f"peak memory: {peak_memory(device)}")
    if args.compare:
        print(f"\n| impl | train img/s | sample img/s |\n|---|---|---|")
        for k in benches:
            print(f"| {k} | {ips[k]['train']:.2f} | {ips[k]['sample']:.2f} |")
        print(f"| ratio ours/diffusers | {ips['ours']['train'] / ips['diffusers']['train']:.3f} | "
              f"{ips['ours']['sample'] / ips['diffusers']['sample']:.3f} |")


if __name__ == "__main__":
    main()
