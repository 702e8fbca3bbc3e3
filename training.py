"""
What train.py's loop runs (bench.py times the same): batches drawn on the device, Adam with the paper's warmup,
one step of Algorithm 1 (gradient accumulation, gradient-norm clipping, the EMA of the weights used for sampling),
and what each kind of run trains: a DDPM, a noise-aware classifier, a distilled student, a super-resolution stage.
"""
import contextlib
import copy
import math
from types import SimpleNamespace

import torch

from cascade import SuperResolution, SuperResolutionLoss
from checkpoint import build_diffusion, load_model
from distill import ConsistencyLoss, ProgressiveLoss, TeacherRegression, halving_rounds
from guidance import ClassifierLoss, NoisyClassifier
from unet import UNet

# train.py's fast paths and their defaults (bench.py times the same): channels_last and compile stay off until a
# GPU measurement shows they pay (on a CPU neither does).
FAST_PATHS = dict(bf16=True, tf32=True, fused_adam=True, channels_last=False, compile=False)


class Batches:
    """Random batches from the images on their device (for CIFAR-10 on a GPU: 150 MB, gathered by index, so
    the loader never stalls). Each epoch is a fresh permutation from a generator seeded with (seed, epoch),
    so the batch at a step depends on the step alone: resuming needs no sampler state."""
    def __init__(self, images, labels, batch_size, seed, flip):
        if images.shape[0] < batch_size:
            raise SystemExit(f"error: {images.shape[0]} images per process, fewer than the batch of {batch_size}")
        self.images, self.labels, self.batch_size, self.seed, self.flip = images, labels, batch_size, seed, flip
        self.per_epoch, self.epoch, self.perm = images.shape[0] // batch_size, None, None

    def __call__(self, step):
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = torch.Generator(self.images.device).manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.images.shape[0], generator=g, device=self.images.device)
        idx = self.perm[k * self.batch_size:(k + 1) * self.batch_size]
        x = self.images[idx].float() / 127.5 - 1  # [0, 255] -> [-1, 1], as in the paper
        if self.flip:  # random horizontal flips (paper Sec. 4), on the device
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, (self.labels[idx] if self.labels is not None else None)


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
    NCHW moments would be updated wrongly, without an error (seen with torch 2.13 on the CPU)."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for all parameters at once."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


class DiffusionLoss:
    """What a DDPM run minimises, Algorithm 1 lines 2-5: L_simple of Eq. (14), per example, for the eps-network (or
    the x0 target of the paper's ablation), with classifier-free guidance's label dropping (Ho & Salimans 2021):
    each label becomes the null class num_classes with probability p_uncond. draw() takes all of a batch's random
    numbers at once (t, eps, which labels drop), so a batch split into micro-batches sees the same ones."""

    def __init__(self, diffusion, num_classes=None, p_uncond=0.0, bf16=False):
        self.diffusion, self.num_classes, self.p_uncond, self.bf16 = diffusion, num_classes, p_uncond, bf16

    def draw(self, x0, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)  # line 3 (0-based)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.p_uncond
        return t, torch.randn_like(x0), drop  # line 4: eps

    def __call__(self, model, x0, y, t, noise, drop):
        """-> per-example losses (B,), and None (no second metric to log)."""
        if y is not None and self.p_uncond > 0:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        # Deviation from the paper (fp32 on TPU): bf16 autocast on CUDA; weights, optimizer and loss stay fp32
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=self.bf16 and x0.device.type == "cuda"):
            return self.diffusion.training_losses(lambda x, t: model(x, t, y), x0, t, noise), None  # line 5


