"""
What train.py's loop runs (bench.py times the same): batches drawn on the device, Adam with the paper's warmup,
one step of Algorithm 1 (gradient accumulation, gradient-norm clipping, the EMA of the weights used for sampling),
the one interface the loop calls whatever a run trains (Objective) and the objectives of a DDPM, a noise-aware
classifier, a super-resolution stage and an autoencoder (runs.py sets a run up), and the run's log, whose statistics
train_step accumulates.
"""
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist

from autoencoder import AutoencoderLoss
from captions import tokenize
from cascade import SuperResolutionLoss, downsample, upsample
from guidance import ClassifierLoss, model_fn
from imagefiles import from_uint8
from runtime import format_eta
from samplers import sample_loop
from unet import image_hw

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


# ---- the run's log


class Log:
    """The run's log: on rank 0, each line to the console and to <out>/log.txt, and each interval's numbers as a row
    of <out>/metrics.csv (and to TensorBoard with --tensorboard) for plotting (figures.py --log); the statistics of
    an interval (the loss, the gradient norm, the loss and the objective's metric by timestep quartile) kept as
    device tensors, read only at the log's sync points, so the GPU never waits for Python."""

    def __init__(self, args, master, device, step):
        self.args, self.master, self.acc = args, master, torch.zeros(14, device=device)
        self.time, self.step, self.count, self.board = time.time(), step, 0, None
        if master and args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard); "
                                   "metrics.csv is written without it") from None
            self.board = SummaryWriter(os.path.join(args.out, "tensorboard"))

    def __call__(self, msg, console=True, file="log.txt"):
        if not self.master or msg is None:
            return
        if console:
            print(msg, flush=True)
        try:
            with open(os.path.join(self.args.out, file), "a") as f:
                f.write(msg + "\n")
        except OSError as e:
            raise OSError(f"could not write {self.args.out}/{file}: {e.strerror or e}") from None

    def add(self, loss, grad_norm):
        self.acc[0] += loss
        self.acc[1] += grad_norm

    def interval(self, step, lr, world, metric):
        """The interval's line (and, every tenth and last, the quartiles) and its row; the statistics start again."""
        if world > 1:
            dist.all_reduce(self.acc)
        v, n, args = self.acc.tolist(), (step - self.step) * world, self.args
        img_s = (step - self.step) * args.batch_size / (time.time() - self.time)
        self(f"step {step:>{len(str(args.steps))}d}/{args.steps} | loss {v[0] / n:.4f} | lr {lr:.2e} | "
             f"gnorm {v[1] / n:.2f} | {img_s:7.1f} img/s | eta {format_eta((args.steps - step) * args.batch_size / img_s)}")
        quartiles = [v[2 + i] / max(v[6 + i], 1) for i in range(4)]
        metrics = [v[10 + i] / max(v[6 + i], 1) for i in range(4)] if metric else []
        if self.count % 10 == 0 or step == args.steps:  # the quartiles seen (an autoencoder has no t: q0 alone)
            seen = [i for i in range(4) if v[6 + i]]
            self("  loss by t quartile: " + " | ".join(f"q{i} {quartiles[i]:.4f}" for i in seen))
            if metric:
                self(f"  {metric} by t quartile: " + " | ".join(f"q{i} {metrics[i]:.3f}" for i in seen))
        row = dict(step=step, loss=v[0] / n, lr=lr, grad_norm=v[1] / n, img_per_s=img_s,
                   **{f"loss_q{i}": q for i, q in enumerate(quartiles)},
                   **{f"{metric}_q{i}": m for i, m in enumerate(metrics)})
        if self.master and not os.path.exists(os.path.join(args.out, "metrics.csv")):
            self(",".join(row), console=False, file="metrics.csv")
        self(",".join(f"{x:.6g}" for x in row.values()), console=False, file="metrics.csv")
        for name, value in row.items() if self.board else ():
            self.board.add_scalar(name, value, step)
        self.acc.zero_()
        self.time, self.step, self.count = time.time(), step, self.count + 1
