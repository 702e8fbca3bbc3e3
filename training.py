"""
What train.py's loop runs (bench.py times the same): batches drawn on the device, Adam with the paper's warmup,
one step of Algorithm 1 (gradient accumulation, gradient-norm clipping, the EMA of the weights used for sampling),
and what each kind of run trains, behind the one interface the loop calls (Objective): a DDPM, a noise-aware
classifier, a super-resolution stage, a distilled student.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from autoencoder import Autoencoder, AutoencoderLoss, FirstStage, latent_scale
from captions import tokenize
from cascade import SuperResolutionLoss, downsample, upsample
from checkpoint import build_diffusion, build_model, diffusion_config, load_checkpoint, load_model
from distill import ConsistencyDistillation, ProgressiveDistillation, progressive_schedule
from guidance import ClassifierLoss, model_fn
from highres import MultiscaleLoss, shift_for
from imagefiles import from_uint8
from samplers import sample_loop
from unet import UNet, image_hw, network_groups

# train.py's fast paths and their defaults (bench.py times the same): channels_last and compile stay off until a
# GPU measurement shows they pay (on a CPU neither does).
FAST_PATHS = dict(bf16=True, tf32=True, fused_adam=True, channels_last=False, compile=False)


class Batches:
    """Random batches from uint8 images (N, H, W, C) on their device (for CIFAR-10 on a GPU: 150 MB, gathered by
    index, so the loader never stalls), scaled to [-1, 1] (N, C, H, W). Each epoch is a fresh permutation from a
    generator seeded with (seed, epoch), so the batch at a step depends on the step alone: resuming needs no
    sampler state. With a latent diffusion run's first stage (autoencoder.FirstStage) the batch is handed on as
    scaled latents z = mean + std eps, z ~ q_E(z | x): the mean and std of every image (and of its mirror image,
    with flips) are computed here once, so an update costs no encoder pass; the draws are those of encoding each
    batch afresh (FirstStage.encode), the same random numbers in the same order, up to float rounding."""
    def __init__(self, images, labels, batch_size, seed, flip, first_stage=None, chunk=256):
        if images.shape[0] < batch_size:
            raise ValueError(f"{images.shape[0]} images per process, fewer than the batch of {batch_size}")
        self.images, self.labels, self.batch_size, self.seed, self.flip = images, labels, batch_size, seed, flip
        self.per_epoch, self.epoch, self.perm = images.shape[0] // batch_size, None, None
        self.latents = self.mirrored = None  # (mean, std) of every image's latent, and of its mirror image's
        if first_stage is not None:
            self.latents = self._moments(first_stage, False, chunk)
            self.mirrored = self._moments(first_stage, True, chunk) if flip else None

    def _moments(self, stage, mirror, chunk):
        parts = []
        for i in range(0, self.images.shape[0], chunk):
            x = from_uint8(self.images[i:i + chunk])
            parts.append(stage.moments(x.flip(3) if mirror else x))
        return torch.cat([mean for mean, _ in parts]), torch.cat([std for _, std in parts])

    def __call__(self, step):
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = torch.Generator(self.images.device).manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.images.shape[0], generator=g, device=self.images.device)
        idx = self.perm[k * self.batch_size:(k + 1) * self.batch_size]
        labels = self.labels[idx] if self.labels is not None else None
        # random horizontal flips (paper Sec. 4), on the device
        mirror = torch.rand(len(idx), 1, 1, 1, device=self.images.device) < 0.5 if self.flip else None
        if self.latents is not None:
            mean, std = (v[idx] for v in self.latents)
            if self.mirrored is not None:
                mean, std = (torch.where(mirror, v[idx], u) for v, u in zip(self.mirrored, (mean, std)))
            return mean + std * torch.randn(mean.shape, device=mean.device), labels
        x = from_uint8(self.images[idx])  # [0, 255] -> [-1, 1], as in the paper
        return (x if mirror is None else torch.where(mirror, x.flip(3), x)), labels


def get_lr(step, args):
    """Linear warmup as in the original code: lr * min(step / warmup, 1), step = updates done so far."""
    return args.lr * min(step / args.warmup, 1.0) if args.warmup > 0 else args.lr


def make_optimizer(model, lr, fused, device):
    """Adam as in the paper (betas 0.9, 0.999, eps 1e-8, no weight decay); the fused kernel where there is one."""
    fused = True if fused and device.type in ("cuda", "cpu") else None  # fused CPU Adam needs torch >= 2.4
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def match_layout(optimizer):
    """Give Adam's moments their parameter's memory layout. They load from a checkpoint in the layout they were
    saved in, and fused Adam pairs elements by memory order, not by index: a channels_last parameter with
    NCHW moments would be updated wrongly, without an error."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for all parameters at once."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_step(model, ema, optimizer, objective, x0, y, args, stats=None, losses=None, no_sync=None):
    """One step of Algorithm 1: the loss (an Objective; losses: its compiled __call__, by default the objective
    itself), backward, clip the global grad norm, Adam, EMA, and the objective's own after_update. With
    args.grad_accum = k the batch runs as k micro-batches whose gradients add up to the whole batch's (the same
    random draws, losses summed over the batch / B): only the activations of one micro-batch are held at a time.
    no_sync: DDP's, to skip the all-reduce of all but the last micro-batch. args needs grad_clip, ema_decay,
    grad_accum. stats (3, 4), if given, accumulates per timestep quartile the loss sum, the count and the
    objective's second metric. Returns device tensors (loss, grad norm): nothing here waits for the device."""
    losses = losses or objective
    draws = objective.draw(x0, y)
    B, k = x0.shape[0], args.grad_accum
    total = 0.0
    for j in range(k):
        part = slice(j * B // k, (j + 1) * B // k)
        with no_sync() if no_sync is not None and j < k - 1 else contextlib.nullcontext():
            value, metric = losses(model, x0[part], None if y is None else y[part], *(d[part] for d in draws))
            (value.sum() / B).backward()
        total = total + value.detach().sum()
        if stats is not None:  # loss by timestep quartile, as improved-diffusion logs it
            q = draws[0][part] * 4 // (objective.diffusion.num_timesteps if objective.diffusion is not None else 4)
            stats[0].index_add_(0, q, value.detach().float())
            stats[1].index_add_(0, q, torch.ones_like(value, dtype=torch.float32))
            if metric is not None:
                stats[2].index_add_(0, q, metric.float())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, args.ema_decay)
    objective.after_update(model)
    return total / B, grad_norm