def train_step(model, ema, optimizer, loss_fn, x0, y, args, stats=None, losses=None, no_sync=None):
    """One step of Algorithm 1: the loss (loss_fn, a DiffusionLoss or another objective with draw() and
    __call__; losses: its compiled __call__, by default loss_fn itself), backward, clip the global grad norm, Adam,
    EMA. With args.grad_accum = k the batch runs as k micro-batches whose gradients add up to the whole batch's
    (the same random draws, losses summed over the batch / B): only the activations of one micro-batch are held at
    a time. no_sync: DDP's, to skip the all-reduce of all but the last micro-batch. args needs grad_clip,
    ema_decay, grad_accum. stats (3, 4), if given, accumulates per timestep quartile the loss sum, the count and
    the objective's second metric. Returns device tensors (loss, grad norm): nothing here waits for the device."""
    losses = losses or loss_fn
    draws = loss_fn.draw(x0, y)
    B, k = x0.shape[0], args.grad_accum
    total = 0.0
    for j in range(k):
        part = slice(j * B // k, (j + 1) * B // k)
        with no_sync() if no_sync is not None and j < k - 1 else contextlib.nullcontext():
            value, metric = losses(model, x0[part], None if y is None else y[part], *(d[part] for d in draws))
            (value.sum() / B).backward()
        total = total + value.detach().sum()
        if stats is not None:  # loss by timestep quartile, as improved-diffusion logs it
            q = draws[0][part] * 4 // loss_fn.diffusion.num_timesteps
            stats[0].index_add_(0, q, value.detach().float())
            stats[1].index_add_(0, q, torch.ones_like(value, dtype=torch.float32))
            if metric is not None:
                stats[2].index_add_(0, q, metric.float())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, args.ema_decay)
    if hasattr(loss_fn, "after_step"):  # an objective with state of its own (consistency's target network)
        loss_fn.after_step()
    return total / B, grad_norm


# ---- what a run trains


def new_diffusion_config(args):
    scale = 1000 / args.timesteps  # = 1 for the paper's T = 1000
    return dict(schedule=args.schedule, num_timesteps=args.timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale,
                mean_type=args.mean_type, var_type="fixedlarge")


def load_teacher(args, ckpt, size, channels, device):
    """The frozen teacher of a distillation run (EMA weights): from the checkpoint when resuming, else --teacher."""
    if ckpt:
        config, diffusion_config, sampling = ckpt["teacher_config"], ckpt["teacher_diffusion_config"], ckpt["sampling"]
        teacher = UNet(**config)
        teacher.load_state_dict(ckpt["teacher"])
    else:
        if not args.teacher:
            raise SystemExit(f"error: --distill {args.distill} needs --teacher (a train.py checkpoint or released weights)")
        teacher, diffusion_config, meta, _ = load_model(args.teacher)
        if meta["kind"] not in ("diffusion", "progressive"):
            raise SystemExit(f"error: --teacher {args.teacher} is a {meta['kind']} checkpoint, not a diffusion model")
        sampling = meta["sampling"] if meta["kind"] == "progressive" else None
    c = teacher.config
    if (c["image_size"], c["in_channels"]) != (size, channels):
        raise SystemExit(f"error: the data are {size}x{size} with {channels} channel(s), the teacher expects "
                         f"{c['image_size']}x{c['image_size']} with {c['in_channels']}")
    return teacher.to(device).eval().requires_grad_(False), diffusion_config, sampling


