"""
Faster samplers for a trained DDPM, from the papers that came after it: DDIM (Song, Meng, Ermon 2021,
arXiv:2010.02502), DPM-Solver++ as ODE and SDE (Lu et al. 2022, arXiv:2211.01095) and Restart sampling (Xu et al.
2023, arXiv:2306.14878), over a subsequence of the T timesteps.
They reuse the DDPM's tables and conventions (ddpm.py: 0-based timesteps, model(x_t, t)), clip x0_hat as the
DDPM sampler does (clip_denoised), and draw every random number from the generator they are given. Imports only
torch (and takes any GaussianDiffusion), so it can be copied with ddpm.py alone.
"""
import math

import torch


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


def alpha_sigma(diffusion, t, x=None):
    """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), so x_t = alpha_t x_0 + sigma_t eps (DDPM's Eq. 4 in the
    notation of the later papers), from the diffusion's float64-computed tables, at timestep index t: an int or a
    (B,) LongTensor, -1 meaning the data (alpha = 1, sigma = 0). With x, shaped to broadcast against it. Device
    tensors throughout: no host sync."""
    if isinstance(t, int):  # a host index: a view of the table, no copy to the device
        if t >= 0:
            return diffusion.sqrt_alphas_cumprod[t], diffusion.sqrt_one_minus_alphas_cumprod[t]
        one = diffusion.sqrt_alphas_cumprod.new_ones(())
        return one, one * 0
    index = t.clamp(min=0)
    alpha = torch.where(t >= 0, diffusion.sqrt_alphas_cumprod[index], 1.0)
    sigma = torch.where(t >= 0, diffusion.sqrt_one_minus_alphas_cumprod[index], 0.0)
    if x is not None:
        alpha, sigma = (v.view(-1, *([1] * (x.dim() - 1))) for v in (alpha, sigma))
    return alpha, sigma


def ddim_step(x_t, pred_xstart, alpha_t, sigma_t, alpha_prev, sigma_prev, noise_std=0.0, noise=None):
    """DDIM Eq. (12): x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - noise_std^2) eps_hat + noise_std z, with
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t the eps that x0_hat implies (Eq. 15 of DDPM solved for eps). With
    noise_std = 0 it is deterministic, the probability-flow ODE's first-order step, which DPM-Solver++1 and
    progressive distillation's teacher steps (Salimans & Ho Eqs. 7-8) take too."""
    eps = (x_t - alpha_t * pred_xstart) / sigma_t
    x_prev = alpha_prev * pred_xstart + (sigma_prev ** 2 - noise_std ** 2).clamp(min=0).sqrt() * eps
    return x_prev if noise is None else x_prev + noise_std * noise


def ddim_sample(diffusion, model, x_t, t, t_prev, eta=0.0, noise=None, clip_denoised=True,
                return_pred_xstart=False):
    """One DDIM step from index t to index t_prev < t (t_prev = -1 means the data): ddim_step, its noise DDIM
    Eq. (16): noise_std = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the posterior (7), i.e. DDPM with fixedsmall
    variance. eps_hat is recomputed from the (clipped) x0_hat: with clip_denoised=False it is the network's eps."""
    if isinstance(t_prev, int):  # as ddim_sample_loop calls it: checked on the host, so the loop never
        assert t_prev >= -1      # waits for the GPU (a check of device values is a sync per step)
        t_prev = torch.full_like(t, t_prev)
    else:
        assert (t_prev < t).all() and (t_prev >= -1).all()
    _, _, _, pred_xstart = diffusion.p_mean_variance(model, x_t, t, clip_denoised)
    alpha_t, sigma_t = alpha_sigma(diffusion, t, x_t)
    alpha_prev, sigma_prev = alpha_sigma(diffusion, t_prev, x_t)
    noise_std = eta * sigma_prev / sigma_t * (1 - alpha_t ** 2 / alpha_prev ** 2).sqrt()
    if eta > 0 and noise is None:
        noise = torch.randn_like(x_t)
    sample = ddim_step(x_t, pred_xstart, alpha_t, sigma_t, alpha_prev, sigma_prev, noise_std,
                       noise if eta > 0 else None)
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


