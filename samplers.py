"""
Faster samplers for a trained DDPM, from the papers that came after it: DDIM (Song, Meng, Ermon 2021,
arXiv:2010.02502) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), over a subsequence of the T timesteps.
They reuse the DDPM's tables and conventions (ddpm.py: 0-based timesteps, model(x_t, t)), clip x0_hat as the
DDPM sampler does (clip_denoised), and draw every random number from the generator they are given.
"""
import math

import torch

from ddpm import extract
from guidance import classifier_guided_eps

SPACINGS = ("trailing", "uniform", "quadratic")


def spaced_timesteps(num_timesteps, steps, spacing="trailing"):
    """The `steps` timestep indices a strided sampler visits, in the order it visits them (decreasing); after
    the last one it steps to the data (index -1, abar = 1).
    - trailing: round(T - i T / K) - 1 for i = 0..K-1 (diffusers' "trailing"): starts at T - 1, where x_T is
      noise, for every K, and is Algorithm 2's full chain for K = T. The default.
    - uniform: range(0, T, T // K), the DDIM paper's "linear" choice as its code computes it ("uniform" there).
      It starts at (K - 1) T // K, not at T - 1: for K > T / 2 the stride is 1 and the chain starts mid-way.
    - quadratic: int(linspace(0, sqrt(0.8 T), K) ** 2), the DDIM paper's CIFAR-10 choice (Appendix D.2) as its
      code computes it (it stops at 0.8 T, where the text says "close to T"); repeated indices are kept once, a
      repeated step being the identity for the unclipped eta = 0 sampler that setting uses."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing == "trailing":
        indices = [round(T - i * (T / steps)) - 1 for i in range(steps)]
    elif spacing == "uniform":
        indices = list(range(0, T, T // steps))[:steps][::-1]
    elif spacing == "quadratic":
        top = math.sqrt(0.8 * T)
        indices = sorted({int((top * i / max(steps - 1, 1)) ** 2) for i in range(steps)}, reverse=True)
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    return indices


def ddim_sample(diffusion, model, x_t, t, t_prev, eta=0.0, noise=None, clip_denoised=True,
                return_pred_xstart=False):
    """One DDIM step from index t to index t_prev < t (t_prev = -1 means the data).
    DDIM Eq. (12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    DDIM Eq. (16): sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the posterior (7), i.e. DDPM with fixedsmall
    variance. eps_hat is recomputed from the (clipped) x0_hat: with clip_denoised=False it is the network's eps."""
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
def ddim_sample_loop(diffusion, model, shape, steps, eta=0.0, spacing="trailing", noise=None, generator=None,
                     clip_denoised=True, callback=None):
    """DDIM sampling over `steps` timesteps chosen by `spacing` (see spaced_timesteps), from x_T = noise (drawn
    from generator if None). Every draw comes from generator. callback(i, x, pred_xstart) after each step."""
    device = diffusion.betas.device
    indices = spaced_timesteps(diffusion.num_timesteps, steps, spacing)
    x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    for i, i_prev in zip(indices, indices[1:] + [-1]):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        z = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
        x, pred_xstart = ddim_sample(diffusion, model, x, t, i_prev, eta, z, clip_denoised, return_pred_xstart=True)
        if callback is not None:
            callback(i, x, pred_xstart)
    return x


def _alpha_sigma_lambda(diffusion, i):
    """DPM-Solver's alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t) (half
    the log-SNR) at timestep index i, as 0-d tensors on the diffusion's device (no host sync)."""
    abar = diffusion.alphas_cumprod[i]
    return abar.sqrt(), (1 - abar).sqrt(), 0.5 * (abar.log() - diffusion.log_one_minus_alphas_cumprod[i])


@torch.no_grad()
def dpm_solver_pp_sample_loop(diffusion, model, shape, steps, spacing="trailing", order=2, noise=None,
                              generator=None, clip_denoised=True, callback=None):
    """DPM-Solver++ (Lu et al. 2022): the probability-flow ODE solved in data-prediction form, one network call
    per step, over `steps` timesteps chosen by `spacing`, then a last step to the data. x_theta is x0_hat of
    Eq. (15) of DDPM (clipped to [-1, 1] with clip_denoised, the paper's static thresholding).
    - order 1 is DPM-Solver++1, the first step of Algorithm 2, which is DDIM with eta = 0:
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta(x_s, s),  h = lambda_t - lambda_s;
    - order 2 is DPM-Solver++(2M), Algorithm 2: after that first step, each step reuses the previous step's
      x_theta, D = (1 + 1 / (2 r)) x_theta(s) - 1 / (2 r) x_theta(s'), r = h' / h (h' the previous step), in place
      of x_theta(s) in the update above;
    - the last step goes to the data (sigma = 0, lambda = inf), where that update is x_theta itself: x0_hat.
    Its authors' stochastic variant (SDE-DPM-Solver++(2M)) was measured against the ancestral sampler on the
    spaced chain (DDIM with eta = 1) and lost at every NFE on a briefly trained model (README), so it is not here.
    callback(i, x, x0_hat) after each step; x_T = noise, or drawn from generator."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    device = diffusion.betas.device
    indices = spaced_timesteps(diffusion.num_timesteps, steps, spacing)
    x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    previous = None  # (x_theta, lambda) of the step before, for the multistep update
    for i, i_next in zip(indices, indices[1:] + [-1]):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        _, _, _, x0 = diffusion.p_mean_variance(model, x, t, clip_denoised)
        alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(diffusion, i)
        if i_next == -1:  # to the data: alpha = 1, sigma = 0
            x = x0
        else:
            alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(diffusion, i_next)
            h = lambda_t - lambda_s
            D = x0
            if order == 2 and previous is not None:  # Algorithm 2, the multistep correction
                r = (lambda_s - previous[1]) / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0]
            x = sigma_t / sigma_s * x - alpha_t * torch.expm1(-h) * D
        previous = (x0, lambda_s)
        if callback is not None:
            callback(i, x, x0)
    return x


SAMPLERS = ("ddpm", "ddim", "dpm++")


def sample_loop(diffusion, model, shape, sampler="ddpm", steps=None, eta=None, spacing="trailing", noise=None,
                generator=None, clip_denoised=True, callback=None, cond_fn=None):
    """The samplers by name, as the command lines offer them; steps = None means T.
    - ddpm: Algorithm 2 of DDPM over all T steps; with fewer steps, the same ancestral sampler on the spaced
      chain, which is DDIM with eta = 1 (the posterior of each strided step);
    - ddim: DDIM with eta (default 0: deterministic);
    - dpm++: DPM-Solver++(2M).
    cond_fn(x_t, t) = s grad log p(y | x_t): classifier guidance (guidance.py), Dhariwal & Nichol's Algorithm 1 for
    Algorithm 2 over all T steps, their Algorithm 2 (the eps shifted) for every other sampler."""
    T = diffusion.num_timesteps
    steps = T if steps is None else steps
    kw = dict(noise=noise, generator=generator, clip_denoised=clip_denoised, callback=callback)
    full_chain = sampler == "ddpm" and steps == T and spacing == "trailing"
    if cond_fn is not None and not full_chain:
        model = classifier_guided_eps(diffusion, model, cond_fn)
    if sampler == "ddpm":
        if eta not in (None, 1.0):
            raise ValueError("the ddpm sampler has no eta (it is eta = 1); use --sampler ddim for another eta")
        if full_chain:
            return diffusion.p_sample_loop(model, shape, cond_fn=cond_fn, **kw)
        return ddim_sample_loop(diffusion, model, shape, steps, 1.0, spacing, **kw)
    if sampler == "ddim":
        return ddim_sample_loop(diffusion, model, shape, steps, eta or 0.0, spacing, **kw)
    if sampler == "dpm++":
        if eta not in (None, 0.0):
            raise ValueError("dpm++ is deterministic (an ODE solver): it takes no eta")
        return dpm_solver_pp_sample_loop(diffusion, model, shape, steps, spacing, **kw)
    raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
