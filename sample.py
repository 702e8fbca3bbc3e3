"""
Sample from a DDPM (Ho, Jain, Abbeel 2020): Algorithm 2 from a train.py checkpoint or the paper's released
CIFAR-10 weights; DDIM and DPM-Solver++ with fewer steps; classifier-free and classifier guidance; distilled
students; cascades; the reverse process as a strip (Figure 6). Into a PNG grid and an .npz for FID, resumable and
shared out over torchrun's processes. (The NLL bound and Sec. 4's experiments: evaluate.py.)
  python sample.py out/ckpt.pt -n 64                                     # grid, 1000 steps of Algorithm 2
  python sample.py out --sampler dpm++ --steps 20                        # DPM-Solver++(2M), 20 network calls
  python sample.py model-790000.ckpt -n 50000 --npz s.npz                # released weights, for FID
  torchrun --nproc_per_node=8 sample.py out -n 50000 --npz s.npz         # the same file, 8 GPUs
  python sample.py out --class 0,1,2,3 --guidance 3                      # class-conditional, guided
  python sample.py out --caption 'blue cross' --guidance 3               # a caption model (--caption-cond)
A command line: nothing imports this file.
"""
import math
import os
import time

import torch

from captions import tokenize
from cascade import Stage, carry_up, check_chain
from checkpoint import build_diffusion, fingerprint, load_model
from data import MASKS, load_edit_images, load_file, parse_classes
from distill import consistency_sample
from editing import edit_loop, edit_start, full_chain
from guidance import check_classifier, check_condition, classifier_grad, classifier_guidance, model_fn, null_condition
from imagefiles import (BatchFolder, class_counts, class_grid, from_uint8, save_grid, to_uint8, trajectory_strip,
                        write_npz, write_pngs)
from runtime import (USER_ERRORS, ArgumentParser, Processes, Progress, StopSignal, close_distributed, error_line,
                     set_tf32)
from samplers import SAMPLERS, SPACINGS, choose_sampler, describe_sampler, is_full_chain, sample_loop
from unet import image_hw

# What a run's record leaves out: where the files go, and what does not change the samples.
NOT_RECORDED = ("ckpt", "out", "npz", "resume", "trajectory", "device", "compile", "upsample", "classifier", "low_res",
                "png_dir", "edit", "mask")
GRID_MAX = 256  # the PNG shows at most this many samples; --npz keeps all of them
FID_MIN = 10_000  # fewer samples than this make an FID that is not comparable with published ones

# -----------------------------------------------------------------------------
# command line