def dpm_solver_pp_step(x_s, D, alpha_s, sigma_s, alpha_t, sigma_t, eta=0.0, noise=None):
    """One step of DPM-Solver++ from level s to level t < s, with D the data prediction it uses (x_theta, or the
    multistep combination), h = lambda_t - lambda_s > 0:
        x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-(1 + eta) h}) D + sigma_t sqrt(1 - e^{-2 eta h}) z.
    eta = 0 is the ODE solver's first-order step, DPM-Solver++1 (the DDIM step with eta 0); eta = 1 is the authors'
    SDE-DPM-Solver++1, the reverse SDE's linear part solved exactly with the data prediction held constant (their
    own code: diffusers' algorithm_type "sde-dpmsolver++"); between, the noise scale of k-diffusion's
    sample_dpmpp_2m_sde, which the paper does not have. The noise's variance sigma_t^2 (1 - e^{-2 eta h}) is what the
    deterministic part's shrinking leaves out of the marginal at t."""
    h = (alpha_t / sigma_t).log() - (alpha_s / sigma_s).log()
    x_t = sigma_t / sigma_s * (-eta * h).exp() * x_s - alpha_t * torch.expm1(-(1 + eta) * h) * D
    if eta > 0:
        x_t = x_t + sigma_t * (-torch.expm1(-2 * eta * h)).sqrt() * noise.to(x_t.dtype)
    return x_t


@torch.no_grad()
def dpm_solver_pp_sample_loop(diffusion, model, shape, steps, spacing="trailing", order=2, eta=0.0, noise=None,
                              generator=None, clip_denoised=True, callback=None):
    """DPM-Solver++ (Lu et al. 2022): the diffusion solved in data-prediction form, one network call per step, over
    `steps` timesteps chosen by `spacing`, then a last step to the data. x_theta is x0_hat of Eq. (15) of DDPM
    (clipped to [-1, 1] with clip_denoised, the paper's static thresholding).
    - order 1 is DPM-Solver++1 (dpm_solver_pp_step with D = x_theta(x_s, s)); at eta = 0 it is DDIM with eta = 0;
    - order 2 is DPM-Solver++(2M), Algorithm 2: after that first step, each step reuses the previous step's
      x_theta, D = (1 + 1 / (2 r)) x_theta(s) - 1 / (2 r) x_theta(s'), r = h' / h (h' the previous step), in place
      of x_theta(s); with eta = 1 this is SDE-DPM-Solver++(2M) (diffusers' "sde-dpmsolver++" with its midpoint
      correction, k-diffusion's sample_dpmpp_2m_sde), whose injected noise pulls the chain back toward the marginals
      the ODE's errors drift from;
    - the last step goes to the data (sigma = 0, lambda = inf), where every update is x_theta itself: x0_hat.
    eta scales the noise (0: the ODE solver, 1: the SDE); each step's z is drawn from generator after the network
    call. callback(i, x, x0_hat) after each step; x_T = noise, or drawn from generator."""
    x = torch.randn(shape, generator=generator, device=diffusion.betas.device) if noise is None else noise
    indices = spaced_timesteps(diffusion.num_timesteps, steps, spacing) + [-1]
    return dpm_solver_pp_steps(diffusion, model, x, indices, order, eta, generator, clip_denoised, callback)


