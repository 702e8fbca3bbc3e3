"""
Cascaded diffusion (Ho, Saharia, Chan, Fleet, Norouzi, Salimans 2021, arXiv:2106.15282): a base model at low
resolution, then super-resolution diffusion models, each conditioned on the image below it (as SR3, Saharia et al.
2021). The super-resolution model is this project's U-Net with the low-resolution image, upsampled to the output
size, as extra input channels, trained with Gaussian conditioning augmentation (non-truncated): the condition is
itself noised to a level s drawn at random, and the model is told s, so at sampling time the base model's errors
can be washed out by choosing s > 0.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import UNet, timestep_embedding


def downsample(x, size):
    """Area downsampling (each output pixel the mean of its block): how training makes the low-resolution input."""
    return F.interpolate(x, size=(size, size), mode="area")


def upsample(x, size):
    """Nearest-neighbour upsampling, the stated choice: area downsampling undoes it exactly, downsample(upsample(x))
    = x, so the model is handed the low-resolution image itself, repeated, and nothing a filter invented."""
    return F.interpolate(x, size=(size, size), mode="nearest")


def augment(diffusion, cond, s, noise):
    """Gaussian conditioning augmentation: c~ = q_sample(c, s) = sqrt(abar_s) c + sqrt(1 - abar_s) eps for s >= 0
    (an index into the model's own schedule), and c itself where s = -1 ("none")."""
    noised = diffusion.q_sample(cond, s.clamp(min=0), noise)
    return torch.where((s >= 0).view(-1, 1, 1, 1), noised, cond)


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

    def forward(self, x, t, cond, s):
        """x: x_t (B, C, H, W); t: (B,) indices; cond: the augmented upsampled low-resolution image c~ (B, C, H, W);
        s: (B,) its augmentation level (-1: none)."""
        extra = self.aug[1](F.silu(self.aug[0](timestep_embedding(s + 1, self.unet.ch))))
        temb = self.unet.embed(t, None, extra)
        return self.unet.decode(*self.unet.encode(torch.cat([x, cond], dim=1), temb), temb)


def conditioned(model, cond, s):
    """The super-resolution model as the samplers call a network, model(x_t, t), for a fixed condition."""
    return lambda x, t: model(x, t, cond, s)


class SuperResolutionLoss:
    """L_simple (Eq. 14 of DDPM) for the super-resolution model: the low-resolution image is the batch itself
    downsampled, upsampled back, and augmented at a level s drawn uniformly from none, 0, ..., max_aug - 1."""

    def __init__(self, diffusion, low_res, max_aug, bf16=False):
        self.diffusion, self.low_res, self.max_aug, self.bf16 = diffusion, low_res, max_aug, bf16

    def draw(self, x0, y):
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=x0.device)
        s = torch.randint(-1, self.max_aug, (B,), device=x0.device)
        return t, torch.randn_like(x0), s, torch.randn_like(x0)

    def __call__(self, model, x0, y, t, noise, s, aug_noise):
        cond = augment(self.diffusion, upsample(downsample(x0, self.low_res), x0.shape[-1]), s, aug_noise)
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=self.bf16 and x0.device.type == "cuda"):
            return self.diffusion.training_losses(conditioned(model, cond, s), x0, t, noise), None
