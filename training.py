"""
The training step of Algorithm 1 as train.py runs it (and bench.py times it): batches drawn on the device,
Adam with the paper's warmup, gradient-norm clipping, and the EMA of the weights used for sampling.
"""
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


def train_losses(model, diffusion, x0, y, args):
    """Algorithm 1 lines 2-5 on a batch x0 in [-1, 1] (labels y or None): draw t, then the per-example L_simple.
    Returns (t, losses). train.py --compile compiles this function whole: the t and noise draws, q_sample, the
    network and the loss become one graph (and its backward another)."""
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)  # Alg. 1 line 3 (0-based)
    # Deviation from the paper (fp32 on TPU): bf16 autocast on CUDA; weights, optimizer and loss stay fp32
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=args.bf16 and x0.device.type == "cuda"):
        return t, diffusion.training_losses(lambda x, t: model(x, t, y), x0, t)  # Alg. 1 lines 4-5


def train_step(model, ema, optimizer, diffusion, x0, y, args, stats=None, losses_fn=train_losses):
    """One step of Algorithm 1: L_simple (losses_fn: train_losses, or its compiled form), backward, clip the
    global grad norm, Adam, EMA. args needs grad_clip, ema_decay, p_uncond, bf16. If given, stats (2, 4)
    accumulates the loss sum and count per timestep quartile. Returns device tensors (loss, grad norm): nothing
    here waits for the device. The rest of the step is not compiled: Adam and the EMA are one fused kernel each."""
    if y is not None and args.p_uncond > 0:  # classifier-free guidance: drop the label -> the null class
        y = torch.where(torch.rand(y.shape, device=y.device) < args.p_uncond, torch.full_like(y, ema.num_classes), y)
    t, losses = losses_fn(model, diffusion, x0, y, args)
    loss = losses.mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, args.ema_decay)
    if stats is not None:  # loss by timestep quartile, as improved-diffusion logs it
        q = t * 4 // diffusion.num_timesteps
        stats[0].index_add_(0, q, losses.detach().float())
        stats[1].index_add_(0, q, torch.ones_like(losses, dtype=torch.float32))
    return loss.detach(), grad_norm
