"""
Cascaded diffusion (Ho, Saharia, Chan, Fleet, Norouzi, Salimans 2021, arXiv:2106.15282): a base model at low
resolution, then super-resolution diffusion models, each conditioned on the image below it (as SR3, Saharia et al.
2021). The super-resolution model is this project's U-Net with the low-resolution image, upsampled to the output
size, as extra input channels, trained with Gaussian conditioning augmentation (non-truncated): the condition is
itself noised to a level s drawn at random, and the model is told s, so at sampling time the base model's errors
can be washed out by choosing s > 0. At sampling time a cascade carries a base model's samples up stage by stage
(upsample_stage, carry_up), each stage's x0_hat projected, if asked, onto the images consistent with its input
(project, from DDNM; not in CDM). The augmentation level, the paper's s, is `aug_level` here.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from guidance import model_fn
from samplers import sample_loop
from unet import UNet, timestep_embedding


def downsample(x, size):
    """Area downsampling (each output pixel the mean of its block): how training makes the low-resolution input."""
    return F.interpolate(x, size=(size, size), mode="area")


def upsample(x, size):
    """Nearest-neighbour upsampling, the stated choice: area downsampling undoes it exactly, downsample(upsample(x))
    = x, so the model is handed the low-resolution image itself, repeated, and nothing a filter invented."""
    return F.interpolate(x, size=(size, size), mode="nearest")


def augment(diffusion, cond, aug_level, noise):
    """Gaussian conditioning augmentation: c~ = q_sample(c, s) = sqrt(abar_s) c + sqrt(1 - abar_s) eps for
    s = aug_level >= 0 (an index into the model's own schedule), and c itself where s = -1 ("none")."""
    noised = diffusion.q_sample(cond, aug_level.clamp(min=0), noise)
    return torch.where((aug_level >= 0).view(-1, 1, 1, 1), noised, cond)


class SuperResolution(nn.Module):
    """eps_theta(x_t, t | c~, s): the U-Net on [x_t, c~] (2C input channels, C output), with the augmentation level s
    told through a second embedding built as the timestep's (sinusoid -> dense -> swish -> dense) and added to it
    before the swish every block takes. s = -1 (no augmentation) is embedded as 0, every level s as s + 1."""

    def __init__(self, low_res, image_size, in_channels=3, **unet_config):
        super().__init__()
        self.unet = UNet(image_size=image_size, in_channels=2 * in_channels, out_channels=in_channels, **unet_config)
        ch = self.unet.ch
        self.aug = nn.ModuleList([nn.Linear(ch, 4 * ch), nn.Linear(4 * ch, 4 * ch)])
        nn.init.zeros_(self.aug[1].weight)  # starts as "no augmentation information", like a residual branch
        nn.init.zeros_(self.aug[1].bias)
        self.low_res, self.num_classes = low_res, None
        self.config = dict(self.unet.config, in_channels=in_channels, low_res=low_res)
        del self.config["out_channels"]

    def forward(self, x, t, cond, aug_level):
        """x: x_t (B, C, H, W); t: (B,) indices; cond: the augmented upsampled low-resolution image c~ (B, C, H, W);
        aug_level: (B,) its augmentation level s (-1: none)."""
        extra = self.aug[1](F.silu(self.aug[0](timestep_embedding(aug_level + 1, self.unet.ch))))
        temb = self.unet.embed(t, None, extra)
        return self.unet.decode(*self.unet.encode(torch.cat([x, cond], dim=1), temb), temb)


def conditioned(model, cond, aug_level):
    """The super-resolution model as the samplers call a network, model(x_t, t), for a fixed condition."""
    return lambda x, t: model(x, t, cond, aug_level)


class SuperResolutionLoss:
    """L_simple (Eq. 14 of DDPM) for the super-resolution model: the low-resolution image is the batch itself
    downsampled, upsampled back, and augmented at a level s drawn uniformly from none, 0, ..., max_aug - 1 (the
    augmentation noise drawn apart from the diffusion's: the two are independent in CDM's Sec. 3.2)."""

    def __init__(self, diffusion, low_res, max_aug, bf16=False):
        self.diffusion, self.low_res, self.max_aug, self.bf16 = diffusion, low_res, max_aug, bf16

    def draw(self, x0, y):
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=x0.device)
        aug_level = torch.randint(-1, self.max_aug, (B,), device=x0.device)
        return t, torch.randn_like(x0), aug_level, torch.randn_like(x0)

    def __call__(self, model, x0, y, t, noise, aug_level, aug_noise):
        cond = augment(self.diffusion, upsample(downsample(x0, self.low_res), x0.shape[-1]), aug_level, aug_noise)
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=self.bf16 and x0.device.type == "cuda"):
            return self.diffusion.training_losses(conditioned(model, cond, aug_level), x0, t, noise), None


# ---- a cascade at sampling time