def get_parser():
    p = ArgumentParser(description="Sample from a DDPM checkpoint or the paper's released CIFAR-10 weights.")
    a = p.add_argument
    a("ckpt", help="train.py checkpoint or run folder; or released weights: the TF-scope state dict "
      "(model-790000.ckpt) or the diffusers google/ddpm-cifar10-32 folder, .safetensors or .bin")
    a("-n", "--n", "--num-samples", dest="n", type=int, default=None, help="samples to draw (default 64); under "
      "torchrun write -n or --num-samples (torchrun's parser rejects --n as ambiguous)")
    a("--batch-size", type=int, default=128, help="images per batch (default 128)")
    a("--sampler", default=None, choices=SAMPLERS + ("consistency",), help="ddpm: Algorithm 2 (fewer steps: "
      "ancestral on the spaced chain); ddim (Song et al. 2021); dpm++: DPM-Solver++(2M) (Lu et al. 2022); "
      "consistency: a consistency model's own. Default: a student's own, else ddpm for --steps T, ddim for fewer")
    a("--steps", type=int, default=None, help="network evaluations (default T)")
    a("--consistency-last", type=float, default=0.821, help="multistep consistency sampling: the noise level the "
      "last step adds back, the ones before falling geometrically to it (Song et al.'s CIFAR-10 value for 2 steps)")
    a("--spacing", default="trailing", choices=SPACINGS, help="which timesteps --steps K < T visits: trailing "
      "(default) starts at T-1 for every K; uniform and quadratic are the DDIM paper's")
    a("--eta", type=float, default=None, help="noise: ddim 0 (default) to 1 ancestral; dpm++ 0 (ODE) to 1 (SDE); alone: ddim")
    a("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] (the literal Algorithm 2)")
    a("--no-ema", action="store_true", help="use the raw weights instead of their EMA (train.py checkpoints; the "
      "--upsample stages too)")
    a("--class", dest="class_", default=None, metavar="K[,K...]", help="class-conditional models: class indices or "
      "names (the samples spread evenly over them, one grid row per class)")
    a("--caption", action="append", default=None, metavar="TEXT", help="caption models (train.py --caption-cond): "
      "what to draw, e.g. 'blue cross', in the words of the model's captions, combinations it never saw included; "
      "repeat for more (the samples spread evenly over them, one grid row each; .npz arr_1: the index in this list)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance w: eps = (1+w) eps(x,c) - w eps(x,null)")
    a("--classifier", default="", help="classifier guidance (Dhariwal & Nichol 2021): a train.py --classifier "
      "checkpoint steering this model, unconditional or not, toward --class")
    a("--classifier-scale", type=float, default=1.0, help="with --classifier: the gradient scale s (0: no guidance)")
    a("--upsample", action="append", default=[], metavar="SR_CKPT", help="a cascade (Ho et al. 2021): carry the "
      "samples up through this super-resolution model (train.py --low-res); repeat for more stages")
    a("--upsample-sampler", action="append", default=[], choices=SAMPLERS, help="each --upsample stage's sampler, "
      "in order (one value: every stage; default ddpm)")
    a("--upsample-steps", action="append", default=[], type=int, help="each --upsample stage's steps (default T)")
    a("--cond-aug", type=lambda v: -1 if v == "none" else int(v), default=-1, help="the stages' conditioning "
      "augmentation: the low-resolution image noised to this timestep index (then not projected), or none")
    a("--no-project", action="store_true", help="stages as CDM samples them: no cascade.project (as with --cond-aug S)")
    a("--low-res", default="", help="with a super-resolution checkpoint as the model: low-resolution images to carry "
      "up (a .npy/.npz/.pt of uint8 N,H,W,C)")
    a("--edit", default="", metavar="IMAGES", help="edit these images (a file or folder, as train.py's --data; -n "
      "defaults to their number): SDEdit (Meng et al. 2022) with --strength, inpainting with --mask")
    a("--strength", type=float, default=None, help="with --edit: noise the images to t = strength T and sample "
      "from there; 0 returns them, 1 is a new sample (default 0.5, or 1 with --mask)")
    a("--mask", default="", help="with --edit: inpaint (RePaint's replacement, Lugmayr et al. 2022): a PNG or .npz "
      f"mask (white = keep, black = fill in), or a region to fill in: {', '.join(MASKS)}")
    a("--resample", type=int, default=1, help="with --mask: RePaint's resampling, r passes over each stretch of "
      "--jump steps (1: plain replacement)")
    a("--jump", type=int, default=1, help="with --resample: the steps each RePaint jump goes back up the chain")
    a("--seed", type=int, default=0, help="random seed (batch b uses seed * 1000003 + b)")
    a("--out", default="samples.png", help="PNG grid of the samples")
    a("--npz", default="", help="also every sample as uint8 N,H,W,C under arr_0 (labels under arr_1), for FID")
    a("--png-dir", default="", help="also every sample as a PNG of its own in this folder, as its batch finishes")
    a("--resume", action="store_true", help="continue a stopped run: keep the samples it finished, draw the rest")
    a("--trajectory", default="", help="PNG strip of the reverse process of the first samples: x_t and predicted x0 "
      "at 10 steps (cf. the paper's Figure 6)")
    a("--device", default="auto", help="auto (default), cpu, cuda or mps")
    a("--compile", action="store_true", help="torch.compile the network; on CUDA with CUDA graphs, one graph "
      "launch per network call (compiling takes a minute or more)")
    a("--tf32", action="store_true", help="TF32 on CUDA (off by default: true fp32, as the paper's numbers)")
    a("--bf16", action="store_true", help="bf16 autocast for the network on CUDA (off by default: fp32)")
    return p


