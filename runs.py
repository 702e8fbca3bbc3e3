"""
What each kind of run trains, set up once from train.py's flags or from a checkpoint (train.py decides the kind):
the network, its diffusion and its objective behind the one interface the loop calls (training.Objective); a latent
run's first stage (its autoencoder and scale factor); a distillation run's frozen teacher and its student.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from autoencoder import Autoencoder, FirstStage, latent_scale
from checkpoint import build_diffusion, build_model, diffusion_config, load_checkpoint, load_model
from distill import ConsistencyDistillation, ProgressiveDistillation, progressive_schedule
from highres import MultiscaleLoss, shift_for
from imagefiles import from_uint8
from training import AutoencoderObjective, ClassifierObjective, DiffusionLoss, Objective, SuperResolutionObjective
from unet import UNet, image_hw, network_groups


def first_stage(args, ckpt, images, device):
    """A run's first stage, or None for a run on pixels: the checkpoint's own, or --latent's (a train.py
    --autoencoder run, checked against the data; its scale factor measured on 1024 of its images, drawn at
    random), or a latent teacher's (a student learns its teacher's latents)."""
    source = ckpt if ckpt and "first_stage" in ckpt else None
    if source is None and not ckpt and args.distill and args.teacher:
        try:
            teacher = load_checkpoint(args.teacher)
        except (ValueError, OSError):  # released weights, or no file: load_teacher says which
            teacher = {}
        source = teacher if "first_stage" in teacher else None
    if source is not None:
        return FirstStage.from_state(source).to(device)
    if ckpt or not args.latent:
        return None
    ae, _, meta, _ = load_model(args.latent)
    if not isinstance(ae, Autoencoder):
        raise ValueError(f"--latent {args.latent} is a {meta['kind']} checkpoint, not an autoencoder (train.py "
                         f"--autoencoder)")
    c = ae.config
    if (c["image_size"], c["image_size"], c["in_channels"]) != tuple(images.shape[1:]):
        raise ValueError(f"--latent {args.latent} encodes {c['image_size']}x{c['image_size']}x{c['in_channels']} "
                         f"images; the data are {'x'.join(map(str, images.shape[1:]))}")
    ae = ae.to(device)
    g = torch.Generator().manual_seed(args.seed)  # 1024 images at random: a folder or file may be in order
    some = images[torch.randperm(len(images), generator=g)[:1024].to(images.device)]
    scale = latent_scale(ae, from_uint8(some), torch.Generator(device).manual_seed(args.seed))
    scale = torch.tensor(scale, device=device)
    if dist.is_initialized():  # every process the scale of rank 0's images, the one its checkpoint keeps
        dist.broadcast(scale, 0)
    return FirstStage(ae, scale.item())


@dataclass
class Run:
    """What a run trains, as build_run sets it up from the flags or a checkpoint."""
    model: nn.Module        # the network to train, on the CPU (train.py moves it, adds its EMA, optimizer, DDP)
    model_config: dict
    diffusion_config: dict
    diffusion: nn.Module    # a GaussianDiffusion, on the device (None for an autoencoder)
    objective: Objective
    first_stage: FirstStage = None  # a latent diffusion run's autoencoder


def _new_model_config(args, images, num_classes, captions=None):
    """The network of a new run from the flags; its size and channels follow the data (N, H, W, C)."""
    h, w = images.shape[1:3]
    return dict(image_size=h if h == w else [h, w], in_channels=images.shape[3], ch=args.ch, ch_mult=args.ch_mult,
                num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn, dropout=args.dropout,
                num_classes=num_classes, group_channels=args.group_channels,
                norm_groups=network_groups(args.ch, args.ch_mult, args.group_channels),
                **({"captions": captions} if captions else {}))


def _configs(args, ckpt, model_config):
    """(model config, diffusion config): the checkpoint's when resuming, else the new ones from the flags, the
    schedule shifted for the network's resolution with --shift-base (highres.py)."""
    if ckpt:
        return ckpt["model_config"], ckpt["diffusion_config"]
    dc = diffusion_config(args.schedule, args.timesteps, args.mean_type)
    if args.shift_base:
        dc.update(shift_base=args.shift_base, logsnr_shift=shift_for(args.shift_base, min(image_hw(
            model_config["image_size"]))))
    return model_config, dc