def build_run(args, ckpt, num_classes, size, channels, device):
    """The model to train (new, or as the checkpoint describes it), its diffusion and the objective. kind:
    diffusion (Algorithm 1), classifier (guidance.ClassifierLoss), progressive or consistency (distill.py)."""
    kind = ckpt.get("kind", "diffusion") if ckpt else (
        "classifier" if args.classifier else args.distill or ("sr" if args.low_res else "diffusion"))
    run = SimpleNamespace(kind=kind, teacher=None, target=None, rounds=None, sampling=None, extra={},
                          convert_steps=0, convert=None)
    torch.manual_seed(args.seed)
    try:
        if kind in ("progressive", "consistency"):
            teacher, teacher_dc, teacher_sampling = load_teacher(args, ckpt, size, channels, device)
            run.teacher, run.teacher_diffusion = teacher, build_diffusion(teacher_dc).to(device)
            run.extra = dict(teacher_config=teacher.config, teacher_diffusion_config=teacher_dc)
            run.model_config = ckpt["model_config"] if ckpt else teacher.config  # the teacher's architecture
            run.diffusion_config = ckpt["diffusion_config"] if ckpt else dict(teacher_dc, mean_type="v")
            run.model = UNet(**run.model_config)
            run.model.load_state_dict(teacher.state_dict())  # the student starts as its teacher (an eps net read as v)
        else:
            run.model_config = ckpt["model_config"] if ckpt else dict(
                image_size=size, in_channels=channels, ch=args.ch, ch_mult=args.ch_mult,
                num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn, dropout=args.dropout,
                num_classes=num_classes if args.class_cond or args.classifier else None,
                **(dict(low_res=args.low_res) if args.low_res else {}))
            run.diffusion_config = ckpt["diffusion_config"] if ckpt else new_diffusion_config(args)
            if kind == "sr" and not 0 < run.model_config["low_res"] < size:
                raise ValueError(f"--low-res {run.model_config['low_res']} must be below the data's size {size}")
            net = {"classifier": NoisyClassifier, "sr": SuperResolution, "diffusion": UNet}[kind]
            run.model = net(**run.model_config)
        run.diffusion = build_diffusion(run.diffusion_config).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if kind != "progressive" and kind != "consistency":
        c = run.model_config
        if (c["image_size"], c["in_channels"]) != (size, channels):
            raise SystemExit(f"error: the data are {size}x{size} with {channels} channel(s), the checkpoint's model "
                             f"expects {c['image_size']}x{c['image_size']} with {c['in_channels']}")
        if num_classes is not None and c.get("num_classes") is not None and num_classes > c["num_classes"]:
            raise SystemExit(f"error: the data have {num_classes} classes, the checkpoint's model {c['num_classes']}")
    if kind == "diffusion":
        run.loss_fn = DiffusionLoss(run.diffusion, num_classes, args.p_uncond if args.class_cond else 0.0, args.bf16)
    elif kind == "classifier":
        run.loss_fn = ClassifierLoss(run.diffusion, args.bf16)
    elif kind == "sr":
        run.loss_fn = SuperResolutionLoss(run.diffusion, run.model_config["low_res"], args.cond_aug_max, args.bf16)
        run.extra = dict(cond_aug_max=args.cond_aug_max)
    elif kind == "progressive":
        start = teacher_sampling["steps"] if teacher_sampling else args.teacher_steps
        if ckpt:
            start = ckpt["rounds"][0] * 2
        if start > run.diffusion.num_timesteps:
            raise SystemExit(f"error: --teacher-steps {start} is more than the teacher's T = "
                             f"{run.diffusion.num_timesteps}")
        try:
            run.rounds = halving_rounds(start, args.student_steps)
        except ValueError as e:
            raise SystemExit(f"error: --student-steps: {e}")
        run.loss_fn = ProgressiveLoss(run.diffusion, run.teacher, run.teacher_diffusion, run.rounds[0],
                                      args.pd_weighting, args.bf16)
    else:
        run.target = copy.deepcopy(run.model).to(device).eval().requires_grad_(False)
        if ckpt:
            run.target.load_state_dict(ckpt["target"])
        run.loss_fn = ConsistencyLoss(run.diffusion, run.teacher, run.teacher_diffusion, run.target, args.cd_mu,
                                      args.cd_n, args.cd_solver, args.cd_distance, args.bf16)
        run.loss_fn.student = run.model
        run.sampling = dict(sampler="consistency", steps=1)
        if run.teacher_diffusion.mean_type != "v":  # an eps- or x0-teacher: convert first (TeacherRegression)
            if not ckpt and not -1 <= args.convert_steps < args.steps:
                raise SystemExit(f"error: --convert-steps {args.convert_steps}: give 0..{args.steps - 1} updates of "
                                 f"--steps, or -1 for a fifth of them")
            run.convert_steps = args.steps // 5 if args.convert_steps < 0 else args.convert_steps
            if ckpt and "convert_steps" not in ckpt["args"]:  # a run from before the conversion had none
                run.convert_steps = 0
            args.convert_steps = run.convert_steps  # saved as a number: a resume with another --steps keeps it
            run.convert = TeacherRegression(run.diffusion, run.teacher, run.teacher_diffusion, args.bf16)
    return run