def check_args(args):
    for k in ("n", "batch_size", "steps"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive")
    for message, ok in (("--eta must be >= 0", (args.eta or 0) >= 0), ("--guidance must be >= 0", args.guidance >= 0),
                        ("--consistency-last must be a positive noise level", args.consistency_last > 0),
                        ("--resample and --jump must be at least 1", min(args.resample, args.jump) >= 1),
                        (f"--seed must be in 0..2^32-1, got {args.seed}", 0 <= args.seed < 2 ** 32),
                        ("--resume continues from the samples in --npz; give the --npz of the stopped run",
                         args.npz or not args.resume),
                        ("--strength, --mask and --resample are for --edit IMAGES", args.edit or not (
                            args.mask or args.strength is not None or args.resample != 1))):
        if not ok:
            raise ValueError(message)
    for flag, path in (("--out", args.out), ("--npz", args.npz), ("--trajectory", args.trajectory)):
        if path and not os.path.isdir(os.path.dirname(path) or "."):  # find out now, not after hours of sampling
            raise ValueError(f"{flag} {path}: folder {os.path.dirname(path)} does not exist")
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)


# -----------------------------------------------------------------------------
# what to draw: the model, its sampler, guidance, a cascade


def load_classifier(args, diffusion, net, first_stage, device):
    """--classifier: a train.py --classifier checkpoint, checked against the diffusion model it is to guide."""
    classifier, config, meta, desc = load_model(args.classifier)
    check_classifier(args.classifier, classifier, build_diffusion(config).to(device), net, diffusion,
                     meta["first_stage"], first_stage)
    print(f"classifier guidance: {desc}, scale {args.classifier_scale}")
    return classifier.to(device), meta.get("class_names")


def load_stages(args, net, meta, diffusion, device):
    """A cascade (Ho et al. 2021): the super-resolution stages of --upsample, in order (cascade.check_chain); and, for
    a super-resolution checkpoint as the model, the --low-res images it starts from (it is then the first stage,
    with the model's own --sampler and --steps)."""
    models, given = [(path, *load_model(path, use_ema=not args.no_ema)[:3]) for path in args.upsample], None
    if meta["kind"] == "sr":
        if not args.low_res:
            raise ValueError(f"{args.ckpt} is a super-resolution model (train.py --low-res): give it images with "
                             f"--low-res IMAGES, or follow a base model: sample.py BASE --upsample {args.ckpt}")
        given = load_file(args.low_res)[0]
        models.insert(0, (args.ckpt, net, None, meta))  # None: the model's own diffusion
    elif args.low_res:
        raise ValueError(f"--low-res is for a super-resolution checkpoint; {args.ckpt} is a {meta['kind']} model")
    for path, _, _, stage_meta in models:
        if stage_meta["kind"] != "sr":
            raise ValueError(f"--upsample {path} is not a super-resolution model (train.py --low-res)")
    first = given.shape[1:] if given is not None else (*image_hw(net.config["image_size"]), net.config["in_channels"])
    check_chain([(path, m) for path, m, _, _ in models], first)
    pick = lambda values, k, default: values[min(k, len(values) - 1)] if values else default
    stages = []
    for k, (path, stage_net, diffusion_config, _) in enumerate(models):
        own = diffusion_config is None
        stage_diffusion = diffusion if own else build_diffusion(diffusion_config).to(device)
        T = stage_diffusion.num_timesteps
        if not -1 <= args.cond_aug < T or not all(0 < steps <= T for steps in args.upsample_steps):
            raise ValueError(f"{path}: --cond-aug must be none or 0..{T - 1} and --upsample-steps 1..{T} for its "
                             f"T = {T}, got {args.cond_aug} and {args.upsample_steps}")
        stages.append(Stage(stage_net.to(device), stage_diffusion, stage_net.config["image_size"],
                            args.sampler if own else pick(args.upsample_sampler, k, "ddpm"),
                            args.steps if own else pick(args.upsample_steps, k, T), spacing=args.spacing,
                            cond_aug=args.cond_aug, bf16=args.bf16, project=args.cond_aug < 0 and not args.no_project))
    return stages, given


# -----------------------------------------------------------------------------
# drawing: batches, each seeded by its index, shared out over the processes, each written as it finishes