@torch.no_grad()
def sample_images(ema, draw, n, seed, rank=0, world=1, bf16=False, decode=None):
    """n EMA samples for a grid (or None), drawn by draw(model function, shape, generator), the same noise every time (so grids
    show one set improving), with labels spread over the classes for a class-conditional model.
    Under torchrun every rank draws its share and rank 0 gathers them (so no rank idles in a collective while
    one samples, which on a long grid could trip NCCL's watchdog); the noise then depends on the rank count.
    Every draw comes from the grid's own generator, and fork_rng restores the global random state anyway, so
    drawing a grid never changes the training run (resume stays exact). decode: a latent run's first stage, which
    turns the samples into images."""
    device = next(ema.parameters()).device
    c, (h, w) = ema.config["in_channels"], image_hw(ema.config["image_size"])
    captions = ema.config.get("captions")
    y, nrow, classes = None, None, ema.num_classes or len(captions or ())
    if classes:
        nrow = max(1, n // classes)  # one row per class (per training caption)
        y = torch.arange(classes, device=device).repeat_interleave(nrow)
        n = y.shape[0]
    share = math.ceil(n / world)
    if y is not None:
        y = y[torch.arange(rank * share, (rank + 1) * share, device=device) % n]  # the last shares wrap around
        y = tokenize(captions, captions).to(device)[y] if captions else y
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + rank)
        x = draw(model_fn(ema, y, bf16=bf16), (share, c, h, w), g)
    if x is None:  # an objective without samples (a classifier): the same answer on every rank
        return None, None
    x = x if decode is None else decode(x)
    if world > 1:
        shares = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shares, x)
        x = torch.cat(shares)
    return x[:n], nrow

# ---- what a run trains