def check_chain(models, first):
    """ValueError unless the super-resolution models [(name, net), ...] chain from images of shape first (H, W, C):
    each stage's low resolution the size below it, the same channels."""
    size, channels = first[0], first[2]
    for name, net in models:
        c = net.config
        if c["low_res"] != size or c["in_channels"] != channels:
            raise ValueError(f"the cascade does not chain: {name} takes {c['low_res']}x{c['low_res']}x{c['in_channels']}"
                             f" images up to {c['image_size']}x{c['image_size']}, the stage below gives "
                             f"{size}x{size}x{channels}")
        size = c["image_size"]


def project(x0, x_lr, iters=40):
    """Consistency by construction: x0 moved to the nearest image in [-1, 1] whose area downsampling is x_lr.
    Without the bounds this is the range-null space decomposition of DDNM (Wang, Yu, Zhang 2023, arXiv:2212.00490,
    Sec. 3): x0 <- A^+ y + (I - A^+ A) x0 for y = x_lr, A area downsampling and A^+ its pseudo-inverse, nearest
    upsampling (A A^T = I / k^2, so A^+ = k^2 A^T repeats each pixel over its block; DDNM's own choice for
    super-resolution by average pooling): each block shifted by one constant c to the mean y, the detail within it
    kept. With the bounds (the nearest point of a box and an affine set, by its KKT conditions) each pixel is
    clip(x0 + c, -1, 1), c still one constant a block, found by bisection on the block's mean, which rises with c;
    where nothing is clipped that is DDNM's c = y - A x0. x_lr must lie in [-1, 1]."""
    size, n = x0.shape[-1], x_lr.shape[-1]
    k = size // n
    lo = -1 - F.max_pool2d(x0, k)  # every pixel of the block clipped to -1: mean -1 <= y
    hi = 1 + F.max_pool2d(-x0, k)  # every pixel clipped to 1: mean 1 >= y
    for _ in range(iters):
        c = (lo + hi) / 2
        low = downsample((x0 + upsample(c, size)).clamp(-1, 1), n) < x_lr
        lo, hi = torch.where(low, c, lo), torch.where(low, hi, c)
    return (x0 + upsample((lo + hi) / 2, size)).clamp(-1, 1)


def projected(diffusion, model, x_lr):
    """model(x_t, t) whose x0_hat is projected (project) onto the images consistent with x_lr at every step, handed
    back in the network's own parameterisation (ddpm's output_from_start), so every sampler takes it as it is (its
    clipping to [-1, 1] then changes nothing)."""
    def fn(x, t):
        return diffusion.output_from_start(x, t, project(diffusion.predict_start(x, t, model(x, t)), x_lr))
    return fn


@dataclass
class Stage:
    """A super-resolution stage as a cascade samples it: its network and diffusion, the size it draws, its sampler
    (samplers.sample_loop's arguments), the augmentation level its condition gets (-1: none), and whether every
    step's x0_hat is projected onto the images consistent with the input (project; False: CDM's own stage)."""
    net: nn.Module
    diffusion: nn.Module
    size: int
    sampler: str = "ddpm"
    steps: int = None
    eta: float = None
    spacing: str = "trailing"
    cond_aug: int = -1
    bf16: bool = False
    project: bool = False

    def __str__(self):  # the stage in words, for a log line
        return (f"up to {self.size}x{self.size} by {self.sampler} in {self.steps} steps{', projected' * self.project}, "
                f"augmentation {'none' if self.cond_aug < 0 else self.cond_aug}")


def upsample_stage(stage, x_lr, generator):
    """One stage of a cascade (Ho et al. 2021): the super-resolution model's sampler, conditioned on x_lr upsampled to
    its size and augmented to the level stage.cond_aug, the augmentation noise drawn from generator first."""
    B, C = x_lr.shape[:2]
    aug_level = torch.full((B,), stage.cond_aug, device=x_lr.device)
    cond = upsample(x_lr, stage.size)
    cond = augment(stage.diffusion, cond, aug_level, torch.randn(cond.shape, generator=generator, device=x_lr.device))
    fn = model_fn(stage.net, bf16=stage.bf16, cond=cond, aug_level=aug_level)
    if stage.project:
        fn = projected(stage.diffusion, fn, x_lr.clamp(-1, 1))
    return sample_loop(stage.diffusion, fn, (B, C, stage.size, stage.size), stage.sampler, stage.steps, stage.eta,
                       stage.spacing, generator=generator)


def carry_up(stages, x, generator):
    """x (B, C, h, w) in [-1, 1] through each stage in turn. -> (the last stage's samples, the squared difference of
    the output area-downsampled to x's size from x (clipped), summed, on the [0, 255] scale: CDM's requirement that a
    super-resolution sample be consistent with its low-resolution input; 0 without stages)."""
    out = x
    for stage in stages:
        out = upsample_stage(stage, out, generator)
    return out, ((downsample(out, x.shape[-1]) - x.clamp(-1, 1)) * 127.5).square().sum().item() if stages else 0.0