def draw_samples(args, procs, net, diffusion, names, classifier=None, stages=(), given=None, record=None,
                 edits=None, first_stage=None):
    """Batches of samples from net, shared out over the processes by index; with a classifier, classifier guidance
    (scale args.classifier_scale) toward the --class labels, which then need not be the model's own. stages: a
    cascade's super-resolution models, each drawing from the output of the one before; given: low-resolution images
    that stand in for the base model's samples (sample.py SR_CKPT --low-res IMAGES); edits: (images, mask or None)
    to edit (--edit, --mask)."""
    device, master = procs.device, procs.master
    say = print if master else (lambda *a, **k: None)
    c, out = net.config["in_channels"], first_stage.autoencoder.config if first_stage else net.config  # decoded
    h, w = image_hw(stages[-1].size if stages else out["image_size"])
    num_classes, tokens = net.config.get("num_classes"), None
    label_classes = classifier.num_classes if classifier is not None else num_classes
    classes = parse_classes(args.class_, label_classes, names) if args.class_ is not None else None
    if args.caption:  # a caption model: the captions stand in for classes 0..K-1, their texts for the class names
        tokens, classes, names = tokenize(args.caption, net.config["captions"]), list(range(len(args.caption))), \
            args.caption
    labels = None if classes is None else \
        torch.cat([torch.full((k,), label) for label, k in zip(classes, class_counts(args.n, len(classes)))])
    if num_classes is not None and classes is None:
        say(f"note: class-conditional model and no --class: unconditional samples (the null label {num_classes})")
    if net.config.get("captions") and classes is None:
        say("note: caption model and no --caption: unconditional samples (the empty caption)")
    if args.npz and args.n < FID_MIN:
        say(f"warning: {args.n} samples; an FID from fewer than {FID_MIN:,} is biased upwards and not comparable "
            f"with published ones, which use 50,000 (docs/fid.md)")
    parts = BatchFolder((args.npz or args.out) + ".parts", args.n, args.batch_size, dict(record, classes=classes))
    if args.resume:
        parts.check(args.npz)
    procs.on_master(lambda: parts.start(args.resume, args.npz))
    todo = [b for b in range(procs.rank, len(parts.sizes), procs.world) if not parts.done(b)]
    first = f"the {args.n} given images" if given is not None else describe_sampler(
        args.sampler, args.steps, args.eta, args.spacing, diffusion, args.consistency_last)
    say(f"sampling {args.n} images {h}x{w}x{out['in_channels']}: {first}, batch {args.batch_size}, seed {args.seed}, "
        f"{procs.world} x {device}" + (f", classes {classes}" if classes and not args.caption else "")
        + (f", captions {args.caption}" if args.caption else "")
        + (f", guidance {args.guidance}" if classes and (num_classes or args.caption) else "")
        + (f", classifier scale {args.classifier_scale}" if classifier is not None else "")
        + "".join(f", then {stage}" for stage in stages) + ", bf16" * args.bf16)
    drawn_before = parts.drawn()
    if args.resume:
        say(f"resuming: {drawn_before} samples of {args.n} already drawn")
    steps = (0 if given is not None else args.steps) + sum(stage.steps for stage in stages)  # network calls a sample
    progress = Progress(total=(args.n - drawn_before) * steps)
    strip = trajectory_strip(args.trajectory, args.steps) if args.trajectory and 0 in todo else None

    def draw(b):
        """Batch b: its own seed, seed * 1_000_003 + b, so the same seed gives the same files on any number of
        processes, and two seeds never share a batch's noise (runs with seeds 0, 1, ... can be pooled for FID)."""
        lo, hi = b * args.batch_size, b * args.batch_size + parts.sizes[b]
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        y = labels[lo:hi].to(device) if labels is not None else None
        if tokens is not None:
            y = tokens.to(device)[y]  # a caption model's: each sample's caption as tokens
        calls = 0
        def callback(i, x, pred_xstart):
            nonlocal calls
            calls += 1
            if strip and b == 0:
                strip[0](calls - 1, x, pred_xstart)
            if master and progress.due():  # a batch of the full net on a CPU takes hours: say it is moving
                say(f"  batch {b + 1}: step {calls}/{args.steps} | eta {progress.eta(done_images() * steps)}",
                    flush=True)
        if given is not None:  # the low-resolution images, through the cascade's stages
            x = from_uint8(given[lo:hi].to(device))
        else:
            edit = from_uint8(edits[0][lo:hi].to(device)) if edits else None
            mask = edits[1][lo:hi] if edits and edits[1] is not None and len(edits[1]) > 1 else edits and edits[1]
            x = sample_base(args, net, diffusion, classifier, y, classes, (hi - lo, c), g, callback, edit,
                            None if mask is None else mask.to(device))
            if strip and b == 0:
                say(strip[1]())
        count = x.numel()
        if first_stage:  # a latent diffusion model: its latents decoded (Rombach et al. 2022, x = D(z / scale))
            x = first_stage.decode(x)
        x, sq_error = carry_up(stages, x, g)  # and CDM's consistency of the output with its input
        images = to_uint8(x)
        if args.png_dir:
            write_pngs(args.png_dir, images, lo, None if labels is None else labels[lo:hi], names)
        parts.write(b, {"arr_0": images, **({"arr_1": labels[lo:hi]} if labels is not None else {}),
                        "agreement": torch.tensor([sq_error, count], dtype=torch.float64)})

    done_images = lambda: parts.drawn() - drawn_before
    with StopSignal() as stop:
        for b in todo:
            draw(b)
            if master:
                count = done_images()
                width = len(str(args.n))
                say(f"batch {b + 1:>{len(str(len(parts.sizes)))}}/{len(parts.sizes)} | {count + drawn_before:>{width}}"
                    f"/{args.n} images | {steps} steps | {count / (time.time() - progress.start):7.2f} img/s | "
                    f"eta {progress.eta(count * steps)}", flush=True)
            if stop.signum is not None:
                break
        stopped = stop.signum is not None
        parts.leave(procs.rank, stopped)
        if master:  # the other processes' batches: waited for by their marks, never in a collective
            stopped = parts.wait(procs.world, lambda: stop.signum is not None)
    if master:
        finish(args, parts, classes, stages, stopped)
    if stopped:
        raise SystemExit(stop.exit_code)


