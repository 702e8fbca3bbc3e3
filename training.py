"""
The training step of Algorithm 1 as train.py runs it (and bench.py times it): batches drawn on the device,
Adam with the paper's warmup, gradient-norm clipping, and the EMA of the weights used for sampling.
"""
import contextlib
import math

import torch

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
    return total / B, grad_norm
