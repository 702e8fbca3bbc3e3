"""
Train a DDPM (Ho, Jain, Abbeel 2020): Algorithm 1 with the paper's CIFAR-10 recipe as defaults; with flags, the
later papers' models on the same machinery: a noise-aware classifier for guidance, a distilled student, a
super-resolution stage of a cascade.
  python train.py --data cifar10 --device cuda                       # the paper's run
  torchrun --nproc_per_node=8 train.py --data cifar10                 # data-parallel, same global batch
  python train.py --data shapes --image-size 16 --ch 32 --steps 3000 ...  # CPU, minutes (README, docs/training.md)
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

from checkpoint import load_checkpoint, save_checkpoint
from data import load_data
from imagefiles import save_grid
from runtime import (USER_ERRORS, ArgumentParser, Processes, StopSignal, close_distributed, error_line, rng_state,
                     set_rng_state, set_tf32)
from runs import build_run
from training import FAST_PATHS, Batches, Log, get_lr, make_optimizer, match_layout, sample_images, train_step

# -----------------------------------------------------------------------------
# command line

MODEL_FLAGS = ("ch", "ch_mult", "group_channels", "num_res_blocks", "attn", "dropout", "student_dropout", "class_cond",
               "caption_cond", "timesteps", "schedule", "autoencoder", "downsample", "latent_channels", "latent",
               "shift_base", "multiscale", "image_size", "classifier", "distill", "teacher", "student_steps", "teacher_steps", "cd_n",
               "low_res", "mean_type", "convert_steps")
# flags that belong to this process, never taken from a checkpoint
RUN_FLAGS = ("resume", "device", "compile", "bf16", "tf32", "fused_adam", "channels_last", "out", "tensorboard")
FLIP_DATA = BUILT_IN = {"cifar10", "shapes", "captions"}  # data whose classes survive a mirror image: flips on by default


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def size_arg(s):
    """--image-size: S (square) or H,W."""
    values = int_list(s)
    if len(values) not in (1, 2):
        raise ValueError(f"give S or H,W, got {s}")
    return values[0] if len(values) == 1 or values[0] == values[1] else values


def get_parser():
    p = ArgumentParser(
        description="Train a DDPM (Ho et al. 2020); defaults are the paper's CIFAR-10 run (Sec. 4, Appendix B).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Short runs need a shorter warmup and a faster EMA than the 800k-step recipe, e.g. --warmup 100 "
               "--ema-decay 0.995 for a few thousand steps: an EMA with decay 0.9999 averages over ~10k steps, so in "
               "a short run it stays near the initial weights and its samples are noise.")
    a, on_off = p.add_argument, argparse.BooleanOptionalAction
    a("--data", default="cifar10", help="cifar10, shapes (built-in, labelled, generated in code), captions (the "
      "shapes in any of 4 colours, labelled 'red disk'...), a folder of images "
      "(PNG read without extra packages, JPEG and others with Pillow; class subfolders give labels), or a "
      ".npy/.npz/.pt file of uint8 images N,H,W,C (npz: arr_0 images, arr_1 labels)")
    a("--data-dir", default="./data", help="where cifar10 is looked for (archive or extracted) and downloaded to")
    a("--image-size", type=size_arg, default=32, help="size of the built-in shapes, and of a folder's images (centre-"
      "cropped, bicubic with antialiasing); files and cifar10 keep their own size. H,W: images that are not square "
      "(a folder's cropped to that aspect ratio and resized; a file's must be H x W)")
    a("--flip", action=on_off, default=None, help="random horizontal flips. Default: on for cifar10 (the paper's "
      "augmentation) and shapes, off for your own data (flips would teach mirrored digits and letters)")
    a("--ch", type=int, default=128, help="U-Net base channels (a multiple of 32 with --group-channels 1)")
    a("--ch-mult", type=int_list, default="1,2,2,2", help="channel multiplier per resolution level")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per level")
    a("--attn", type=int_list, default="16", help="resolutions with self-attention (comma-separated, '' for none)")
    a("--group-channels", type=int, default=4, choices=[1, 2, 4, 8, 16, 32], help="GroupNorm's groups hold at least "
      "this many channels in the narrowest layer: one count for the network, the most that divide every width up to "
      "min(32, narrowest / this) (the paper's 32 at its widths, 8 for 32 and 64 channels). 1: 32 groups everywhere, "
      "which at 32 channels is instance norm and cost small networks their colours (docs/training.md)")
    a("--dropout", type=float, default=0.1, help="dropout in the residual blocks")
    a("--class-cond", action="store_true", help="train with the labels (for classifier-free guidance)")
    a("--caption-cond", action="store_true", help="condition on the class names as captions (--data captions: 'red "
      "disk'), by cross-attention to a caption encoder trained with the model (latent diffusion, Rombach et al. "
      "2022, Sec. 3.3); sample.py --caption 'blue cross'")
    a("--p-uncond", type=float, default=0.1, help="with --class-cond or --caption-cond: chance of dropping a label, "
      "or of the empty caption (Ho & Salimans 2021)")
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
      "Fewer rounds give each more of --steps: from 32, 3 rounds to 4 steps (docs/distillation.md)")
    a("--student-dropout", type=float, default=0.0, help="distillation: the student's dropout (the papers' 0 by "
      "default; the teacher's own value keeps its dropout, docs/distillation.md)")
    a("--round-lr", default="anneal", choices=["anneal", "constant"], help="progressive: the learning rate within "
      "each round, annealed linearly to 0 (the reference implementation's) or constant (docs/distillation.md)")
    a("--round-adam", default="reset", choices=["reset", "keep"], help="progressive: Adam's state at each round's "
      "start, reset (the reference's: a new optimizer each round) or kept")
    a("--pd-teacher-clip", default="on", choices=["on", "off"], help="progressive: the teacher's x0 clipped to "
      "[-1, 1] in the two DDIM steps of the target, as its sampler clips; off: Algorithm 2 as printed and its "
      "reference code, whose teachers predict x, or x and eps (docs/distillation.md)")
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
    a("--cond-aug-max", type=int, default=None, help="with --low-res: Gaussian conditioning augmentation, the "
      "condition noised to a level s drawn from none, 0, ..., this - 1 (timestep indices of the schedule); default "
      "T / 4, 250 for the paper's T = 1000")
    a("--autoencoder", action="store_true", help="train latent diffusion's first stage (Rombach et al. 2022): a "
      "KL-regularised autoencoder with --downsample and --latent-channels (autoencoder.py)")
    a("--downsample", type=int, default=4, help="with --autoencoder: the downsampling factor f (a power of two)")
    a("--latent-channels", type=int, default=4, help="with --autoencoder: the latent's channels")
    a("--latent", default="", metavar="AE_RUN", help="train the diffusion model (or classifier) on the latents of "
      "this --autoencoder run, scaled to unit variance; the checkpoint keeps the autoencoder")
    a("--timesteps", type=int, default=1000, help="T; for T != 1000 the betas are scaled by 1000/T (Nichol & Dhariwal)")
    a("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule (linear: the paper's)")
    a("--shift-base", type=int, default=0, help="with --schedule cosine: shift its log-SNR by 2 log(base / d) for the "
      "network's resolution d, as if the schedule had been made for base x base images (simple diffusion, "
      "Hoogeboom et al. 2023); kept in the checkpoint")
    a("--multiscale", type=int, default=0, metavar="BASE", help="simple diffusion's multiscale loss: the eps error "
      "also on the images average-pooled to BASE, 2 BASE, ..., each weighted 1/resolution (0: L_simple)")
    a("--mean-type", default=None, choices=["eps", "x0", "v"], help="what the network predicts: eps (the paper's "
      "and the default), x0 (its ablation) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho; its loss weighs "
      "x0 at every t, and it is the default for a --low-res stage: an eps stage drifted in colour, docs/resolution.md)")
    a("--batch-size", type=int, default=128, help="global batch size (split across torchrun processes)")
    a("--grad-accum", type=int, default=1, help="split each process's batch into this many micro-batches whose "
      "gradients add up to the batch's (less memory, the same step)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate (eps 1e-8, no weight decay)")
    a("--warmup", type=int, default=None, help="steps of linear learning-rate warmup (default: the paper's 5000; 0 for "
      "--distill, as progressive distillation's own code: a warmup longer than a round starves it; docs/distillation.md)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=None, help="decay of the EMA of the weights used for sampling. Default: "
      "0.9999, the paper's; 0 (no average) for --autoencoder, as latent diffusion's reference code trains its first "
      "stage: a short run's average lags its weights (docs/resolution.md)")
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
    a("--log-every", type=int, default=100, help="steps between log lines (and NaN checks); each line's numbers "
      "also go to a row of <out>/metrics.csv")
    a("--tensorboard", action="store_true", help="also write the numbers for TensorBoard to <out>/tensorboard "
      "(needs the tensorboard package; never needed otherwise)")
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
            if k in MODEL_FLAGS or k == "data" and args.data in BUILT_IN:  # another data set, not a moved folder
                raise ValueError(f"{flag} conflicts with the checkpoint ({v}); drop the flag to resume")
            print(f"note: {flag} overrides the checkpoint's {v}")


def check_args(args, world):
    """Every flag's range, before anything is loaded; and the defaults that follow other flags."""
    flag = lambda k: "--" + k.replace("_", "-")
    for k in ("batch_size", "steps", "log_every", "ckpt_every", "timesteps", "num_samples", "grad_accum", "ch",
              "num_res_blocks", "student_steps", "teacher_steps", "lr"):
        if not getattr(args, k) > 0:
            raise ValueError(f"{flag(k)} must be positive, got {getattr(args, k)}")
    if args.warmup is None:  # progressive distillation's reference has no warmup; measured: docs/distillation.md
        args.warmup = 0 if args.distill else 5000
    for k in ("warmup", "grad_clip", "sample_every", "sample_steps", "low_res"):
        if getattr(args, k) < 0:
            raise ValueError(f"{flag(k)} must be >= 0, got {getattr(args, k)}")
    if args.student_dropout is not None and not 0 <= args.student_dropout < 1:
        raise ValueError(f"--student-dropout must be in [0, 1), got {args.student_dropout}")
    if args.ema_decay is None:  # the reference's first stage keeps no average; measured: docs/resolution.md
        args.ema_decay = 0.0 if args.autoencoder else 0.9999
    for k in ("ema_decay", "p_uncond", "cd_mu"):
        if not 0 <= getattr(args, k) <= 1:
            raise ValueError(f"{flag(k)} must be in [0, 1], got {getattr(args, k)}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.seed < 2 ** 32:
        raise ValueError(f"--seed must be in 0..2^32-1, got {args.seed}")
    if min(args.image_size if isinstance(args.image_size, list) else [args.image_size]) <= 0:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")
    if not args.ch_mult or min(args.ch_mult) <= 0 or (args.attn and min(args.attn) <= 0):
        raise ValueError(f"--ch-mult and --attn take positive integers, got {args.ch_mult} and {args.attn}")
    if args.cd_n < 2:
        raise ValueError(f"--cd-n must be at least 2 (the ODE's ends), got {args.cd_n}")
    if sum(map(bool, (args.classifier, args.distill, args.low_res, args.autoencoder))) > 1:
        raise ValueError("--classifier, --distill, --low-res and --autoencoder train different kinds of model: give "
                         "one of them")
    if args.latent and (args.autoencoder or args.low_res or args.distill):
        raise ValueError("--latent is for a diffusion model or a classifier (a student learns its teacher's latents)")
    if args.multiscale and (args.classifier or args.distill or args.low_res or args.autoencoder):
        raise ValueError("--multiscale is a diffusion model's loss (simple diffusion); this run trains another kind")
    if args.shift_base and args.schedule != "cosine":
        raise ValueError("--shift-base shifts the cosine schedule (simple diffusion): add --schedule cosine")
    if args.downsample < 1 or args.downsample & (args.downsample - 1) or args.latent_channels < 1 or \
            args.shift_base < 0 or args.multiscale < 0:
        raise ValueError("--downsample must be a power of two, --latent-channels positive, --shift-base and "
                         "--multiscale >= 0")
    if (args.class_cond or args.caption_cond) and args.classifier:
        flag = "--class-cond" if args.class_cond else "--caption-cond"
        raise ValueError(f"{flag} is for a diffusion model; a --classifier always learns the labels: drop one")
    if args.caption_cond and (args.class_cond or args.low_res or args.distill or args.autoencoder):
        raise ValueError("--caption-cond conditions a diffusion model on captions: not with --class-cond, --low-res, "
                         "--distill or --autoencoder")
    if args.sample_steps > args.timesteps:
        raise ValueError(f"--sample-steps {args.sample_steps} is more than T = {args.timesteps}")
    if args.low_res:
        args.cond_aug_max = args.timesteps // 4 if args.cond_aug_max is None else args.cond_aug_max
        if not 0 <= args.cond_aug_max <= args.timesteps:
            raise ValueError(f"--cond-aug-max {args.cond_aug_max} must be in 0..T = {args.timesteps} (timestep indices)")
    if args.mean_type is None:  # the paper's eps, but v for a super-resolution stage (measured: docs/resolution.md)
        args.mean_type = "v" if args.low_res else "eps"
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if (args.batch_size // world) % args.grad_accum:
        raise ValueError(f"the batch of {args.batch_size // world} per process is not divisible by "
                         f"--grad-accum {args.grad_accum}")


def parse(argv):
    """-> (args, the checkpoint to resume or None, the kind of run: decided here, once; the line about flips)."""
    args, explicit = get_args(argv)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        # a checkpoint from before --group-channels: its network has the paper's 32 groups (1); from before
        # --pd-teacher-clip: its targets were the unclipped teacher's
        merge_resume_args(args, explicit, {**ckpt["args"],
                                           "group_channels": ckpt["model_config"].get("group_channels", 1),
                                           "pd_teacher_clip": ckpt["args"].get("pd_teacher_clip", "off")})
        if "out" not in explicit:  # continue in the folder the checkpoint is in
            args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume) or "."
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    if not args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
        raise ValueError(f"{os.path.join(args.out, 'ckpt.pt')} exists; continue it with --resume {args.out} or pick "
                         f"another --out")
    kind = ckpt.get("kind", "diffusion") if ckpt else "autoencoder" if args.autoencoder else (
        "classifier" if args.classifier else args.distill or ("sr" if args.low_res else "diffusion"))
    return args, ckpt, kind, flip_note(args)


def flip_note(args):
    """Decide whether flips are on (args.flip, kept in the checkpoint), and say why: the second line of every run."""
    if args.flip is not None:
        why = "--flip" if args.flip else "--no-flip"
    else:  # the default follows the data
        args.flip = args.data in FLIP_DATA
        symmetric = "the built-in shapes are mirror-symmetric"
        why = {"cifar10": "the paper's augmentation for CIFAR-10", "shapes": symmetric, "captions": symmetric}.get(
            args.data, "the default for your own data, where a mirror image can change the class (digits, letters); "
                       "--flip turns them on")
    return f"horizontal flips {'on' if args.flip else 'off'} ({why})"


def training_data(args, procs, kind):
    """This process's shard of the training images (uint8 N, H, W, C) and labels, on its device; the number of
    classes (None if the run uses no labels) and the class names. The data set is prepared once per node
    (downloaded, unpacked) before the other processes load it."""
    images, labels, class_names = procs.in_turns(lambda: load_data(args.data, args.data_dir, args.image_size))
    if (args.class_cond or kind == "classifier") and labels is None:
        flag = "--class-cond" if args.class_cond else "--classifier"
        raise ValueError(f"{flag} needs labels, and --data {args.data} has none (npz: put them in arr_1; a folder: "
                         f"one subfolder per class)")
    if args.caption_cond and (labels is None or not class_names):
        raise ValueError(f"--caption-cond needs labelled data with class names, the captions, and --data {args.data} "
                         f"has none (--data captions; or a folder with one subfolder per caption, named by it)")
    use = args.class_cond or args.caption_cond or kind == "classifier"
    num_classes = int(labels.max()) + 1 if use else None
    shard = slice(procs.rank, None, procs.world)
    return images[shard].to(procs.device), labels[shard].to(procs.device) if use else None, num_classes, class_names


def run_line(args, resumed_at, images, world, device, model, diffusion):
    """The log's first line: what is trained on what, where."""
    n_params = sum(p.numel() for p in model.parameters())
    return (f"{'resuming at step ' + str(resumed_at) if resumed_at is not None else 'training'}: {args.data} "
            f"{images.shape[0] * world} images {'x'.join(map(str, images.shape[1:]))}, {n_params / 1e6:.2f}M params, "
            f"batch {args.batch_size} on {world} x {device}" + (f" in {args.grad_accum} micro-batches" if
                                                                args.grad_accum > 1 else "")
            + (f", T={diffusion.num_timesteps}" if diffusion is not None else ""))

# -----------------------------------------------------------------------------
# the run


def train(args, ckpt, kind, flips):
    """Algorithm 1 for any kind of run: repeat { x_0 ~ q(x_0); the objective's draws; a gradient step } until
    --steps, with the EMA, log lines, checkpoints and sample grids at their intervals."""
    procs = Processes(args.device)
    device, world, master = procs.device, procs.world, procs.master
    set_tf32(device, args.tf32)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    images, labels, num_classes, class_names = training_data(args, procs, kind)
    run = build_run(kind, args, ckpt, images, num_classes, device, class_names)
    raw_model, objective = run.model, run.objective
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
    model = DDP(raw_model, device_ids=[procs.local_rank] if device.type == "cuda" else None) if world > 1 else raw_model
    no_sync = model.no_sync if world > 1 else None
    model = torch.compile(model) if args.compile and world > 1 else model
    losses = torch.compile(objective.__call__) if args.compile and world == 1 else objective
    stage = run.first_stage  # a latent diffusion run: batches as latents, grids decoded
    began = time.perf_counter()
    batches = Batches(images, labels, args.batch_size // world, args.seed + procs.rank, args.flip, stage)
    encoded_in = time.perf_counter() - began
    procs.on_master(lambda: os.makedirs(args.out, exist_ok=True))  # only now: bad input leaves no empty folder behind
    log = Log(args, master, device, step)
    torch.manual_seed(args.seed + procs.rank)  # per process: each rank draws its own t, noise, flips and dropout
    if ckpt:
        saved = ckpt["rng"]["ranks"]
        if len(saved) == world:
            set_rng_state(saved[procs.rank], device)
        else:
            torch.manual_seed(args.seed + procs.rank + 7919 * step)
            log(f"note: checkpoint from {len(saved)} process(es), now {world}: random streams reseeded")

    def save(step):
        states = [rng_state(device)] * world  # every rank's own random state: gathered under torchrun
        if world > 1:
            dist.all_gather_object(states, rng_state(device))
        procs.on_master(lambda: save_checkpoint(ckpt_path, {
            "model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "model_config": run.model_config, "diffusion_config": run.diffusion_config, "kind": kind,
            "args": vars(args), "class_names": class_names, "rng": {"ranks": states},
            **objective.state(run.diffusion_config), **(stage.state() if stage else {})}))

    stop = StopSignal()  # Ctrl-C / SIGTERM: finish the step, save, exit
    log(run_line(args, step if ckpt else None, images, world, device, raw_model, run.diffusion))
    log(flips)
    if stage:
        log(f"latents: q_E(z | x) of every training image{' and its mirror image' if args.flip else ''} "
            f"encoded once, {encoded_in:.1f} s")
    log("args: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), console=False)
    while step < args.steps:
        log(objective.begin(step, raw_model, ema, optimizer))  # a round or phase that starts here, if any
        lr = objective.learning_rate(step, get_lr(step, args))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, y = batches(step)
        x0 = x0.contiguous(memory_format=memory_format)  # a no-op unless --channels-last
        log.add(*train_step(model, ema, optimizer, objective, x0, y, args, log.acc[2:].view(3, 4), losses, no_sync))
        step += 1
        do_log = step % args.log_every == 0 or step == args.steps
        do_ckpt = step % args.ckpt_every == 0 or step == args.steps
        do_sample = args.sample_every > 0 and (step % args.sample_every == 0 or step == args.steps)
        if not (do_log or do_ckpt or do_sample or (stop.signum and world == 1)):
            continue
        # sync point: all ranks agree on NaN and on stopping (a signal may reach them at different steps)
        finite = torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
        status = torch.stack([log.acc[0], (~finite).float(), torch.tensor(float(stop.signum is not None), device=device)])
        if world > 1:
            dist.all_reduce(status)
        loss_sum, bad_params, stopping = status.tolist()
        if not math.isfinite(loss_sum) or bad_params:
            last = f"{ckpt_path} (the last good checkpoint) is intact" if os.path.exists(ckpt_path) else \
                "no checkpoint was written"
            raise RuntimeError(f"loss became {loss_sum / max(step - log.step, 1):.4g} by step {step}: training "
                               f"diverged; {last}. Resume it with a lower --lr or a longer --warmup.")
        if do_log:
            log.interval(step, lr, world, objective.metric)
        t_work = time.time()
        if do_ckpt or stopping:
            save(step)
        if do_sample and not stopping:
            x, nrow = sample_images(ema, objective.sample, args.num_samples, args.seed, procs.rank, world,
                                    args.bf16 and device.type == "cuda", stage and stage.decode)
            if x is not None:
                procs.on_master(lambda: save_grid(os.path.join(args.out, f"samples_{step:07d}.png"), x, nrow))
        log.time += time.time() - t_work  # checkpoints and samples do not count against img/s
        if stopping:
            log(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume {args.out}")
            raise SystemExit(stop.exit_code)
    log(f"done: {step} steps; checkpoint {ckpt_path}")


def main(argv=None):
    """python train.py [flags]. A library's error (bad input, a full disk, a failed download, a diverged run) is
    one 'error:' line and exit code 1; the previous checkpoint is intact."""
    try:
        train(*parse(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        raise SystemExit("error: interrupted")
    finally:
        close_distributed()