def dpm_solver_pp_steps(diffusion, model, x, indices, order=2, eta=0.0, generator=None, clip_denoised=True,
                        callback=None):
    """x, at timestep index indices[0], carried by DPM-Solver++ through the decreasing indices to the last (-1: the
    data), one network call at each index but the last (dpm_solver_pp_sample_loop says how)."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: the ODE solver, 1: the SDE), got {eta}")
    previous = None  # (x_theta, lambda) of the step before, for the multistep update
    for i, i_next in zip(indices, indices[1:]):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        _, _, _, pred_xstart = diffusion.p_mean_variance(model, x, t, clip_denoised)
        alpha_s, sigma_s = alpha_sigma(diffusion, i)
        lambda_s = alpha_s.log() - sigma_s.log()
        if i_next == -1:  # to the data: alpha = 1, sigma = 0
            x = pred_xstart
        else:
            alpha_t, sigma_t = alpha_sigma(diffusion, i_next)
            D = pred_xstart
            if order == 2 and previous is not None:  # Algorithm 2, the multistep correction
                r = (lambda_s - previous[1]) / (alpha_t.log() - sigma_t.log() - lambda_s)
                D = (1 + 1 / (2 * r)) * pred_xstart - 1 / (2 * r) * previous[0]
            z = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else None
            x = dpm_solver_pp_step(x, D, alpha_s, sigma_s, alpha_t, sigma_t, eta, z)
        previous = (pred_xstart, lambda_s)
        if callback is not None:
            callback(i, x, pred_xstart)
    return x


def noise_level(diffusion, t):
    """sigma~_t = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / alpha_t, the variance-
    exploding form in which EDM (Karras et al. 2022) and Restart (Xu et al. 2023) state their times t = sigma~."""
    abar = diffusion.alphas_cumprod.double()
    return ((1 - abar[t]) / abar[t]).sqrt()


def nearest_timestep(diffusion, level, among=None):
    """The timestep index (of `among`, default all T) whose sigma~ is nearest to `level` in log."""
    among = list(range(diffusion.num_timesteps)) if among is None else among
    logs = noise_level(diffusion, torch.tensor(among)).log()
    return among[int((logs - math.log(level)).abs().argmin())]


def edm_timesteps(diffusion, t_max, t_min, steps, rho=7.0):
    """steps + 1 timestep indices from t_max down to t_min, at the noise levels of EDM's discretisation (Karras et
    al. 2022, Eq. 5): sigma~_i = (s_max^(1/rho) + i / steps (s_min^(1/rho) - s_max^(1/rho)))^rho, each at its
    nearest index (repeats dropped)."""
    s_max, s_min = (noise_level(diffusion, t).item() ** (1 / rho) for t in (t_max, t_min))
    levels = [(s_max + i / steps * (s_min - s_max)) ** rho for i in range(steps + 1)]
    indices = [t_max] + [nearest_timestep(diffusion, v, list(range(t_min, t_max + 1))) for v in levels[1:-1]] + [t_min]
    return sorted(set(indices), reverse=True)


# The restart interval in sigma~: t_min = 0.06 as Xu et al.'s CIFAR-10 VP runs; t_max = 1 and one restart of 2 steps are
# this project's choice for few evaluations (docs/samplers.md measures it), where the paper's 0.3 fell below the
# coarse main grids' lowest step.
RESTART = dict(levels=(0.06, 1.0), restarts=1, restart_steps=2)


def restart_min_steps(restarts=RESTART["restarts"], restart_steps=RESTART["restart_steps"]):
    """The fewest network calls restart sampling takes: two main steps (from x_T, and at t_min) beside its restarts'."""
    return restarts * restart_steps + 2


