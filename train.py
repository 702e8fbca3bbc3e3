"""
Train a DDPM (Ho, Jain, Abbeel 2020): Algorithm 1 with the paper's CIFAR-10 recipe as defaults; with flags, the
later papers' models on the same machinery: a noise-aware classifier for guidance, a distilled student, a
super-resolution stage of a cascade.
  python train.py --data cifar10 --device cuda                       # the paper's run
  torchrun --nproc_per_node=8 train.py --data cifar10                 # data-parallel, same global batch
  python train.py --data shapes --image-size 16 --ch 32 --steps 2000 ...  # CPU, minutes (see README)
A command line: nothing imports this file.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cascade import conditioned, downsample, upsample
from checkpoint import load_checkpoint, save_checkpoint
from data import load_data, save_grid
from distill import ProgressiveLoss, consistency_sample
from guidance import model_fn
from runtime import StopSignal, close_distributed, format_eta, init_distributed, rng_state, set_rng_state
from samplers import ddim_sample_loop
from training import FAST_PATHS, Batches, build_run, get_lr, make_optimizer, match_layout, train_step

# -----------------------------------------------------------------------------
# command line

MODEL_FLAGS = ("ch", "ch_mult", "num_res_blocks", "attn", "dropout", "class_cond", "timesteps", "schedule",
               "image_size", "classifier", "distill", "teacher", "student_steps", "teacher_steps", "cd_n", "low_res",
               "mean_type", "convert_steps")
RUN_FLAGS = ("resume", "device", "compile", "bf16", "tf32", "fused_adam", "channels_last", "out")  # never from a ckpt
FLIP_DATA = ("cifar10", "shapes")  # data whose classes survive a mirror image: flips on by default


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def get_parser():
    p = argparse.ArgumentParser(
        description="Train a DDPM (Ho et al. 2020); defaults are the paper's CIFAR-10 run (Sec. 4, Appendix B).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Short runs need a shorter warmup and a faster EMA than the 800k-step recipe, e.g. --warmup 100 "
               "--ema-decay 0.995 for a few thousand steps: an EMA with decay 0.9999 averages over ~10k steps, so in "
               "a short run it stays near the initial weights and its samples are noise.")
    a, on_off = p.add_argument, argparse.BooleanOptionalAction
    a("--data", default="cifar10", help="cifar10, shapes (built-in, labelled, generated in code), a folder of images "
      "(PNG read without extra packages, JPEG and others with Pillow; class subfolders give labels), or a "
      ".npy/.npz/.pt file of uint8 images N,H,W,C (npz: arr_0 images, arr_1 labels)")
    a("--data-dir", default="./data", help="where cifar10 is looked for (archive or extracted) and downloaded to")
    a("--image-size", type=int, default=32, help="size of the built-in shapes, and of a folder's images (centre-"
      "cropped, bicubic with antialiasing); files and cifar10 keep their own size")
    a("--flip", action=on_off, default=None, help="random horizontal flips. Default: on for cifar10 (the paper's "
      "augmentation) and shapes, off for your own data (flips would teach mirrored digits and letters)")
    a("--ch", type=int, default=128, help="U-Net base channels (multiple of 32)")
    a("--ch-mult", type=int_list, default="1,2,2,2", help="channel multiplier per resolution level")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per level")
    a("--attn", type=int_list, default="16", help="resolutions with self-attention (comma-separated, '' for none)")
    a("--dropout", type=float, default=0.1, help="dropout in the residual blocks")
    a("--class-cond", action="store_true", help="train with the labels (for classifier-free guidance)")
    a("--p-uncond", type=float, default=0.1, help="with --class-cond: chance of dropping a label (Ho & Salimans 2021)")
    a("--classifier", action="store_true", help="train a noise-aware classifier p(y | x_t, t) for classifier "
      "guidance (Dhariwal & Nichol 2021): the U-Net's encoder half, on labelled data, with the schedule and T of the "
      "model it will guide")
    a("--distill", default="", choices=["", "progressive", "consistency"], help="distil --teacher: progressive "
      "(Salimans & Ho 2022) halves its DDIM steps round by round down to --student-steps; consistency (Song et "
      "al. 2023) learns a 1-step sampler")
    a("--teacher", default="", help="with --distill: a train.py checkpoint or run folder, or released weights")
    a("--student-steps", type=int, default=4, help="progressive: the student's sampling steps at the end")
    a("--teacher-steps", type=int, default=32, help="progressive: the teacher's DDIM steps the first round starts "
      "from (a power of two times --student-steps, at most T; a progressive student as teacher: its own steps). "
      "Fewer rounds give each more of --steps: from 32, 3 rounds to 4 steps (measured better than 5 from 128)")
    a("--pd-weighting", default="snr-trunc", choices=["snr-trunc", "snr+1"], help="progressive: the loss weight, "
      "max(SNR, 1) or SNR + 1 (Salimans & Ho Sec. 4)")
    a("--convert-steps", type=int, default=-1, help="consistency from an eps- or x0-teacher: the first updates "
      "(of --steps) regress the v-student onto the teacher's own clipped x0 (distill.TeacherRegression) before "
      "distilling; -1: a fifth of --steps. A v-teacher needs none")
    a("--cd-n", type=int, default=18, help="consistency: N, the points of the ODE discretisation (the paper's 18)")
    a("--cd-mu", type=float, default=0.95, help="consistency: the target network's EMA decay (the paper's ImageNet 64 "
      "and LSUN setting; its CIFAR-10 one is 0, which drifted at mid noise in short runs here)")
    a("--cd-solver", default="heun", choices=["heun", "ddim"], help="consistency: the teacher's ODE step")
    a("--cd-distance", default="l2", choices=["l2", "pseudo-huber"], help="consistency: the distance d (LPIPS, the "
      "paper's best, needs downloaded VGG weights: not here)")
    a("--low-res", type=int, default=0, help="train a super-resolution model (a cascade's stage, Ho et al. 2021) from "
      "this size up to the data's own: conditioned on the images area-downsampled to it")
    a("--cond-aug-max", type=int, default=250, help="with --low-res: Gaussian conditioning augmentation, the "
      "condition noised to a level s drawn from none, 0, ..., this - 1 (timestep indices of the schedule)")
    a("--timesteps", type=int, default=1000, help="T; for T != 1000 the betas are scaled by 1000/T (Nichol & Dhariwal)")
    a("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule (linear: the paper's)")
    a("--mean-type", default="eps", choices=["eps", "x0", "v"], help="what the network predicts: eps (the paper's), "
      "x0 (its ablation) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho; its loss weighs x0 at every t)")
    a("--batch-size", type=int, default=128, help="global batch size (split across torchrun processes)")
    a("--grad-accum", type=int, default=1, help="split each process's batch into this many micro-batches whose "
      "gradients add up to the batch's (less memory, the same step)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate (eps 1e-8, no weight decay)")
    a("--warmup", type=int, default=5000, help="steps of linear learning-rate warmup")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.9999, help="decay of the EMA of the weights used for sampling")
    a("--steps", type=int, default=800000, help="training steps")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default="out", help="run folder: ckpt.pt, samples_<step>.png, log.txt")
    a("--resume", default="", help="run folder or checkpoint to continue from (model and diffusion flags come from it)")
    a("--device", default="auto", help="auto, cpu, cuda or mps")
    a("--compile", action="store_true", default=FAST_PATHS["compile"], help="torch.compile the step's loss "
      "(q_sample, network, L_simple) into one graph (with torchrun: the DDP-wrapped network)")
    a("--bf16", action=on_off, default=FAST_PATHS["bf16"], help="bf16 autocast on CUDA (fp32 weights)")
    a("--tf32", action=on_off, default=FAST_PATHS["tf32"], help="TF32 matmuls and convolutions on CUDA")
    a("--fused-adam", action=on_off, default=FAST_PATHS["fused_adam"], help="fused Adam kernel (CUDA and CPU)")
    a("--channels-last", action=on_off, default=FAST_PATHS["channels_last"],
      help="channels_last (NHWC) weights and batches; off: not yet measured on a GPU, no gain on a CPU")
    a("--log-every", type=int, default=100, help="steps between log lines (and NaN checks)")
    a("--ckpt-every", type=int, default=5000, help="steps between checkpoints (also at the end, on Ctrl-C/SIGTERM)")
    a("--sample-every", type=int, default=20000, help="steps between sample grids, and one at the end (0: none)")
    a("--num-samples", type=int, default=64, help="images in a sample grid")
    a("--sample-steps", type=int, default=0,
      help="sample grids: 0 = Algorithm 2 over all T steps; N = N strided steps (DDIM, eta 1)")
    return p


def get_args(argv=None):
    """Parsed args and the set of flags given explicitly (to tell them apart from defaults on --resume)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def merge_resume_args(args, explicit, saved):
    """On --resume the checkpoint's args hold; flags given now may change training settings, not the model."""
    for k, v in saved.items():
        if k in RUN_FLAGS or not hasattr(args, k):
            continue
        if k not in explicit:
            setattr(args, k, v)
        elif getattr(args, k) != v:
            flag = f"--{k.replace('_', '-')} {getattr(args, k)}"
            if k in MODEL_FLAGS:
                raise SystemExit(f"error: {flag} conflicts with the checkpoint ({v}); drop the flag to resume")
            print(f"note: {flag} overrides the checkpoint's {v}")


