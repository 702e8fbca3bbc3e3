"""
The GPU check: every CUDA path of the project, run for real on one GPU in a few minutes, as one table. Each kind of
run trains a few dozen steps in bf16 (a diffusion model; class-conditional with --compile and --grad-accum 2;
caption-conditional; --channels-last; progressive and consistency distillation; a classifier; a super-resolution
stage), one resumes, sampling runs eager and with --compile (the largest pixel difference, and the recompiles),
and a sync audit (torch.cuda.set_sync_debug_mode) counts the host syncs inside the DDPM training step and the
samplers' loops, which should be none. With two or more GPUs, torchrun training (and its resume) and torchrun
sampling against one process. CI never needs a GPU: `--dry-run` runs the same rows on a CPU with a tiny net
(compile and the sync audit need CUDA and say so), and a test runs it, so this script cannot rot.
  python gpu_check.py                      # on the GPU: the table, and --table FILE for docs/speed.md
  python gpu_check.py --dry-run --device cpu
A command line: nothing imports this file.
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from checkpoint import PAPER_DIFFUSION, build_diffusion
from distill import consistency_sample
from guidance import model_fn
from imagefiles import read_npz
from runtime import USER_ERRORS, ArgumentParser, error_line, resolve_device
from samplers import ddim_sample_loop, dpm_solver_pp_sample_loop
from training import DiffusionLoss, make_optimizer, train_step
from unet import UNet

HERE = os.path.dirname(os.path.abspath(__file__))
# The paper's CIFAR-10 net on the built-in shapes at 32x32 (no download); the dry run's tiny net on 8x8 shapes.
REAL = ["--data", "shapes", "--image-size", "32", "--batch-size", "64", "--warmup", "10", "--ema-decay", "0.9",
        "--log-every", "10", "--sample-every", "0", "--num-samples", "16"]
TINY = ["--data", "shapes", "--image-size", "8", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn",
        "", "--timesteps", "50", "--batch-size", "8", "--warmup", "2", "--ema-decay", "0.9", "--log-every", "1",
        "--sample-every", "0", "--num-samples", "4"]


def get_parser():
    p = ArgumentParser(description="Run every CUDA path for a few steps and print one table (--dry-run: on a CPU).")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="a tiny net for a few steps: checks the script itself runs")
    p.add_argument("--steps", type=int, default=40, help="training steps of each run (dry run: 3)")
    p.add_argument("--out", default="", help="a folder for the runs (default: a temporary one)")
    p.add_argument("--table", default="", help="also write the table to this markdown file")
    return p


class Check:
    """The table: one row per check, its result and its time; a failing check is a row too, not the end."""

    def __init__(self, out, dry):
        self.rows, self.out, self.dry, self.failed = [], out, dry, 0

    def run(self, name, *args, env=None, timeout=900):
        """A command line of the project in a subprocess: -> (ok, its output)."""
        cmd = [sys.executable, os.path.join(HERE, args[0]), *map(str, args[1:])]
        if args[0] == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *map(str, args[1:])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                           env=dict(os.environ, **(env or {})))
        return r.returncode == 0, r.stdout + r.stderr

    def row(self, name, fn):
        t0 = time.time()
        try:
            result = fn()
        except Exception as e:  # the table goes on; the row says what broke
            self.failed += 1
            result = f"FAILED: {error_line(e)[len('error: '):]}"
        self.rows.append((name, result, time.time() - t0))
        print(f"| {name} | {result} | {time.time() - t0:.1f} |", flush=True)

    def train(self, name, flags, out, steps):
        ok, log = self.run(name, "train.py", *flags, "--steps", steps, "--out", os.path.join(self.out, out))
        if not ok:
            raise RuntimeError(log.strip().splitlines()[-1] if log.strip() else "no output")
        lines = [line for line in log.splitlines() if line.startswith("step ")]
        return lines[-1].split(" | ", 1)[1] if lines else "ran"


def img_s(line):
    return line.split(" | ")[3].strip() if line.count(" | ") >= 3 else line


def sync_audit(device, dry):
    """Host syncs inside the DDPM training step and the samplers' loops, counted by CUDA's sync debug mode (each
    sync is a warning): -> {what: count}, after one untimed pass that warms the caches."""
    net = UNet(**(dict(image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()) if dry else {}))
    net = net.to(device)
    d = build_diffusion(PAPER_DIFFUSION).to(device)
    ema, optimizer = UNet(**net.config).to(device).requires_grad_(False), make_optimizer(net, 2e-4, True, device)
    loss = DiffusionLoss(d, bf16=True)
    x0 = torch.rand(8, 3, net.config["image_size"], net.config["image_size"], device=device) * 2 - 1
    args = type("Args", (), dict(grad_clip=1.0, ema_decay=0.9999, grad_accum=1))
    fn, shape = model_fn(ema, bf16=True), x0.shape
    v = build_diffusion(dict(PAPER_DIFFUSION, mean_type="v")).to(device)
    jobs = {"training step": lambda: train_step(net, ema, optimizer, loss, x0, None, args),
            "Algorithm 2 (10 steps)": lambda: [d.p_sample(fn, x0, torch.full((8,), i, device=device)) for i in range(10)],
            "DDIM loop": lambda: ddim_sample_loop(d, fn, shape, 10),
            "DPM-Solver++ loop": lambda: dpm_solver_pp_sample_loop(d, fn, shape, 10),
            "consistency loop": lambda: consistency_sample(v, fn, shape, 2)}
    counts = {}
    for name, job in jobs.items():
        job()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                job()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def check(args):
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        raise RuntimeError("the GPU check runs on CUDA; --dry-run --device cpu checks the script on a CPU")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    steps = 3 if args.dry_run else args.steps
    flags = [*(TINY if args.dry_run else REAL), "--device", device.type]
    c = Check(out, args.dry_run)
    print(f"GPU check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (dry run)'}, "
          f"torch {torch.__version__}, runs in {out}\n| check | result | s |\n|---|---|---|", flush=True)
    c.row("diffusion, bf16", lambda: img_s(c.train("diffusion", flags, "base", steps)))
    compile_flags = [] if args.dry_run else ["--compile"]
    c.row("class-conditional, --grad-accum 2" + (", --compile" if compile_flags else " (compile: CUDA only)"),
          lambda: img_s(c.train("cond", [*flags, "--class-cond", "--grad-accum", "2", *compile_flags], "cond", steps)))
    c.row("caption-conditional (cross-attention)", lambda: img_s(c.train("caption", [
        *flags, "--data", "captions", "--caption-cond", *(["--attn", "4"] if args.dry_run else [])], "caption", steps)))
    c.row("--channels-last", lambda: img_s(c.train("cl", [*flags, "--channels-last"], "cl", steps)))
    c.row("resume: base to twice its steps", lambda: img_s(c.train("resume", ["--resume", os.path.join(out, "base")],
                                                                      "base", 2 * steps)))
    teacher = os.path.join(out, "base")
    c.row("progressive distillation", lambda: img_s(c.train("pd", [*flags, "--distill", "progressive", "--teacher",
                                                                   teacher, "--teacher-steps", "8", "--student-steps",
                                                                   "2"], "pd", steps)))
    c.row("consistency distillation", lambda: img_s(c.train("cd", [*flags, "--distill", "consistency", "--teacher",
                                                                   teacher, "--cd-n", "6"], "cd", steps)))
    c.row("noise-aware classifier", lambda: img_s(c.train("clf", [*flags, "--classifier"], "clf", steps)))
    size = 8 if args.dry_run else 32
    sr = [a if a != str(size) else str(2 * size) for a in flags]
    c.row("super-resolution stage", lambda: img_s(c.train("sr", [*sr, "--low-res", str(size)], "sr", steps)))

    def sampling():
        common = [teacher, "-n", 16, "--batch-size", 16, "--steps", 10, "--device", device.type, "--bf16"]
        ok, log = c.run("eager", "sample.py", *common, "--npz", os.path.join(out, "eager.npz"), "--out",
                        os.path.join(out, "eager.png"))
        if not ok or args.dry_run:
            return "eager ran" if ok else f"FAILED: {log.strip().splitlines()[-1]}"
        ok, log = c.run("compiled", "sample.py", *common, "--compile", "--npz", os.path.join(out, "compiled.npz"),
                        "--out", os.path.join(out, "compiled.png"), env={"TORCH_LOGS": "recompiles"})
        if not ok:
            return f"FAILED: {log.strip().splitlines()[-1]}"
        a, b = (read_npz(os.path.join(out, f"{k}.npz"))[0]["arr_0"].int() for k in ("eager", "compiled"))
        return f"max difference {(a - b).abs().max().item()} levels of 255; {log.count('Recompiling')} recompiles"
    c.row("sampling: eager against --compile" + (" (compile: CUDA only)" if args.dry_run else ""), sampling)
    c.row("sync audit: host syncs" + (" (CUDA only)" if device.type != "cuda" else ""),
          lambda: "skipped" if device.type != "cuda" else
          "; ".join(f"{k} {v}" for k, v in sync_audit(device, args.dry_run).items()))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        gpus = torch.cuda.device_count()
        def torchrun_training():
            ok, log = c.run("ddp", "torchrun", f"--nproc_per_node={gpus}", os.path.join(HERE, "train.py"), *flags,
                            "--steps", steps, "--out", os.path.join(out, "ddp"))
            ok2, log2 = c.run("ddp", "torchrun", f"--nproc_per_node={gpus}", os.path.join(HERE, "train.py"),
                              "--resume", os.path.join(out, "ddp"), "--steps", 2 * steps)
            return "trained and resumed" if ok and ok2 else f"FAILED: {(log + log2).strip().splitlines()[-1]}"
        c.row(f"torchrun training on {gpus} GPUs, resumed", torchrun_training)
        def torchrun_sampling():
            common = [teacher, "-n", 64, "--batch-size", 16, "--steps", 10]
            ok, log = c.run("one", "sample.py", *common, "--npz", os.path.join(out, "one.npz"))
            ok2, log2 = c.run("many", "torchrun", f"--nproc_per_node={gpus}", os.path.join(HERE, "sample.py"), *common,
                              "--npz", os.path.join(out, "many.npz"))
            same = ok and ok2 and open(os.path.join(out, "one.npz"), "rb").read() == \
                open(os.path.join(out, "many.npz"), "rb").read()
            return "the same .npz as one process" if same else f"FAILED: {(log + log2).strip().splitlines()[-1]}"
        c.row(f"torchrun sampling on {gpus} GPUs", torchrun_sampling)
    if args.table:
        with open(args.table, "w") as f:
            f.write("| check | result | s |\n|---|---|---|\n" + "".join(f"| {n} | {r} | {t:.1f} |\n" for n, r, t in c.rows))
    if c.failed:
        raise RuntimeError(f"{c.failed} of {len(c.rows)} checks failed (the table above)")


def main(argv=None):
    try:
        check(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