def sample_base(args, net, diffusion, classifier, y, classes, shape, generator, callback, edit=None, mask=None):
    """One batch from the model itself: its sampler (a student's own, or --sampler), with classifier-free guidance
    (--guidance, a conditional model) or classifier guidance (--classifier) toward the labels y; or an edit of the
    images `edit` (SDEdit, inpainting where mask is 0: editing.edit_loop)."""
    device = y.device if y is not None else next(net.parameters()).device
    conditional = net.config.get("num_classes") is not None or net.config.get("captions")
    y_model = (y if y is not None else null_condition(net.config, shape[0], device)) if conditional else None
    fn = model_fn(net, y_model, args.guidance if classes else 0.0, args.bf16)
    shape, T = (*shape, *image_hw(net.config["image_size"])), diffusion.num_timesteps
    if args.sampler == "consistency":
        return consistency_sample(diffusion, fn, shape, args.steps, generator=generator, callback=callback,
                                  last=args.consistency_last, clip=not args.no_clip)
    cond_fn = classifier_grad(classifier, y, args.classifier_scale) if (
        classifier is not None and y is not None and args.classifier_scale != 0) else None  # s = 0: unguided
    if edit is not None:  # the steps of the whole chain that lie below t_0 = strength T
        start = edit_start(T, args.strength)
        steps = max(1, round(args.steps * (start + 1) / T))
        fn, cond_fn = classifier_guidance(diffusion, fn, cond_fn, full_chain(args.sampler, start, steps, args.spacing))
        return edit_loop(diffusion, fn, edit, mask, start, steps, args.sampler, args.eta, args.spacing, generator,
                         not args.no_clip, cond_fn, args.jump, args.resample, callback)
    fn, cond_fn = classifier_guidance(diffusion, fn, cond_fn, is_full_chain(args.sampler, args.steps, args.spacing, T))
    return sample_loop(diffusion, fn, shape, args.sampler, args.steps, args.eta, args.spacing, generator=generator,
                       clip_denoised=not args.no_clip, callback=callback, cond_fn=cond_fn)


def load_edit(args, net):
    """--edit IMAGES and --mask (data.load_edit_images) for a sampler whose state is x_t alone; --strength's default."""
    if args.sampler not in ("ddpm", "ddim"):
        why = "it keeps the last step's x0_hat, which an edit makes stale" if args.sampler != "consistency" else "its own map"
        raise ValueError(f"--edit runs --sampler ddpm or ddim, whose state is x_t alone; not {args.sampler} ({why})")
    args.strength = (1.0 if args.mask else 0.5) if args.strength is None else args.strength
    edit_start(1, args.strength)  # checks the range
    return load_edit_images(args.edit, args.mask, net.config["image_size"], net.config["in_channels"])