def _diffusion_run(args, ckpt, images, num_classes, device, class_names=None):
    """DDPM, Algorithm 1: a U-Net, class-conditional with --class-cond, conditioned on the class names as captions
    with --caption-cond; with --multiscale, simple diffusion's loss."""
    model_config, dc = _configs(args, ckpt, _new_model_config(args, images, num_classes if args.class_cond else None,
                                                              list(class_names) if args.caption_cond else None))
    size, base = images.shape[1], args.multiscale
    if base and (images.shape[2] != size or size < base or size % base or (size // base) & (size // base - 1)):
        raise ValueError(f"--multiscale {base}: the images ({images.shape[1]}x{images.shape[2]}) must be square and "
                         f"base times a power of two")
    diffusion = build_diffusion(dc).to(device)
    conditional = model_config.get("num_classes") is not None or model_config.get("captions")
    objective = DiffusionLoss(diffusion, num_classes, args.p_uncond if conditional else 0.0, args.bf16,
                              args.sample_steps, MultiscaleLoss(diffusion, args.multiscale) if args.multiscale else None,
                              model_config.get("captions"))
    return model_config, dc, diffusion, objective


def _autoencoder_run(args, ckpt, images, num_classes, device):
    """Latent diffusion's first stage (autoencoder.py): a KL-regularised autoencoder with a downsampling factor
    --downsample and --latent-channels, on the data's images."""
    levels = round(math.log2(args.downsample)) + 1  # a factor f = 2^(levels - 1)
    model_config = ckpt["model_config"] if ckpt else dict(
        image_size=images.shape[1], in_channels=images.shape[3], latent_channels=args.latent_channels, ch=args.ch,
        ch_mult=[1] + [2] * (levels - 1), num_res_blocks=args.num_res_blocks, group_channels=args.group_channels)
    if images.shape[1] != images.shape[2]:
        raise ValueError("--autoencoder: the first stage here is for square images")
    factor = 2 ** (len(model_config["ch_mult"]) - 1)
    return model_config, {}, None, AutoencoderObjective(model_config["latent_channels"], factor, images)


def _classifier_run(args, ckpt, images, num_classes, device):
    """A noise-aware classifier for classifier guidance, for the diffusion of the model it will guide."""
    model_config, dc = _configs(args, ckpt, _new_model_config(args, images, num_classes))
    diffusion = build_diffusion(dc).to(device)
    return model_config, dc, diffusion, ClassifierObjective(diffusion, args.bf16)


def _super_resolution_run(args, ckpt, images, num_classes, device):
    """A cascade's super-resolution stage from --low-res up to the data's size."""
    model_config, dc = _configs(args, ckpt, dict(_new_model_config(args, images, None), low_res=args.low_res))
    low, size = model_config["low_res"], images.shape[1]
    if images.shape[1] != images.shape[2]:
        raise ValueError("--low-res: a super-resolution stage here is for square images")
    if not 0 < low < size or size % low:
        raise ValueError(f"--low-res {low} must be below the data's size {size} and divide it (area downsampling "
                         f"and nearest upsampling by a whole factor)")
    diffusion = build_diffusion(dc).to(device)
    max_aug = ckpt.get("cond_aug_max", args.cond_aug_max) if ckpt else args.cond_aug_max
    objective = SuperResolutionObjective(diffusion, model_config["low_res"], max_aug, args.bf16, args.sample_steps,
                                         images)
    return model_config, dc, diffusion, objective


def load_teacher(args, ckpt, images, device):
    """The frozen teacher of a distillation run (EMA weights), from the checkpoint when resuming, else --teacher:
    -> (teacher, its diffusion config, how it samples when it is itself a progressive student, else None)."""
    if ckpt:
        teacher = UNet(**ckpt["teacher_config"])
        teacher.load_state_dict(ckpt["teacher"])
        config, sampling = ckpt["teacher_diffusion_config"], ckpt.get("sampling")
    else:
        if not args.teacher:
            raise ValueError(f"--distill {args.distill} needs --teacher (a train.py checkpoint or released weights)")
        teacher, config, meta, _ = load_model(args.teacher)
        sampling = meta["sampling"]  # a progressive student's own DDIM steps; None for a diffusion model
        if not isinstance(teacher, UNet) or (sampling or {}).get("sampler", "ddim") != "ddim":
            raise ValueError(f"--teacher {args.teacher} is a {meta['kind']} checkpoint, not a diffusion model")
        if teacher.config.get("captions"):  # its student would learn the empty caption's steps alone
            raise ValueError(f"--teacher {args.teacher} is a caption model: distillation here learns a teacher's "
                             f"unconditional steps, and a caption model's student would not know its captions")
    check_fits(teacher.config, images, "the teacher")
    return teacher.to(device).eval().requires_grad_(False), config, sampling


def _student(args, ckpt, images, device):
    """A distillation run's teacher and its v-student, which starts as its teacher (an eps-net read as v), with the
    teacher's architecture. -> (model config, diffusion config, diffusion, teacher, teacher diffusion (config),
    how the teacher samples)."""
    teacher, teacher_dc, sampling = load_teacher(args, ckpt, images, device)
    # the teacher's architecture with --student-dropout (0 by default: the papers' students train without dropout)
    model_config = ckpt["model_config"] if ckpt else dict(teacher.config, dropout=args.student_dropout)
    dc = ckpt["diffusion_config"] if ckpt else dict(teacher_dc, mean_type="v")
    return model_config, dc, build_diffusion(dc).to(device), teacher, teacher_dc, sampling


def _progressive_run(args, ckpt, images, num_classes, device):
    """Progressive distillation (distill.ProgressiveDistillation): rounds halving the teacher's DDIM steps."""
    model_config, dc, diffusion, teacher, teacher_dc, teacher_sampling = _student(args, ckpt, images, device)
    if ckpt and "round_starts" in ckpt:
        rounds, starts, r = ckpt["rounds"], ckpt["round_starts"], ckpt["round"]
    else:
        first = ckpt["rounds"][0] * 2 if ckpt else teacher_sampling["steps"] if teacher_sampling else args.teacher_steps
        if first > diffusion.num_timesteps:
            raise ValueError(f"--teacher-steps {first} is more than the teacher's T = {diffusion.num_timesteps}")
        try:
            # a checkpoint from before the starts were kept: its own run's --steps fixed them
            rounds, starts = progressive_schedule(first, args.student_steps, ckpt["args"]["steps"] if ckpt
                                                  else args.steps)
        except ValueError as e:
            raise ValueError(f"--student-steps: {e}") from None
        r = min(max(ckpt["step"] - 1, 0) // starts[1], len(rounds) - 1) if ckpt and len(starts) > 1 else 0
    objective = ProgressiveDistillation(diffusion, teacher, build_diffusion(teacher_dc).to(device), teacher_dc, rounds,
                                        starts, r, args.steps, args.pd_weighting, args.bf16,
                                        args.round_lr == "anneal", args.round_adam == "reset",
                                        args.pd_teacher_clip == "on")
    return model_config, dc, diffusion, objective, teacher


def _consistency_run(args, ckpt, images, num_classes, device):
    """Consistency distillation (distill.ConsistencyDistillation), with a conversion phase for an eps-teacher."""
    model_config, dc, diffusion, teacher, teacher_dc, _ = _student(args, ckpt, images, device)
    teacher_diffusion = build_diffusion(teacher_dc).to(device)
    if ckpt:  # a number of updates, fixed when the run began (a run from before the conversion had none)
        convert_steps = ckpt.get("convert_steps", ckpt["args"].get("convert_steps", 0))
    elif teacher_diffusion.mean_type == "v":
        convert_steps = 0  # a v-teacher is the student's own parameterisation
    elif not -1 <= args.convert_steps < args.steps:
        raise ValueError(f"--convert-steps {args.convert_steps}: give 0..{args.steps - 1} updates of --steps, or -1 "
                         f"for a fifth of them")
    else:
        convert_steps = args.steps // 5 if args.convert_steps < 0 else args.convert_steps
    target = UNet(**model_config).to(device).eval().requires_grad_(False)
    target.load_state_dict(ckpt["target"] if ckpt else teacher.state_dict())
    objective = ConsistencyDistillation(diffusion, teacher, teacher_diffusion, teacher_dc, target, convert_steps,
                                        args.steps, args.cd_mu, args.cd_n, args.cd_solver, args.cd_distance, args.bf16)
    return model_config, dc, diffusion, objective, teacher


BUILDERS = {"diffusion": _diffusion_run, "classifier": _classifier_run, "sr": _super_resolution_run,
            "progressive": _progressive_run, "consistency": _consistency_run, "autoencoder": _autoencoder_run}


def check_fits(config, images, whose):
    """The data's images (uint8 N, H, W, C) against a network's config: its size and its input channels."""
    h, w = image_hw(config["image_size"])
    if (h, w, config["in_channels"]) != tuple(images.shape[1:]):
        raise ValueError(f"the data are {'x'.join(map(str, images.shape[1:3]))} with {images.shape[3]} channel(s), "
                         f"{whose} expects {h}x{w} with {config['in_channels']}")


def build_run(kind, args, ckpt, images, num_classes, device, class_names=None):
    """The model a run of this kind trains (new, or as the checkpoint describes it), its diffusion and its
    objective. images: the process's training images, uint8 (N, H, W, C) on the device; class_names: the data's,
    a new caption model's captions (--caption-cond)."""
    stage = first_stage(args, ckpt, images, device)
    if stage is not None:  # the model learns latents: their shape stands in for the images' from here on
        c, size = stage.autoencoder.config, stage.autoencoder.latent_size
        images = torch.zeros(0, size, size, c["latent_channels"], dtype=torch.uint8, device=device)
    torch.manual_seed(args.seed)  # a new model's initial weights
    built = BUILDERS[kind](args, ckpt, images, num_classes, device, **({"class_names": class_names}
                                                                       if kind == "diffusion" else {}))
    model_config, dc, diffusion, objective = built[:4]
    model = build_model(kind, model_config)
    if stage is not None:  # latents are not bounded: x0_hat is never clipped to [-1, 1] (the reference's choice too)
        objective.clip = False
    if len(built) > 4:  # a student starts as its teacher
        model.load_state_dict(built[4].state_dict())
    c = model_config
    check_fits(c, images, "the checkpoint's model")
    if num_classes is not None and c.get("num_classes") is not None and num_classes > c["num_classes"]:
        raise ValueError(f"the data have {num_classes} classes, the checkpoint's model {c['num_classes']}")
    if c.get("captions") and kind == "diffusion" and list(class_names or ()) != c["captions"]:
        raise ValueError(f"the data's class names are not the caption model's {len(c['captions'])} captions (the "
                         f"data it began with: {c['captions'][0]!r}, ...)")
    return Run(model, model_config, dc, diffusion, objective, stage)
