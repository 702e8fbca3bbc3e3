"""
Sampling from a trained DDPM conditioned on a given image, with no training of its own, from the papers that came
after it:
- SDEdit (Meng et al. 2022, arXiv:2108.01073, Sec. 3.2; Algorithm 4 for a VP diffusion): noise the image to t_0 with
  q(x_t0 | x_0) (DDPM Eq. 4) and run the reverse process from there: strength S = t_0 / T trades faithfulness
  (S = 0 returns the image) for realism (S = 1 is an unconditional sample);
- inpainting by replacement (RePaint, Lugmayr et al. 2022, arXiv:2201.09865, Eq. 8): after every reverse step the
  known region (mask = 1) is replaced by the image noised to that step with q, the unknown region is the model's;
  and RePaint's resampling (Sec. 4.2, Algorithm 1, Appendix B): r passes over each stretch of j steps, r - 1 times
  back up the chain with q(x_t | x_t') and down again, so the unknown region can agree with the known one.
The two compose: with a mask, SDEdit's strength sets where the unknown region starts (1: from noise). The steps are
those of the ancestral sampler (Algorithm 2, or DDIM with eta on a spaced chain): any sampler whose state is x_t
alone. DPM-Solver++(2M) keeps the previous step's x0_hat, which replacing x_t makes stale, so it is not offered;
consistency students sample by their own map and are not offered either.
"""
import torch

from samplers import alpha_sigma, ddim_sample, spaced_timesteps


def edit_start(num_timesteps, strength):
    """SDEdit's t_0 for strength S in [0, 1], as a 0-based index: round(S T) - 1 (-1, the data itself, for S = 0)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"--strength must be in [0, 1], got {strength}")
    return round(strength * num_timesteps) - 1


def noise_to(diffusion, x0, t, noise):
    """x_t ~ q(x_t | x_0) (DDPM Eq. 4) at the 0-based index t, -1 meaning x_0 itself; t an int."""
    alpha, sigma = alpha_sigma(diffusion, t)
    return alpha * x0 + sigma * noise


def jump_back(diffusion, x, t_from, t_to, noise):
    """RePaint's resampling step (Sec. 4.2), from index t_from up to t_to > t_from over a stretch of the chain:
    q(x_to | x_from) = N(sqrt(abar_to / abar_from) x_from, (1 - abar_to / abar_from) I), composed from Eq. (2) of
    DDPM; t_from = -1 is the data (abar = 1)."""
    ratio = (alpha_sigma(diffusion, t_to)[0] / alpha_sigma(diffusion, t_from)[0]) ** 2
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


def repaint_schedule(steps, jump=1, resample=1):
    """RePaint's Appendix B (Algorithm 1 for jump = 1): the order in which the positions 0 (the start) .. steps (the
    data) of a chain of `steps` reverse steps are visited, as moves [(from, to), ...]; down one position is a reverse
    step, up one a q step. RePaint names a position by its timestep index t = steps - 1 - position (-1 the data): on
    arriving at t = 0, jump, 2 jump, ... below steps - jump the chain goes jump positions back up and down again,
    resample - 1 times; never from the data, as Algorithm 1 resamples only while t > 1 (its t is our index + 1)."""
    if jump < 1 or resample < 1:
        raise ValueError(f"--jump and --resample must be at least 1, got {jump} and {resample}")
    jumps = {t: resample - 1 for t in range(0, steps - jump, jump)}
    t, ts = steps - 1, [steps - 1]
    while t >= 0:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump):
                t += 1
                ts.append(t)
    return [(steps - 1 - a, steps - 1 - b) for a, b in zip(ts, ts[1:])]


def full_chain(sampler, start, steps, spacing):
    """Whether an edit from index start runs Algorithm 2 itself: every step of the chain below start, ancestrally."""
    return sampler == "ddpm" and steps in (None, start + 1) and spacing == "trailing"


@torch.no_grad()
def edit_loop(diffusion, model, x0, mask=None, start=None, steps=None, sampler="ddpm", eta=None, spacing="trailing",
              generator=None, clip_denoised=True, cond_fn=None, jump=1, resample=1, callback=None):
    """x0 (B, C, H, W) in [-1, 1] edited: noised to index `start` (SDEdit's t_0; T - 1 by default, where the unknown
    region of an inpainting starts from noise) and taken down `steps` reverse steps of the spaced chain from there
    (all of them by default): Algorithm 2's step on the full chain (cond_fn: classifier guidance's mean shift), else
    DDIM's with eta (1 for the ancestral "ddpm" sampler, 0 by default for "ddim"). mask (B or 1, 1 or C, H, W;
    1 = keep): after every step the known region is x0 noised to that step (RePaint Eq. 8), and x0 itself at the
    end; with resample r > 1, RePaint's jumps back up the chain (repaint_schedule). Every draw from generator."""
    T = diffusion.num_timesteps
    start = T - 1 if start is None else start
    if start < 0:  # strength 0: nothing to do
        return x0.clone()
    steps = start + 1 if steps is None else steps
    full = full_chain(sampler, start, steps, spacing)
    if cond_fn is not None and not full:
        raise ValueError("cond_fn shifts Algorithm 2's mean: only the full ancestral chain takes it")
    eta = 1.0 if sampler == "ddpm" else (eta or 0.0)
    levels = spaced_timesteps(start + 1, steps, spacing) + [-1]  # positions 0..steps, the data last
    draw = lambda: torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = noise_to(diffusion, x0, levels[0], draw())
    moves = repaint_schedule(steps, jump, resample) if mask is not None else zip(range(steps), range(1, steps + 1))
    for p, q in moves:
        t, t_next = levels[p], levels[q]
        if q < p:  # RePaint: back up the chain
            x = jump_back(diffusion, x, t, t_next, draw())
            continue
        tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        z = draw()
        if full:
            x, pred_xstart = diffusion.p_sample(model, x, tt, z, clip_denoised, return_pred_xstart=True, cond_fn=cond_fn)
        else:
            x, pred_xstart = ddim_sample(diffusion, model, x, tt, t_next, eta, z, clip_denoised, return_pred_xstart=True)
        if mask is not None:  # RePaint Eq. (8): the known region from q, the unknown from the model
            x = mask * noise_to(diffusion, x0, t_next, draw()) + (1 - mask) * x
        if callback is not None:
            callback(t, x, pred_xstart)
    return x