@torch.no_grad()
def restart_sample_loop(diffusion, model, shape, steps, levels=RESTART["levels"], restarts=RESTART["restarts"],
                        restart_steps=RESTART["restart_steps"], spacing="trailing", noise=None, generator=None,
                        clip_denoised=True, callback=None):
    """Restart sampling (Xu et al. 2023, Algorithm 2 in Appendix B.2), with DPM-Solver++(2M) as its ODE solver (the
    paper's Heun, which it says can be swapped for DPM-Solver) and `steps` network calls in all:
    - the main process solves the ODE over the trailing grid of steps - restarts * restart_steps timesteps;
    - at t_min, the main grid's timestep nearest sigma~ = levels[0] (Algorithm 2 rounds t_min to the main grid), it
      restarts `restarts` times: forward noise up to t_max (sigma~ nearest levels[1]), Eq. (3)'s
      x_{t_max} = x_{t_min} + sqrt(t_max^2 - t_min^2) eps in sigma~'s units, which for x_t = alpha_t x~ is
      q(x_{t_max} | x_{t_min}) = N(sqrt(abar_max / abar_min) x, (1 - abar_max / abar_min) I); then the ODE back
      down to t_min in restart_steps steps on EDM's levels (edm_timesteps);
    - then the main process on to the data.
    The noise contracts the errors the ODE steps made above t_min (the paper's argument), where the SDE would inject
    noise at every step. Where the main grid's lowest steps all lie above levels[1] (very few steps) there is no room
    for a restart, and all `steps` go to the main process. callback(i, x, x0_hat) after each step; x_T = noise, or
    drawn from generator."""
    main_steps = steps - restarts * restart_steps
    if restarts < 0 or restart_steps < 1 or steps < restart_min_steps(restarts, restart_steps):
        raise ValueError(f"restart sampling with {restarts} restart(s) of {restart_steps} steps needs "
                         f"{restart_min_steps(restarts, restart_steps)} steps or more in all, got {steps}")
    device = diffusion.betas.device
    x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    main = spaced_timesteps(diffusion.num_timesteps, main_steps, spacing)
    # Algorithm 2 rounds t_min to the nearest main step (in sigma~; the first one, x_T, has no step before it)
    t_min = min(main[1:], key=lambda i: abs(noise_level(diffusion, i).item() - levels[0]))
    t_max = nearest_timestep(diffusion, levels[1])
    kw = dict(generator=generator, clip_denoised=clip_denoised, callback=callback)
    if not restarts or t_max <= t_min:  # the main process alone takes every step, its multistep unbroken
        every = spaced_timesteps(diffusion.num_timesteps, steps, spacing)
        return dpm_solver_pp_steps(diffusion, model, x, every + [-1], **kw)
    k = main.index(t_min)
    x = dpm_solver_pp_steps(diffusion, model, x, main[:k + 1], **kw)
    ratio = diffusion.alphas_cumprod[t_max] / diffusion.alphas_cumprod[t_min]  # abar_max / abar_min
    for _ in range(restarts):
        z = torch.randn(x.shape, generator=generator, device=device)
        x = ratio.sqrt() * x + (1 - ratio).sqrt() * z  # the restart's forward noise: up to t_max
        x = dpm_solver_pp_steps(diffusion, model, x, edm_timesteps(diffusion, t_max, t_min, restart_steps), **kw)
    return dpm_solver_pp_steps(diffusion, model, x, main[k:] + [-1], **kw)


SAMPLERS = ("ddpm", "ddim", "dpm++", "restart")


def is_full_chain(sampler, steps, spacing, num_timesteps):
    """Whether a sampler by name runs DDPM's Algorithm 2 itself: every one of the T steps, ancestrally."""
    return sampler == "ddpm" and steps in (None, num_timesteps) and spacing == "trailing"


def sample_loop(diffusion, model, shape, sampler="ddpm", steps=None, eta=None, spacing="trailing", noise=None,
                generator=None, clip_denoised=True, callback=None, cond_fn=None):
    """The samplers by name, as the command lines offer them; steps = None means T.
    - ddpm: Algorithm 2 of DDPM over all T steps; with fewer steps, the same ancestral sampler on the spaced
      chain, which is DDIM with eta = 1 (the posterior of each strided step);
    - ddim: DDIM with eta (default 0: deterministic);
    - dpm++: DPM-Solver++(2M); with eta > 0 (up to 1), SDE-DPM-Solver++(2M) with that noise scale;
    - restart: Restart sampling (Xu et al. 2023) around DPM-Solver++(2M), `steps` network calls in all.
    cond_fn shifts Algorithm 2's mean (classifier guidance, guidance.py), so it is taken by the full chain only;
    every other sampler is guided through the model it is given (guidance.classifier_guidance decides which)."""
    T = diffusion.num_timesteps
    steps = T if steps is None else steps
    kw = dict(noise=noise, generator=generator, clip_denoised=clip_denoised, callback=callback)
    if cond_fn is not None and not is_full_chain(sampler, steps, spacing, T):
        raise ValueError("cond_fn shifts Algorithm 2's mean: only the full ancestral chain takes it")
    if sampler == "ddpm":
        if eta not in (None, 1.0):
            raise ValueError("the ddpm sampler has no eta (it is eta = 1); use --sampler ddim for another eta")
        if is_full_chain(sampler, steps, spacing, T):
            return diffusion.p_sample_loop(model, shape, cond_fn=cond_fn, **kw)
        return ddim_sample_loop(diffusion, model, shape, steps, 1.0, spacing, **kw)
    if sampler == "ddim":
        return ddim_sample_loop(diffusion, model, shape, steps, eta or 0.0, spacing, **kw)
    if sampler == "dpm++":
        return dpm_solver_pp_sample_loop(diffusion, model, shape, steps, spacing, eta=eta or 0.0, **kw)
    if sampler == "restart":
        if eta not in (None, 0.0):
            raise ValueError("restart sampling's noise is its restarts': it takes no eta")
        return restart_sample_loop(diffusion, model, shape, steps, spacing=spacing, **kw)
    raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")


