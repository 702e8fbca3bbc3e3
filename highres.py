"""
End-to-end diffusion at high resolution, from "simple diffusion" (Hoogeboom, Heek, Salimans 2023, arXiv:2301.11093):
- the shifted schedule (Sec. 3.1): average-pooling an image s x s raises its signal-to-noise ratio by s^2 (Eq. 4), so a
  schedule tuned at a base resolution destroys too little of a larger image's coarse structure at a given t. Its
  log-SNR shifted by 2 log(base / d) for resolution d (Eq. 5, there with base 64) gives the larger image the noise
  the base resolution had: logSNR_shift(t) = logSNR(t) + 2 log(base / d);
- the multiscale loss (Sec. 3.2): the eps error also measured on the images average-pooled to each resolution from
  the base up to d, weighted 1/s: L = sum_s (1/s) L^{s x s}, L^{s x s} = mean over s x s of
  (D_s[eps] - D_s[eps_hat])^2 (the paper's 1/s^2 times a squared norm).
The base schedule is this project's cosine (Nichol & Dhariwal 2021), whose abar_t gives logSNR = log(abar / (1 - abar)).
"""
import math

import torch
import torch.nn.functional as F

from ddpm import make_beta_schedule


def logsnr(betas):
    """log SNR_t = log(abar_t / (1 - abar_t)) of a schedule (float64)."""
    abar = torch.cumprod(1 - betas.double(), 0)
    return abar.log() - torch.log1p(-abar)


def shifted_cosine_betas(num_timesteps, shift):
    """The cosine schedule with its log-SNR shifted by `shift` = 2 log(base / d) (Eq. 5): abar_t =
    sigmoid(logSNR_cos(t) + shift), betas = 1 - abar_t / abar_{t-1}, clipped at 0.999 as the cosine's own (float64)."""
    abar = torch.sigmoid(logsnr(make_beta_schedule("cosine", num_timesteps)) + shift)
    return (1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])).clamp(max=0.999)


def shift_for(base, resolution):
    """Eq. (5)'s shift of the log-SNR for resolution d when the schedule was made for `base`: 2 log(base / d)."""
    return 2 * math.log(base / resolution)


class MultiscaleLoss:
    """Sec. 3.2's loss for an eps-, x0- or v-network: the network's eps_hat (what its prediction implies, DDPM Eq. 15)
    against the true eps, both average-pooled to every resolution s = base, 2 base, ..., d, each mean squared error
    weighted 1/s; t, eps and the class labels drawn as Algorithm 1 draws them (training.DiffusionLoss)."""

    def __init__(self, diffusion, base):
        self.diffusion, self.base = diffusion, base

    def __call__(self, model, x0, t, noise):
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = model(x_t, t).float()
        eps_hat = self.diffusion.predict_noise_from_start(x_t, t, self.diffusion.predict_start(x_t, t, out))
        d, s, total = x0.shape[-1], self.base, 0.0
        while s <= d:
            pool = lambda x: F.adaptive_avg_pool2d(x, s) if s < d else x
            total = total + ((pool(noise) - pool(eps_hat)) ** 2).flatten(1).mean(1) / s
            s *= 2
        return total