def check_args(args, world):
    for k in ("batch_size", "steps", "log_every", "ckpt_every", "timesteps", "num_samples", "grad_accum"):
        if getattr(args, k) <= 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if (args.batch_size // world) % args.grad_accum:
        raise SystemExit(f"error: the batch of {args.batch_size // world} per process is not divisible by "
                         f"--grad-accum {args.grad_accum}")


def flip_note(args):
    """Whether flips are on, and why: said at the start of every run."""
    if args.flip is None:  # the default follows the data
        args.flip = args.data in FLIP_DATA
        why = ("the paper's augmentation for CIFAR-10" if args.data == "cifar10" else
               "the built-in shapes are mirror-symmetric" if args.data == "shapes" else
               "the default for your own data, where a mirror image can change the class (digits, letters); "
               "--flip turns them on")
    else:
        why = "--flip" if args.flip else "--no-flip"
    return f"horizontal flips {'on' if args.flip else 'off'} ({why})"

# -----------------------------------------------------------------------------
# sample grids


def grid_sampler(run, args, images):
    """How grids are drawn for this kind of run: draw(ema, y, shape, generator) -> samples, or None (classifier).
    Diffusion: Algorithm 2 over all T steps (--sample-steps 0), else that many strided steps of DDIM with eta = 1,
    the stochastic sampler closest to Algorithm 2 (eta = 0 gives noisy images from a briefly trained model where
    eta = 1 and Algorithm 2 give clean ones). Students: their own sampler. Super-resolution: the first training
    images of the process, downsampled and drawn back up (no augmentation), by the sampler of a diffusion run."""
    d, bf16 = run.diffusion, args.bf16 and images.device.type == "cuda"
    if run.kind == "classifier":
        return None
    if run.kind == "consistency":
        return lambda ema, y, shape, g: consistency_sample(d, model_fn(ema, y, bf16=bf16), shape, generator=g)
    if run.kind == "progressive":
        return lambda ema, y, shape, g: ddim_sample_loop(d, model_fn(ema, y, bf16=bf16), shape, run.loss_fn.steps,
                                                         0.0, generator=g)

    def draw(ema, y, shape, g):
        if run.kind == "sr":
            low = downsample(images[:shape[0]].float() / 127.5 - 1, run.model_config["low_res"])
            net = conditioned(ema, upsample(low, shape[-1]), torch.full((shape[0],), -1, device=images.device))
        else:
            net = model_fn(ema, y, bf16=bf16)
        if args.sample_steps:
            return ddim_sample_loop(d, net, shape, args.sample_steps, 1.0, generator=g)
        return d.p_sample_loop(net, shape, generator=g)
    return draw


@torch.no_grad()
def sample_images(ema, draw, n, seed, rank=0, world=1):
    """n EMA samples, the same noise every time (so grids show one set improving), with labels spread over the
    classes for a class-conditional model.
    Under torchrun every rank draws its share and rank 0 gathers them (so no rank idles in a collective while
    one samples, which on a long grid could trip NCCL's watchdog); the noise then depends on the rank count.
    Every draw comes from the grid's own generator, and fork_rng restores the global random state anyway, so
    drawing a grid never changes the training run (resume stays exact)."""
    device = next(ema.parameters()).device
    c, s = ema.config["in_channels"], ema.config["image_size"]
    y, nrow = None, None
    if ema.num_classes:
        nrow = max(1, n // ema.num_classes)  # one row per class
        y = torch.arange(ema.num_classes, device=device).repeat_interleave(nrow)
        n = y.shape[0]
    share = math.ceil(n / world)
    if y is not None:
        y = y[torch.arange(rank * share, (rank + 1) * share, device=device) % n]  # the last shares wrap around
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + rank)
        x = draw(ema, y, (share, c, s, s), g)
    if world > 1:
        shares = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shares, x)
        x = torch.cat(shares)
    return x[:n], nrow

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    args, explicit = get_args(argv)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        merge_resume_args(args, explicit, ckpt["args"])
        if "out" not in explicit:  # continue in the folder the checkpoint is in
            args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume) or "."
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if not args.resume and os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; continue it with --resume {args.out} or pick another --out")
    rank, local_rank, world, device = init_distributed(args.device)
    ddp, master = world > 1, rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32

    def log(msg, console=True):
        if master:
            if console:
                print(msg, flush=True)
            try:
                with open(os.path.join(args.out, "log.txt"), "a") as f:
                    f.write(msg + "\n")
            except OSError as e:
                raise SystemExit(f"error: could not write {args.out}/log.txt: {e.strerror or e}")

    # data: each process keeps its own shard of the images, on its device
    images, labels, class_names = load_data(args.data, args.data_dir, args.image_size)
    flips = flip_note(args)
    use_labels = args.class_cond or args.classifier
    if use_labels and labels is None:
        flag = "--class-cond" if args.class_cond else "--classifier"
        raise SystemExit(f"error: {flag} needs labels, and --data {args.data} has none (npz: put them in arr_1; "
                         f"a folder: one subfolder per class)")
    num_classes = int(labels.max()) + 1 if use_labels else None
    images = images[rank::world].to(device)
    labels = labels[rank::world].to(device) if use_labels else None
    _, c, s, _ = images.shape
    if master:  # only now: bad data leave no empty run folder behind
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot create --out {args.out}: {e.strerror or e}")

    # what this run trains: a diffusion model, a classifier, or a distilled student; then its EMA and optimizer
    run = build_run(args, ckpt, num_classes, s, c, device)
    raw_model, diffusion, loss_fn = run.model, run.diffusion, run.loss_fn
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    raw_model.to(device, memory_format=memory_format)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    optimizer = make_optimizer(raw_model, args.lr, args.fused_adam, device)
    step = 0
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        match_layout(optimizer)
        step = ckpt["step"]
    # --compile: the whole loss computation in one graph. Under DDP the compiler wraps the DDP model, the order the
    # DDP notes and the compiler FAQ give: dynamo then splits the graph at DDP's gradient buckets, so each bucket's
    # all-reduce overlaps the rest of the backward (a compiled net inside DDP would reduce after the whole backward)
    model = DDP(raw_model, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else raw_model
    no_sync = model.no_sync if ddp else None
    model = torch.compile(model) if args.compile and ddp else model
    def compiled(objective):  # what train_step calls: the objective's __call__, compiled with --compile
        return torch.compile(objective.__call__) if args.compile and not ddp else objective
    losses = compiled(loss_fn)

    # random state: per process, so each rank draws its own t, noise, flips and dropout
    torch.manual_seed(args.seed + rank)
    if ckpt:
        saved = ckpt["rng"]["ranks"]
        if len(saved) == world:
            set_rng_state(saved[rank], device)
        else:
            torch.manual_seed(args.seed + rank + 7919 * step)
            log(f"note: checkpoint from {len(saved)} process(es), now {world}: random streams reseeded")
    batches = Batches(images, labels, args.batch_size // world, args.seed + rank, args.flip)

    def save(step):
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if master:
            extra = dict(run.extra, kind=run.kind)
            if run.teacher is not None:
                extra.update(teacher=run.teacher.state_dict(), sampling=run.sampling)
            if run.target is not None:
                extra.update(target=run.target.state_dict())
            if run.rounds is not None:
                extra.update(rounds=run.rounds)
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "model_config": run.model_config, "diffusion_config": run.diffusion_config,
                "args": vars(args), "class_names": class_names, "rng": {"ranks": states}, **extra})
        if ddp:
            dist.barrier()

    stop = StopSignal()  # Ctrl-C / SIGTERM: finish the step, save, exit
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"{'resuming at step ' + str(step) if ckpt else 'training'}: {args.data} {images.shape[0] * world} images "
        f"{s}x{s}x{c}, {n_params / 1e6:.2f}M params, batch {args.batch_size} on {world} x {device}"
        + (f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else "") + f", T={diffusion.num_timesteps}")
    log(flips)
    log("args: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), console=False)

    # the loop. acc: loss sum, grad-norm sum, then per t quartile: loss sum (4), count (4), second metric (4); on
    # the device, read only at sync points (log, checkpoint, samples), so the GPU never waits for Python
    acc = torch.zeros(14, device=device)
    t_last, step_last, n_logs = time.time(), step, 0
    draw = grid_sampler(run, args, images)
    per_round = math.ceil(args.steps / len(run.rounds)) if run.rounds else None
    converting = run.convert_steps > 0 and step <= run.convert_steps  # at step == convert_steps: only the switch
    if converting and step < run.convert_steps:
        log(f"steps 0-{run.convert_steps}: the v-student regresses onto the teacher's own x0 predictions")
        loss_fn = run.convert
        losses = compiled(loss_fn)
    while step < args.steps:
        # consistency from an eps-teacher: at the end of the conversion the distillation starts, its target network
        # and the EMA from the converted student (Consistency Models start from a teacher of their own parameterisation)
        if converting and step == run.convert_steps:
            converting = False
            run.target.load_state_dict(raw_model.state_dict())
            ema.load_state_dict(raw_model.state_dict())
            loss_fn = run.loss_fn
            losses = compiled(loss_fn)
            log(f"steps {step}-{args.steps}: consistency distillation")
        # progressive distillation (Algorithm 2): --steps split evenly over the rounds, each halving the steps; at a
        # round's first step the student becomes the teacher, a v-network read through the student's own diffusion,
        # and the EMA restarts from it, so the round's samples owe nothing to the last round's step count
        # (resuming mid-round keeps the checkpoint's teacher)
        if run.rounds and (step % per_round == 0 or run.loss_fn.steps != run.rounds[step // per_round]):
            r = step // per_round
            if step % per_round == 0 and step > 0:
                run.teacher.load_state_dict(raw_model.state_dict())
                run.teacher_diffusion = diffusion
                run.extra["teacher_diffusion_config"] = run.diffusion_config
                ema.load_state_dict(raw_model.state_dict())
            loss_fn = run.loss_fn = ProgressiveLoss(diffusion, run.teacher, run.teacher_diffusion, run.rounds[r],
                                                    args.pd_weighting, args.bf16)
            losses = compiled(loss_fn)
            run.sampling = dict(sampler="ddim", steps=run.rounds[r])
            log(f"round {r + 1}/{len(run.rounds)}: a student of {run.rounds[r]} steps learns the teacher's "
                f"{2 * run.rounds[r]} (steps {r * per_round}-{min((r + 1) * per_round, args.steps)})")
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, y = batches(step)
        x0 = x0.contiguous(memory_format=memory_format)  # a no-op unless --channels-last
        loss, grad_norm = train_step(model, ema, optimizer, loss_fn, x0, y, args, acc[2:].view(3, 4), losses, no_sync)
        acc[0] += loss
        acc[1] += grad_norm
        step += 1
        do_log = step % args.log_every == 0 or step == args.steps
        do_ckpt = step % args.ckpt_every == 0 or step == args.steps
        do_sample = args.sample_every > 0 and (step % args.sample_every == 0 or step == args.steps)
        if not (do_log or do_ckpt or do_sample or (stop.signum and not ddp)):
            continue
        # sync point: all ranks agree on NaN and on stopping (a signal may reach them at different steps)
        finite = torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
        status = torch.stack([acc[0], (~finite).float(), torch.tensor(float(stop.signum is not None), device=device)])
        if ddp:
            dist.all_reduce(status)
        loss_sum, bad_params, stopping = status.tolist()
        if not math.isfinite(loss_sum) or bad_params:
            last = (f"{ckpt_path} (the last good checkpoint) is intact" if os.path.exists(ckpt_path)
                    else "no checkpoint was written")
            raise SystemExit(f"error: loss became {loss_sum / max(step - step_last, 1):.4g} by step {step}: training "
                             f"diverged; {last}. Resume it with a lower --lr or a longer --warmup.")
        if do_log:
            if ddp:
                dist.all_reduce(acc)
            v, n = acc.tolist(), (step - step_last) * world
            dt = time.time() - t_last
            img_s = (step - step_last) * args.batch_size / dt
            eta = format_eta((args.steps - step) * args.batch_size / img_s)
            log(f"step {step:>{len(str(args.steps))}d}/{args.steps} | loss {v[0] / n:.4f} | lr {lr:.2e} | "
                f"gnorm {v[1] / n:.2f} | {img_s:7.1f} img/s | eta {eta}")
            if n_logs % 10 == 0 or step == args.steps:  # every tenth line, and the last
                log("  loss by t quartile: " + " | ".join(f"q{i} {v[2 + i] / max(v[6 + i], 1):.4f}" for i in range(4)))
                if run.kind == "classifier":
                    log("  accuracy by t quartile: " + " | ".join(f"q{i} {v[10 + i] / max(v[6 + i], 1):.3f}"
                                                               for i in range(4)))
            acc.zero_()
            t_last, step_last, n_logs = time.time(), step, n_logs + 1
        t_work = time.time()
        if do_ckpt or stopping:
            save(step)
        if do_sample and draw and not stopping:
            x, nrow = sample_images(ema, draw, args.num_samples, args.seed, rank, world)
            if master:
                save_grid(os.path.join(args.out, f"samples_{step:07d}.png"), x, nrow)
        t_last += time.time() - t_work  # checkpoints and samples do not count against img/s
        if stopping:
            log(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume {args.out}")
            raise SystemExit(stop.exit_code)
    log(f"done: {step} steps; checkpoint {ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        raise SystemExit("error: interrupted")
    finally:
        close_distributed()
