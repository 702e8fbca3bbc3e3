"""
Parity of ddpm.py with an independent implementation of the same equations: the schedulers of
HF diffusers (DDPMScheduler, DDIMScheduler). Skipped when diffusers is not installed
(`pip install -r requirements-dev.txt`); CI installs it.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ddpm import GaussianDiffusion, make_beta_schedule
from samplers import ddim_sample_loop, dpm_solver_pp_sample_loop, spaced_timesteps

diffusers = pytest.importorskip("diffusers")
PARITY = settings(max_examples=25, deadline=None)


def schedule_pair(name, T):
    ours = make_beta_schedule(name, T)
    theirs = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[name]
    return ours, theirs


@PARITY
@given(st.sampled_from(["linear", "cosine"]), st.integers(10, 1000))
def test_schedules_match(name, T):
    """make_beta_schedule gives diffusers' betas and abar (linear; cosine = squaredcos_cap_v2)."""
    betas, theirs = schedule_pair(name, T)
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
    d = GaussianDiffusion(betas)
    assert torch.allclose(d.betas, sched.betas.float(), rtol=1e-5, atol=1e-8)
    assert torch.allclose(d.alphas_cumprod, sched.alphas_cumprod.float(), rtol=1e-5, atol=1e-8)


@PARITY
@given(st.sampled_from(["linear", "cosine"]), st.sampled_from(["fixedlarge", "fixedsmall"]),
       st.sampled_from(["eps", "x0"]), st.integers(0, 999), st.integers(0, 2**31 - 1))
def test_q_sample_and_p_sample_match_ddpm_scheduler(name, var_type, mean_type, i, seed):
    """Eq. (4) equals DDPMScheduler.add_noise; one step of Algorithm 2 (x0 clipped, posterior mean
    (7), sigma_t^2 = beta_t or beta~_t, no noise at the last step) equals DDPMScheduler.step fed
    the same network output and the same noise."""
    T = 1000
    betas, theirs = schedule_pair(name, T)
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=theirs, clip_sample=True,
        variance_type={"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[var_type],
        prediction_type={"eps": "epsilon", "x0": "sample"}[mean_type])
    sched.set_timesteps(T)
    d = GaussianDiffusion(betas, mean_type=mean_type, var_type=var_type)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.full((2,), i, dtype=torch.long)
    x_t = d.q_sample(x0, t, noise)
    assert torch.allclose(x_t, sched.add_noise(x0, noise, t), atol=1e-5)

    model_output = torch.randn(2, 3, 8, 8, generator=g)
    theirs = sched.step(model_output, i, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    ours = d.p_sample(lambda x, tt: model_output, x_t, t, z)
    # diffusers forms 1 - abar_t in float32 (ours: float64): near t = 0 that rounding, ~1e-7 / (1 - abar_t)
    # relative, shows in the posterior coefficients (cosine, t = 1: ~1e-3)
    tol = 1e-4 + 1e-7 / (1 - d.alphas_cumprod[i].item())
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=tol)


@PARITY
@given(st.sampled_from([5, 10, 50, 100, 600, 1000]), st.sampled_from([0.0, 0.5, 1.0]),
       st.sampled_from(["uniform", "trailing"]), st.integers(0, 2**31 - 1))
def test_ddim_matches_ddim_scheduler(steps, eta, spacing, seed):
    """DDIM Eqs. (12), (16) over the uniform or trailing timesteps equal DDIMScheduler ("leading" and
    "trailing" spacing, abar = 1 after the last step, eps recomputed from the clipped x0), step by step along
    a whole run, visiting the same timesteps. (DDIMScheduler steps back by T // K, so trailing is compared where
    K divides T; at K = 600 its step from 999 would go to 998 where the next trailing timestep is 997.)"""
    if spacing == "trailing" and 1000 % steps:
        steps = 1000 // (1000 // steps)  # 600 -> 1000
    T = 1000
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True,
                                    timestep_spacing={"uniform": "leading", "trailing": "trailing"}[spacing])
    sched.set_timesteps(steps)
    model = lambda x, t: torch.tanh(x) * 0.7 + 0.01 * t.view(-1, 1, 1, 1) / T

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    visited = []
    ours = ddim_sample_loop(d, model, x_T.shape, steps, eta, spacing, x_T.clone(), torch.Generator().manual_seed(seed),
                            callback=lambda i, x, p: visited.append(i))
    assert visited == sched.timesteps.tolist()

    g = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for i in sched.timesteps.tolist():
        z = torch.randn(x.shape, generator=g) if eta > 0 else None
        out = model(x, torch.full((2,), i, dtype=torch.long))
        x = sched.step(out, i, x, eta=eta, use_clipped_model_output=True, variance_noise=z).prev_sample
    assert torch.allclose(ours, x, rtol=1e-4, atol=1e-4)


@PARITY
@given(st.sampled_from([5, 10, 20, 50]), st.sampled_from(["trailing", "uniform", "quadratic"]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_dpm_solver_pp_matches_dpm_solver_multistep_scheduler(steps, spacing, clip, seed):
    """DPM-Solver++(2M) over our timesteps equals diffusers' DPMSolverMultistepScheduler (algorithm_type
    "dpmsolver++", solver_order 2, final_sigmas_type "zero"; our x0 clipping is its thresholding with
    sample_max_value 1, where every sample's threshold is 1) given the same timesteps and network outputs, step by
    step along a whole run."""
    T = 1000
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, solver_order=2, prediction_type="epsilon", final_sigmas_type="zero",
        algorithm_type="dpmsolver++", thresholding=clip, sample_max_value=1.0, dynamic_thresholding_ratio=0.0)
    indices = spaced_timesteps(T, steps, spacing)
    sched.set_timesteps(timesteps=indices)
    model = lambda x, t: torch.tanh(x) * 2.5 + 0.01 * t.view(-1, 1, 1, 1) / T  # x0_hat outside [-1, 1] too

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    visited = []
    ours = dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, spacing, noise=x_T.clone(), clip_denoised=clip,
                                     callback=lambda i, x, p: visited.append(i))
    assert visited == sched.timesteps.tolist()
    x = x_T.clone()
    for i in sched.timesteps.tolist():
        x = sched.step(model(x, torch.full((2,), i, dtype=torch.long)), i, x).prev_sample
    assert torch.allclose(ours, x, rtol=1e-4, atol=1e-4)