def finish(args, parts, classes, stages, stopped):
    """Rank 0, last: the grid and the .npz from the finished batches (all of them, or those a stopped run finished
    from the first on)."""
    arrays = parts.read()
    images, labels = arrays.get("arr_0"), arrays.get("arr_1")
    if stages and images is not None:
        sq_error, count = arrays["agreement"].view(-1, 2).sum(0).tolist()
        print(f"cascade: the output area-downsampled to its input's size differs from it by RMSE "
              f"{math.sqrt(sq_error / count):.2f} levels of 255")
    if images is not None:
        x, nrow = class_grid(images, None if classes is None else class_counts(len(images), len(classes)), GRID_MAX)
        save_grid(args.out, x, nrow)
        print(f"wrote {args.out}" + (f" (first {len(x)} of {len(images)})" if len(x) < len(images) else ""))
        if args.npz:
            write_npz(args.npz, {"arr_0": images, **({"arr_1": labels} if labels is not None else {})}, parts.record)
            print(f"wrote {args.npz}: arr_0 uint8 {tuple(images.shape)}" + (", arr_1 int64 labels" if classes else ""))
    if images is not None and len(images) == args.n or not args.npz:  # nothing left to resume
        parts.remove()
    if stopped:
        kept = f"{0 if images is None else len(images)} of {args.n} samples are in {args.npz}; run the same command with --resume to draw the rest"
        print(f"stopped: {kept if args.npz else 'no --npz was asked for, so nothing is kept'}", flush=True)


def sample(args):
    check_args(args)
    procs = Processes(args.device)
    device = procs.device
    set_tf32(device, args.tf32)  # fp32 means fp32: cuDNN would use TF32 for convolutions by default
    if args.bf16 and device.type != "cuda":
        print(f"note: --bf16 is for CUDA; running fp32 on {device.type}")
        args.bf16 = False
    net, diffusion_config, meta, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    if meta["kind"] in ("classifier", "autoencoder"):
        raise ValueError(f"{args.ckpt} is a {meta['kind']}: it draws no samples (a classifier guides a model: sample.py "
                         f"MODEL --classifier CLF --class K; train.py --latent AE learns an autoencoder's latents)")
    if meta["first_stage"] and (args.edit or args.upsample or args.trajectory):
        raise ValueError("--edit, --upsample and --trajectory work on pixels; a latent diffusion model's are latents")
    net.to(device)
    diffusion = build_diffusion(diffusion_config).to(device)
    T = diffusion.num_timesteps
    if procs.master:
        print(f"loaded {desc}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, T={T}")
    n_asked, args.n, args.no_clip = args.n, args.n or 64, args.no_clip or bool(meta["first_stage"])  # latents: unclipped
    args.sampler, args.steps = choose_sampler(args.sampler, args.steps, args.eta, T, meta["sampling"])
    if meta["sampling"] and args.guidance:
        raise ValueError("--guidance: a distilled student learnt its teacher's unguided steps (guided distillation, Meng et al. 2023, is not here); guide the teacher")
    if args.classifier and args.sampler == "consistency":
        raise ValueError("--classifier: a consistency model's sampler (Song et al. 2023, Algorithm 1) takes no classifier guidance")
    check_condition(net.config, args.class_, args.caption, args.guidance, bool(args.classifier))
    classifier, names = (load_classifier(args, diffusion, net, meta["first_stage"], device) if args.classifier
                         else (None, None))
    names = names or meta.get("class_names") or ()  # the classifier's class names, else the model's
    stages, given = load_stages(args, net, meta, diffusion, device)
    edits = load_edit(args, net) if args.edit else None
    if given is not None or edits:  # every image given, unless --n asks for fewer
        available = len(given if given is not None else edits[0])
        args.n = min(n_asked or available, available)
    record = dict({k: v for k, v in vars(args).items() if k not in NOT_RECORDED}, device=device.type,
                  model=fingerprint(net), stages=[fingerprint(stage.net) for stage in stages],
                  classifier=classifier and fingerprint(classifier), given=given is not None and fingerprint(given),
                  edit=edits and fingerprint(edits[0]), mask=edits and edits[1] is not None and fingerprint(edits[1]),
                  first_stage=meta["first_stage"] and fingerprint(meta["first_stage"].autoencoder))
    if args.compile:  # the batch shape is fixed, so one graph serves every step (a smaller last batch: one more)
        net = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None)
    first_stage = meta["first_stage"] and meta["first_stage"].to(device)
    draw_samples(args, procs, net, diffusion, names, classifier, stages, given, record, edits, first_stage)


def main(argv=None):
    """python sample.py CKPT [flags]. Bad input: one 'error:' line and exit code 1, before any sampling."""
    try:
        sample(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
    finally:
        close_distributed()
