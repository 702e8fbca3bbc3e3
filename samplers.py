"""
Faster samplers for a trained DDPM, from the papers that came after it: DDIM (Song, Meng, Ermon 2021,
arXiv:2010.02502). They reuse the DDPM's tables and conventions (ddpm.py: 0-based timesteps, model(x_t, t)).
"""
import torch

from ddpm import extract


def ddim_sample(diffusion, model, x_t, t, t_prev, eta=0.0, noise=None, clip_denoised=True,
                return_pred_xstart=False):
    """One DDIM step from index t to index t_prev < t (t_prev = -1 means the data).
    DDIM Eq. (12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    DDIM Eq. (16): sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the posterior (7), i.e. DDPM
    with fixedsmall variance. eps_hat is recomputed from the (clipped) x0_hat."""
    if isinstance(t_prev, int):  # as ddim_sample_loop calls it: checked on the host, so the loop never
        assert t_prev >= -1      # waits for the GPU (a check of device values is a sync per step)
        t_prev = torch.full_like(t, t_prev)
    else:
        assert (t_prev < t).all() and (t_prev >= -1).all()
    _, _, _, pred_xstart = diffusion.p_mean_variance(model, x_t, t, clip_denoised)
    eps = diffusion.predict_noise_from_start(x_t, t, pred_xstart)
    abar = extract(diffusion.alphas_cumprod, t, x_t)
    abar_prev = torch.where(t_prev >= 0, diffusion.alphas_cumprod[t_prev.clamp(min=0)],
                            torch.ones_like(diffusion.alphas_cumprod[0]))
    abar_prev = abar_prev.view_as(abar)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    sample = abar_prev.sqrt() * pred_xstart + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            noise = torch.randn_like(x_t)
        sample = sample + sigma * noise
    return (sample, pred_xstart) if return_pred_xstart else sample


@torch.no_grad()
def ddim_sample_loop(diffusion, model, shape, steps, eta=0.0, noise=None, generator=None, clip_denoised=True,
                     callback=None):
    """DDIM sampling over `steps` evenly spaced timesteps 0, c, 2c, ... with c = T // steps,
    the DDIM paper's "uniform" choice (its FID table uses it)."""
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    device = diffusion.betas.device
    timesteps = [i * (T // steps) for i in range(steps)]
    x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    for i, i_prev in zip(reversed(timesteps), reversed([-1] + timesteps[:-1])):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        z = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
        x, pred_xstart = ddim_sample(diffusion, model, x, t, i_prev, eta, z, clip_denoised, return_pred_xstart=True)
        if callback is not None:
            callback(i, x, pred_xstart)
    return x