def choose_sampler(sampler, steps, eta, num_timesteps, own=None):
    """The sampler and steps a command asks for (None: the default), checked: a distilled student's own when it asks
    for none (own: its checkpoint's "sampling"), else Algorithm 2 for all T steps and DDIM for fewer (or with an
    eta). -> (sampler, steps)."""
    mine = (own or {}).get("sampler")
    if mine == "consistency" and sampler not in (None, mine):
        raise ValueError(f"a consistency model samples with its own sampler (Song et al. 2023, Algorithm 1), not "
                         f"--sampler {sampler}; --steps K gives K steps")
    if sampler == "consistency" != mine:
        raise ValueError("--sampler consistency is for consistency models (train.py --distill consistency)")
    if sampler is None and mine:
        sampler, steps = mine, steps or (1 if mine == "consistency" else own["steps"])
    steps = steps or num_timesteps
    if steps > num_timesteps:
        raise ValueError(f"--steps {steps} is more than the model's T = {num_timesteps}")
    if sampler is None:
        sampler = "ddpm" if steps == num_timesteps and eta is None else "ddim"
    if sampler == "ddpm" and eta not in (None, 1.0):
        raise ValueError("--sampler ddpm has no --eta (it is eta 1); use --sampler ddim")
    if sampler == "dpm++" and not 0 <= (eta or 0) <= 1:
        raise ValueError(f"--sampler dpm++ takes --eta in [0, 1] (0: the ODE solver DPM-Solver++(2M), 1: its SDE "
                         f"variant), not {eta}")
    if sampler == "restart" and eta not in (None, 0.0):
        raise ValueError("--sampler restart takes no --eta: its noise is its restarts'")
    if sampler == "restart" and steps < restart_min_steps():
        raise ValueError(f"--sampler restart needs --steps {restart_min_steps()} or more (two main steps beside its "
                         f"restarts')")
    return sampler, steps


def describe_sampler(sampler, steps, eta, spacing, diffusion, last=0.821):
    """One line saying how samples are drawn."""
    T = diffusion.num_timesteps
    if sampler == "consistency":
        tail = f", last noise level {last}" if steps > 1 else ""
        return f"consistency model, {steps} step{'s' if steps > 1 else ''}{tail} (Song et al. 2023, Algorithm 1)"
    if is_full_chain(sampler, steps, spacing, T):
        return f"Algorithm 2, {T} steps, {diffusion.var_type}"
    name = {"ddpm": "ancestral (DDIM eta 1)", "ddim": f"DDIM eta {eta or 0.0}",
            "dpm++": f"SDE-DPM-Solver++(2M) eta {eta}" if eta else "DPM-Solver++(2M)",
            "restart": "Restart around DPM-Solver++(2M) ({restarts} x {restart_steps} steps, sigma~ {levels[0]} to "
                       "{levels[1]})".format(**RESTART)}[sampler]
    return f"{name}, {steps} steps ({spacing} spacing)"