class Objective:
    """The one interface train.py's loop calls, whatever a run trains:
    - draw(x0, y): all of a batch's random numbers at once (t first), so micro-batches see the same ones;
    - __call__(model, x0, y, *draws) -> per-example losses (B,), and a per-example second metric or None, named by
      `metric` in the log;
    - begin(step, model, ema, optimizer) -> a line for the log, or None: called before update step + 1, where an
      objective that changes during a run changes (distill.py's rounds and phases);
    - after_update(model): after each update (a target network's EMA);
    - learning_rate(step, lr) -> the rate of update step + 1, from the run's (warmed-up) lr;
    - state(diffusion_config) -> what the checkpoint keeps beyond the weights, to resume exactly and to sample;
    - sample(model, shape, generator) -> a grid's samples from a model function (guidance.model_fn), or None.
    This base is a loss that stays as it is all run, sampled as a diffusion model: Algorithm 2 over all T steps, or
    sample_steps strided steps of the same ancestral sampler (DDIM with eta = 1). distill.py's objectives implement
    the same methods."""
    metric = None
    sample_steps = 0
    clip = True  # sampling clips x0_hat to [-1, 1]; a latent model's run turns it off (latents are not bounded)

    def begin(self, step, model, ema, optimizer):
        return None

    def after_update(self, model):
        pass

    def learning_rate(self, step, lr):
        return lr

    def state(self, diffusion_config):
        return {}

    def sample(self, model, shape, generator):
        return sample_loop(self.diffusion, model, shape, "ddpm", self.sample_steps or None, generator=generator,
                           clip_denoised=self.clip)


class DiffusionLoss(Objective):
    """What a DDPM run minimises, Algorithm 1 lines 2-5: L_simple of Eq. (14), per example, for the eps-network (or
    the x0 or v target), with classifier-free guidance's label dropping (Ho & Salimans 2021): each label becomes the
    null class num_classes with probability p_uncond. draw() takes all of a batch's random numbers at once (t, eps,
    which labels drop), so a batch split into micro-batches sees the same ones. captions: a caption model's, whose
    label k stands for captions[k] as tokens, and whose dropped labels become the empty caption."""

    def __init__(self, diffusion, num_classes=None, p_uncond=0.0, bf16=False, sample_steps=0, loss=None,
                 captions=None):
        self.diffusion, self.num_classes, self.p_uncond, self.bf16 = diffusion, num_classes, p_uncond, bf16
        self.sample_steps, self.loss = sample_steps, loss or diffusion.training_losses  # or highres.MultiscaleLoss
        self.tokens = tokenize(captions, captions) if captions else None

    def draw(self, x0, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)  # line 3 (0-based)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.p_uncond
        return t, torch.randn_like(x0), drop  # line 4: eps

    def __call__(self, model, x0, y, t, noise, drop):
        """-> per-example losses (B,), and None (no second metric to log)."""
        if y is not None and self.tokens is not None:  # a caption model: label k -> captions[k]'s tokens
            y = self.tokens.to(y.device)[y]
        if y is not None and self.p_uncond > 0:  # the null label, or the empty caption (token 0 throughout)
            y = torch.where(drop.view(-1, *[1] * (y.dim() - 1)), 0 if self.tokens is not None else self.num_classes, y)
        # Deviation from the paper (fp32 on TPU): bf16 autocast on CUDA; weights, optimizer and loss stay fp32
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=self.bf16 and x0.device.type == "cuda"):
            return self.loss(lambda x, t: model(x, t, y), x0, t, noise), None  # line 5


class ClassifierObjective(ClassifierLoss, Objective):
    """The noise-aware classifier's cross-entropy (guidance.ClassifierLoss), its accuracy logged; no samples."""
    metric = "accuracy"

    def sample(self, model, shape, generator):
        return None


class SuperResolutionObjective(SuperResolutionLoss, Objective):
    """A cascade stage's L_simple (cascade.SuperResolutionLoss). Its grids upsample the process's first training
    images, downsampled (no augmentation), with the sampler of a diffusion run."""

    def __init__(self, diffusion, low_res, max_aug, bf16, sample_steps, grid_images):
        super().__init__(diffusion, low_res, max_aug, bf16)
        self.sample_steps, self.grid_images = sample_steps, grid_images

    def state(self, diffusion_config):
        return dict(cond_aug_max=self.max_aug)

    def sample(self, model, shape, generator):
        low = downsample(from_uint8(self.grid_images[:shape[0]]), self.low_res)
        cond = upsample(low, shape[-1])
        aug_level = torch.full((shape[0],), -1, device=low.device)
        return super().sample(lambda x, t: model(x, t, cond=cond, aug_level=aug_level), shape, generator)


class AutoencoderObjective(AutoencoderLoss, Objective):
    """A latent diffusion model's first stage (autoencoder.AutoencoderLoss): its grids are reconstructions of the
    process's first training images."""

    def __init__(self, latent_channels, factor, grid_images):
        super().__init__(latent_channels, factor)
        self.grid_images = grid_images

    def sample(self, model, shape, generator):
        return model(from_uint8(self.grid_images[:shape[0]]), None)


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
