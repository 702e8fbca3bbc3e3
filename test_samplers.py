"""
Property tests of samplers.py, the samplers from the papers after DDPM: the timestep spacings, and DDIM (Song,
Meng, Ermon 2021) checked against its Eqs. (12) and (16) written out by hand from the betas, against DDPM's
posterior, and with an oracle network. Each docstring states the identity the test checks.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import FAST, SLOW, full, oracle, schedules
from ddpm import GaussianDiffusion, make_beta_schedule
from samplers import (SPACINGS, ddim_sample, ddim_sample_loop, dpm_solver_pp_sample_loop, restart_sample_loop,
                      sample_loop, spaced_timesteps)

# ---- the timestep spacings ----


@FAST
@given(st.integers(1, 1200), st.data())
def test_trailing_spacing_starts_where_the_chain_starts(T, data):
    """trailing: K distinct indices in 0..T-1, strictly decreasing, the first T-1 (where x_T is noise) for
    every K, the gaps within one of T/K; K = T is the whole chain T-1, ..., 0 (Algorithm 2's)."""
    K = data.draw(st.integers(1, T))
    idx = spaced_timesteps(T, K, "trailing")
    assert len(idx) == K and idx[0] == T - 1 and idx[-1] >= 0
    assert all(a > b for a, b in zip(idx, idx[1:]))
    assert all(abs((a - b) - T / K) < 1 for a, b in zip(idx, idx[1:]))
    assert spaced_timesteps(T, T, "trailing") == list(range(T - 1, -1, -1))


def test_every_step_count_of_the_papers_chain_starts_at_noise():
    """For the paper's T = 1000, every --steps K in 1..1000 starts at index 999 with the default spacing."""
    assert all(spaced_timesteps(1000, K)[0] == 999 for K in range(1, 1001))


@FAST
@given(st.integers(2, 1200), st.data())
def test_the_ddim_papers_spacings(T, data):
    """uniform is range(0, T, T // K) (its first K), visited from the top; quadratic is the DDIM code's
    int((sqrt(0.8 T) i / (K - 1))^2), each index once, from the top (0.8 T: where that code stops)."""
    K = data.draw(st.integers(2, T))
    c = T // K
    assert spaced_timesteps(T, K, "uniform") == [c * i for i in range(K)][::-1]
    top = (0.8 * T) ** 0.5
    quad = sorted({math.floor((top * i / (K - 1)) ** 2) for i in range(K)})[::-1]
    assert spaced_timesteps(T, K, "quadratic") == quad
    with pytest.raises(ValueError):
        spaced_timesteps(T, T + 1)
    with pytest.raises(ValueError):
        spaced_timesteps(T, K, "linear")


def test_ddim_paper_spacings_on_cifar10():
    """The DDIM paper's CIFAR-10 settings, T = 1000: quadratic at 10 steps is 0, 9, 39, 88, 158, 246, 355, 483,
    632, 800 (its code's int(linspace(0, sqrt(800), 10) ** 2)); uniform at 10 steps is 0, 100, ..., 900; at 600
    steps uniform starts at 599, not at the noise (why trailing is the default)."""
    assert spaced_timesteps(1000, 10, "quadratic")[::-1] == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert spaced_timesteps(1000, 10, "uniform")[::-1] == list(range(0, 1000, 100))
    assert spaced_timesteps(1000, 600, "uniform")[0] == 599 and spaced_timesteps(1000, 600)[0] == 999


# ---- DDIM ----


@FAST
@given(schedules(min_t=2), st.integers(0, 2**31 - 1), st.data())
def test_ddim_eta1_single_steps_is_the_posterior(betas, seed, data):
    """DDIM Eqs. (12), (16) with eta = 1 and t_prev = t - 1 give mean mu~_t(x_t, x0_hat) and variance
    beta~_t: DDPM's posterior (7) at the predicted x_0."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    i = data.draw(st.integers(1, len(betas) - 1))
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    model = lambda x, t: 0.5 * x
    t = full(2, i)
    a, pred_xstart = ddim_sample(d, model, x_t, t, i - 1, 1.0, torch.zeros_like(z), return_pred_xstart=True)
    b = ddim_sample(d, model, x_t, t, i - 1, 1.0, z)
    post_mean, post_var, _ = d.q_posterior_mean_variance(pred_xstart, x_t, t)
    assert torch.allclose(a, post_mean, rtol=1e-7, atol=1e-9)
    assert torch.allclose(((b - a) / z) ** 2, post_var, rtol=1e-6)


@FAST
@given(schedules(min_t=4), st.floats(0.05, 1.0), st.booleans(), st.integers(0, 2**31 - 1), st.data())
def test_strided_ddim_step_is_eqs_12_and_16(betas, eta, clip, seed, data):
    """A strided step t -> t_prev < t - 1 (or to the data, t_prev = -1), written out from the betas:
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (DDIM Eq. 16), and
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z (DDIM Eq. 12), with
    x0_hat from Eq. (15) (clipped or not) and eps_hat recomputed from it."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    T = len(betas)
    i = data.draw(st.integers(2, T - 1))
    i_prev = data.draw(st.integers(-1, i - 2))
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) * 1.5
    z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_theta = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    out = ddim_sample(d, lambda x, t: eps_theta, x_t, full(2, i), i_prev, eta, z, clip_denoised=clip)
    abar = torch.cumprod(1 - betas, 0)
    a, a_prev = abar[i], (abar[i_prev] if i_prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    x0_hat = (x_t - (1 - a).sqrt() * eps_theta) / a.sqrt()
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    expected = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).sqrt() * eps_hat + sigma * z
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@FAST
@given(schedules(min_t=4, max_t=60), st.integers(1, 20), st.sampled_from(SPACINGS), st.integers(0, 2**31 - 1))
def test_ddim_eta0_is_deterministic(betas, steps, spacing, seed):
    """With eta = 0 DDIM adds no noise: given x_T, two runs with different generators agree; it visits the
    timesteps of its spacing, one network call each."""
    steps = min(steps, len(betas))
    d = GaussianDiffusion(betas)
    model = lambda x, t: 0.2 * x
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    seen = []
    a = ddim_sample_loop(d, model, x_T.shape, steps, 0.0, spacing, noise=x_T.clone(),
                         generator=torch.Generator().manual_seed(1), callback=lambda i, x, p: seen.append(i))
    b = ddim_sample_loop(d, model, x_T.shape, steps, 0.0, spacing, noise=x_T.clone(),
                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and seen == spaced_timesteps(len(betas), steps, spacing)


@SLOW
@given(schedules(max_t=80), st.sampled_from(["eps", "x0"]), st.sampled_from(SPACINGS), st.floats(0, 1),
       st.integers(0, 2**31 - 1))
def test_ddim_with_oracle_recovers_data(betas, mean_type, spacing, eta, seed):
    """DDIM with an oracle network (it knows x_0) ends exactly at x_0 for every spacing and eta: each step
    lands on sqrt(abar_prev) x_0 + ..., and the last goes to abar = 1."""
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    steps = max(1, len(betas) // 3)
    out = ddim_sample_loop(d, oracle(betas, x0, mean_type), x0.shape, steps, eta, spacing,
                           noise=torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), generator=g)
    assert torch.allclose(out.double(), x0, atol=1e-5)


def test_ddim_loop_with_a_generator_leaves_the_global_random_state_alone():
    """Every draw of ddim_sample_loop (x_T and, for eta > 0, each z) comes from the generator it is given."""
    d = GaussianDiffusion(make_beta_schedule("linear", 20, 1e-3, 0.2))
    before = torch.get_rng_state()
    ddim_sample_loop(d, lambda x, t: 0.1 * x, (2, 1, 4, 4), 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


# ---- DPM-Solver++ ----


def gaussian_x0(m, s2, diffusion):
    """The exact x0_hat for data N(m, s2 I): E[x_0 | x_t] = m + s2 sqrt(abar_t) (x_t - sqrt(abar_t) m) /
    (abar_t s2 + 1 - abar_t), as an x0-predicting network (float64, from the diffusion's tables)."""
    def model(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1))).double()
        return m + s2 * a.sqrt() * (x - a.sqrt() * m) / (a * s2 + 1 - a)
    return model


def gaussian_ode(m, s2, x_s, abar_s, abar_t):
    """The probability-flow ODE's exact solution for data N(m, s2 I), from abar_s to abar_t:
    x_t = m sqrt(abar_t) + (x_s - m sqrt(abar_s)) sqrt(abar_t s2 + 1 - abar_t) / sqrt(abar_s s2 + 1 - abar_s)."""
    return m * abar_t ** 0.5 + (x_s - m * abar_s ** 0.5) * ((abar_t * s2 + 1 - abar_t) / (abar_s * s2 + 1 - abar_s)) ** 0.5


@FAST
@given(schedules(min_t=4, max_t=120), st.integers(1, 30), st.sampled_from(SPACINGS), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_first_order_dpm_solver_pp_is_ddim(betas, steps, spacing, clip, seed):
    """DPM-Solver++1 (order 1), x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta, is DDIM with eta = 0
    step for step (another algebraic route to the same update), with and without clipping x0_hat."""
    steps = min(steps, len(betas))
    d = GaussianDiffusion(betas, dtype=torch.float64)
    model = lambda x, t: torch.tanh(1.5 * x) + 0.3 * torch.cos(t.view(-1, 1, 1, 1).double())
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seen = {}
    ours = dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, spacing, order=1, noise=x_T.clone(),
                                     clip_denoised=clip, callback=lambda i, x, p: seen.setdefault("dpm", []).append(x))
    ddim = ddim_sample_loop(d, model, x_T.shape, steps, 0.0, spacing, noise=x_T.clone(), clip_denoised=clip,
                            callback=lambda i, x, p: seen.setdefault("ddim", []).append(x))
    assert len(seen["dpm"]) == len(seen["ddim"]) == len(spaced_timesteps(len(betas), steps, spacing))
    for a, b in zip(seen["dpm"], seen["ddim"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    assert torch.allclose(ours, ddim, rtol=1e-9, atol=1e-9)


@FAST
@given(schedules(min_t=30, max_t=300), st.integers(3, 12), st.sampled_from(SPACINGS), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_dpm_solver_pp_2m_is_algorithm_2_written_out(betas, steps, spacing, clip, seed):
    """DPM-Solver++(2M) against Lu et al.'s Algorithm 2 written out here in its own exponential form, in float64,
    on every spacing (the quadratic one's steps are far from even in lambda, so r_i is far from 1): lambda_t =
    log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i,
    D_i = (1 + 1 / (2 r_i)) x_theta(t_{i-1}) - 1 / (2 r_i) x_theta(t_{i-2}) (x_theta itself at the first step),
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i, and x_theta at the last
    step to the data; a network whose x_theta depends on x and t nonlinearly."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x_T, w = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g).double()
    model = lambda x, t: torch.tanh(w * x + t.view(-1, 1, 1, 1) / len(betas))
    ours = dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, spacing, noise=x_T.clone(), clip_denoised=clip)
    abar = torch.cumprod(1 - betas, 0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x, previous = x_T.clone(), []  # previous: (x_theta, lambda) of the steps so far
    indices = spaced_timesteps(len(betas), steps, spacing)
    for k, i in enumerate(indices):
        eps = model(x, full(3, i))
        x_theta = (x - sigma[i] * eps) / alpha[i]
        x_theta = x_theta.clamp(-1, 1) if clip else x_theta
        if k + 1 == len(indices):
            x = x_theta
            break
        j = indices[k + 1]
        h = lam[j] - lam[i]
        D = x_theta
        if previous:
            r = (lam[i] - previous[-1][1]) / h
            D = (1 + 1 / (2 * r)) * x_theta - 1 / (2 * r) * previous[-1][0]
        x = sigma[j] / sigma[i] * x - alpha[j] * torch.expm1(-h) * D
        previous.append((x_theta, lam[i]))
    assert torch.allclose(ours, x, rtol=1e-6, atol=1e-8)


@FAST
@given(schedules(min_t=4, max_t=200), st.integers(1, 30), st.sampled_from([1, 2]), st.floats(-1, 1),
       st.integers(0, 2**31 - 1))
def test_every_order_is_exact_for_a_point_mass(betas, steps, order, m, seed):
    """Data at a single point m: x0_hat = m whatever x_t (an x0-network returning m), so every order follows the
    ODE exactly, each step landing on m sqrt(abar_t) + (x_T - m sqrt(abar_T)) sqrt(1 - abar_t) / sqrt(1 - abar_T)
    (the closed form below with s^2 = 0), and the last step on m."""
    steps = min(steps, len(betas))
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    indices = spaced_timesteps(len(betas), steps)
    visited = []
    out = dpm_solver_pp_sample_loop(d, lambda x, t: torch.full_like(x, m), x_T.shape, steps, order=order,
                                    noise=x_T.clone(), callback=lambda i, x, p: visited.append(x),
                                    clip_denoised=False)
    for x, i_next in zip(visited, indices[1:]):
        exact = gaussian_ode(m, 0.0, x_T, abar[indices[0]].item(), abar[i_next].item())
        assert torch.allclose(x, exact, rtol=1e-9, atol=1e-9)
    assert torch.allclose(out, torch.full_like(out, m), atol=1e-12)


@FAST
@given(schedules(min_t=30, max_t=300), st.integers(2, 12), st.sampled_from(SPACINGS), st.floats(0, 1),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_sde_dpm_solver_pp_2m_is_k_diffusions_form_written_out(betas, steps, spacing, eta, clip, seed):
    """SDE-DPM-Solver++(2M) with noise scale eta, against its writing-out in the variance-exploding form of
    k-diffusion's sample_dpmpp_2m_sde (another algebraic route: y = x / alpha, sigma~ = sigma / alpha,
    t~ = -log sigma~), in float64, from the same draws z (one per step but the last, after its network call):
        y' = (sigma~' / sigma~) e^{-eta h} y + (1 - e^{-(1 + eta) h}) x_theta
             + 0.5 (1 - e^{-(1 + eta) h}) (x_theta - x_theta_prev) / r + sigma~' sqrt(1 - e^{-2 eta h}) z."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x_T, w = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g).double()
    model = lambda x, t: torch.tanh(w * x + t.view(-1, 1, 1, 1) / len(betas))
    ours = dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, spacing, eta=eta, noise=x_T.clone(),
                                     generator=torch.Generator().manual_seed(seed + 1), clip_denoised=clip)
    abar = torch.cumprod(1 - betas, 0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    g, x, old, h_last = torch.Generator().manual_seed(seed + 1), x_T.clone(), None, None
    indices = spaced_timesteps(len(betas), steps, spacing)
    for i, j in zip(indices, indices[1:] + [-1]):
        x_theta = (x - sigma[i] * model(x, full(3, i))) / alpha[i]
        x_theta = x_theta.clamp(-1, 1) if clip else x_theta
        if j == -1:
            x = x_theta
            break
        s_i, s_j = sigma[i] / alpha[i], sigma[j] / alpha[j]  # sigma~
        h = (-s_j.log()) - (-s_i.log())
        y = x / alpha[i]
        y = s_j / s_i * (-eta * h).exp() * y + (-(-h - eta * h).expm1()) * x_theta
        if old is not None:
            y = y + 0.5 * (-(-h - eta * h).expm1()) * (h / h_last) * (x_theta - old)
        if eta > 0:
            y = y + torch.randn(x.shape, generator=g).double() * s_j * (-(-2 * eta * h).expm1()).sqrt()
        x, old, h_last = alpha[j] * y, x_theta, h
    assert torch.allclose(ours, x, rtol=1e-6, atol=1e-8)


@FAST
@given(schedules(min_t=30, max_t=300), st.integers(1, 12), st.sampled_from(SPACINGS), st.sampled_from([1, 2]),
       st.integers(0, 2**31 - 1))
def test_sde_dpm_solver_pp_at_eta_0_is_the_ode_solver_step_for_step(betas, steps, spacing, order, seed):
    """eta = 0 draws nothing and is the ODE solver (DPM-Solver++1 = DDIM eta 0, 2M = Algorithm 2) step for step,
    whatever generator it is handed, and any eta > 0 draws noise and moves the samples."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    model = lambda x, t: torch.tanh(1.5 * x) + 0.3 * torch.cos(t.view(-1, 1, 1, 1).double())
    runs = {}
    for eta in (0.0, None, 1e-10):
        g = torch.Generator().manual_seed(seed)
        kw = {} if eta is None else dict(eta=eta)
        runs[eta] = []
        dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, spacing, order=order, noise=x_T.clone(), generator=g,
                                  clip_denoised=False, callback=lambda i, x, p, k=eta: runs[k].append(x), **kw)
        if eta == 0.0:
            assert torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state())  # nothing drawn
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0], runs[None]))  # eta = 0 is the ODE solver's default
    moved = max((a - b).abs().max().item() for a, b in zip(runs[0.0], runs[1e-10]))
    assert steps == 1 or moved > 0


@SLOW
@given(schedules(min_t=10, max_t=200), st.integers(1, 12), st.sampled_from(SPACINGS), st.floats(0.05, 1),
       st.floats(-1, 1))
def test_sde_noise_keeps_a_point_masss_marginals(betas, steps, spacing, eta, m):
    """Data at a point m (x0_hat = m exactly): the marginal at every level t is N(m alpha_t, sigma_t^2), and each
    step keeps it exactly whatever eta, the shrunk x_s carrying sigma_t^2 e^{-2 eta h} of the variance and the
    injected noise the rest, sigma_t^2 (1 - e^{-2 eta h}). Monte Carlo over 40,000 chains from x_T ~ q(x_T | m): the
    mean and variance after every step (a slip in the noise's scale, or in eta's, moves the variance)."""
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    indices = spaced_timesteps(len(betas), steps, spacing)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x_T = m * abar[indices[0]].sqrt() + (1 - abar[indices[0]]).sqrt() * torch.randn(n, 1, dtype=torch.float64,
                                                                                   generator=g)
    seen = []
    dpm_solver_pp_sample_loop(d, lambda x, t: torch.full_like(x, m), x_T.shape, steps, spacing, eta=eta, noise=x_T,
                              generator=g, clip_denoised=False, callback=lambda i, x, p: seen.append(x))
    for x, j in zip(seen, indices[1:]):
        var = 1 - abar[j].item()
        assert abs(x.mean().item() - m * abar[j].sqrt().item()) < 5 * math.sqrt(var / n)
        assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / n)


def restart_order(d, steps, levels, restarts, restart_steps):
    """Restart's Algorithm 2 (Xu et al. 2023, Appendix B.2) written out as the timesteps its steps start from and
    land on, [(from, to)], and the restart's own grid (None where there is no room for one): the main grid down to
    t_min (the main timestep nearest sigma~ = levels[0]), then per restart a jump up to t_max and EDM's Eq. (5)
    levels back down, then the main grid to the data."""
    T = d.num_timesteps
    main = spaced_timesteps(T, steps - restarts * restart_steps)
    level = lambda i: math.sqrt((1 - d.alphas_cumprod[i].item()) / d.alphas_cumprod[i].item())
    t_min = min(main[1:], key=lambda i: abs(level(i) - levels[0]))
    t_max = min(range(T), key=lambda i: abs(math.log(level(i)) - math.log(levels[1])))
    if t_max <= t_min or not restarts:  # no room above t_min: the main process takes every step
        grid = spaced_timesteps(T, steps)
        return list(zip(grid, grid[1:] + [-1])), None
    rho, (a, b) = 7.0, (level(t_max) ** (1 / 7.0), level(t_min) ** (1 / 7.0))
    inner = [min(range(t_min, t_max + 1), key=lambda i: abs(math.log(level(i)) - math.log(
        (a + k / restart_steps * (b - a)) ** rho))) for k in range(1, restart_steps)]
    sub = sorted({t_max, t_min, *inner}, reverse=True)
    k = main.index(t_min)
    pairs = list(zip(main[:k], main[1:k + 1]))
    for _ in range(restarts):
        pairs += [("jump", t_max)] + list(zip(sub, sub[1:]))
    return pairs + list(zip(main[k:], main[k + 1:] + [-1])), sub


@FAST
@given(st.integers(10, 40), st.integers(0, 3), st.integers(1, 3), st.sampled_from([(0.06, 1.0), (0.06, 0.3),
                                                                                     (0.2, 5.0)]),
       st.integers(0, 2**31 - 1))
def test_restart_follows_algorithm_2_and_counts_its_network_calls(steps, restarts, restart_steps, levels, seed):
    """restart_sample_loop visits Algorithm 2's order written out above (restart_order), calls the network once per
    step, `steps` times in all where EDM's levels fall on distinct timesteps, and with no restarts is DPM-Solver++(2M)
    on the same grid, to the bit."""
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), dtype=torch.float64)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    calls, visited = [], []
    model = lambda x, t: calls.append(t[0].item()) or torch.tanh(x) * 0.5
    if steps - restarts * restart_steps < 2:
        with pytest.raises(ValueError, match="restart sampling"):
            restart_sample_loop(d, model, x_T.shape, steps, levels, restarts, restart_steps, noise=x_T)
        return
    out = restart_sample_loop(d, model, x_T.shape, steps, levels, restarts, restart_steps, noise=x_T.clone(),
                              generator=torch.Generator().manual_seed(seed), callback=lambda i, x, p: visited.append(i))
    pairs, sub = restart_order(d, steps, levels, restarts, restart_steps)
    assert visited == calls == [a for a, _ in pairs if a != "jump"]
    # the network is called `steps` times, less where EDM's levels share a timestep (sub shorter than its steps + 1)
    assert len(calls) == (steps if sub is None else steps - restarts * (restart_steps + 1 - len(sub)))
    if restarts == 0:
        assert torch.equal(out, dpm_solver_pp_sample_loop(d, model, x_T.shape, steps, noise=x_T.clone()))


@SLOW
@given(st.integers(8, 30), st.integers(1, 3), st.integers(1, 3), st.floats(-1, 1))
def test_restart_noise_keeps_a_point_masss_marginals(steps, restarts, restart_steps, m):
    """Data at a point m (x0_hat = m exactly): the ODE steps keep the marginal N(m alpha_t, sigma_t^2) exactly, so
    after every step, the restarts' jumps included, the chains' mean and variance are those of the level they are
    at only if each jump is Eq. (3): in sigma~'s units x~ + sqrt(t_max^2 - t_min^2) eps, i.e. q(x_{t_max} |
    x_{t_min}). Monte Carlo over 40,000 chains, the levels from Algorithm 2 written out (restart_order)."""
    steps = max(steps, restarts * restart_steps + 2)
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), mean_type="x0", dtype=torch.float64)
    abar, n, g = d.alphas_cumprod, 40_000, torch.Generator().manual_seed(0)
    x_T = m * abar[999].sqrt() + (1 - abar[999]).sqrt() * torch.randn(n, 1, dtype=torch.float64, generator=g)
    seen = []
    restart_sample_loop(d, lambda x, t: torch.full_like(x, m), x_T.shape, steps, (0.06, 1.0), restarts,
                        restart_steps, noise=x_T, generator=g, clip_denoised=False, callback=lambda i, x, p: seen.append(x))
    pairs, _ = restart_order(d, steps, (0.06, 1.0), restarts, restart_steps)
    landed = [b for a, b in pairs if a != "jump"]
    assert len(seen) == len(landed)
    for x, j in zip(seen[:-1], landed[:-1]):
        var = 1 - abar[j].item()
        assert abs(x.mean().item() - m * abar[j].sqrt().item()) < 5 * math.sqrt(var / n)
        assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / n)
    assert torch.allclose(seen[-1], torch.full_like(seen[-1], m))


def gaussian_moments(m, s2, d, indices, eta):
    """The exact mean and variance of SDE-DPM-Solver++(2M)'s x after each step, for data N(m, s2) and the exact
    x0_hat = m + c_t (x_t - m alpha_t), c_t = s2 alpha_t / (s2 abar_t + 1 - abar_t): the update is linear in (x_s,
    x_s') and the noise, so the moments of (x_s, x_s') follow from the update's coefficients (an independent
    writing-out, in moments, of the same recursion)."""
    abar = d.alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    c = s2 * alpha / (s2 * abar + 1 - abar)
    i0 = indices[0]
    mean, cov = [m * alpha[i0], m * alpha[i0]], torch.tensor([[s2 * abar[i0] + 1 - abar[i0], 0.0], [0.0, 0.0]])
    lam_prev, out = None, []
    prev_i = None
    for k, (i, j) in enumerate(zip(indices, indices[1:])):
        lam_i, lam_j = (alpha[i] / sigma[i]).log(), (alpha[j] / sigma[j]).log()
        h = lam_j - lam_i
        a, b = sigma[j] / sigma[i] * torch.exp(-eta * h), -alpha[j] * torch.expm1(-(1 + eta) * h)
        # D = u x_s + v x_s' + w (x_theta = m (1 - c alpha) + c x); order 2 after the first step
        if prev_i is None:
            u, v, w = c[i], 0.0, m * (1 - c[i] * alpha[i])
        else:
            r = (lam_i - lam_prev) / h
            p, q = 1 + 1 / (2 * r), -1 / (2 * r)
            u, v, w = p * c[i], q * c[prev_i], m * (p * (1 - c[i] * alpha[i]) + q * (1 - c[prev_i] * alpha[prev_i]))
        A = torch.tensor([[a + b * u, b * v], [1.0, 0.0]], dtype=torch.float64)
        mean = [(a + b * u) * mean[0] + b * v * mean[1] + b * w, mean[0]]
        noise = sigma[j] ** 2 * -torch.expm1(-2 * eta * h)
        cov = A @ cov @ A.T + torch.tensor([[noise, 0.0], [0.0, 0.0]], dtype=torch.float64)
        out.append((float(mean[0]), cov[0, 0].item()))
        lam_prev, prev_i = lam_i, i
    return out


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sde_solver_on_gaussian_data_moments_and_order(eta):
    """Data N(m, s^2) with its exact x0_hat: (1) Monte Carlo over 200,000 chains of the sampler agrees with the
    exact moments of its recursion (gaussian_moments) after every step; (2) those moments reach the true marginal
    N(m alpha_t, s^2 abar_t + 1 - abar_t) at a level every grid visits as the steps grow, the error of the variance
    shrinking about 4x per doubling (second order) for the ODE and the SDE alike (measured: docs/samplers.md)."""
    betas = make_beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    m, s2 = 0.3, 0.25
    abar = d.alphas_cumprod
    indices = spaced_timesteps(1000, 10)
    n, g = 200_000, torch.Generator().manual_seed(0)
    x_T = m * abar[999].sqrt() + (s2 * abar[999] + 1 - abar[999]).sqrt() * torch.randn(n, 1, dtype=torch.float64,
                                                                                       generator=g)
    seen = []
    dpm_solver_pp_sample_loop(d, gaussian_x0(m, s2, d), x_T.shape, 10, eta=eta, noise=x_T, generator=g,
                              clip_denoised=False, callback=lambda i, x, p: seen.append(x))
    for x, (mean, var) in zip(seen, gaussian_moments(m, s2, d, indices, eta)):
        assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / n)
    grids = {steps: spaced_timesteps(1000, steps) for steps in (25, 50, 100, 200)}
    target = min(set.intersection(*map(set, grids.values())), key=lambda i: abs(i - 200))
    true_var = (s2 * abar[target] + 1 - abar[target]).item()
    errors = []
    for steps, grid in grids.items():
        moments = gaussian_moments(m, s2, d, grid, eta)
        errors.append(abs(moments[grid.index(target) - 1][1] - true_var))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.2 < r < 4.8 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("spacing", ["trailing", "uniform"])
def test_convergence_orders_on_gaussian_data(spacing):
    """For data N(m, s^2 I) with the exact x0_hat as the network, the ODE has the closed form above. Against it,
    at a timestep that every grid visits (the grids of 25, 50, 100 and 200 steps are nested), doubling the steps
    shrinks DDIM's error about 2x (first order) and DPM-Solver++(2M)'s about 4x (second order), and 2M is the more
    accurate at every step count."""
    betas = make_beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    m, s2 = 0.3, 0.25
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grids = {steps: spaced_timesteps(1000, steps, spacing) for steps in (25, 50, 100, 200)}
    target = min(set.intersection(*map(set, grids.values())), key=lambda i: abs(i - 200))
    errors = {1: [], 2: []}
    for steps, indices in grids.items():
        exact = gaussian_ode(m, s2, x_T, abar[indices[0]].item(), abar[target].item())
        for order in (1, 2):
            visited = {}
            dpm_solver_pp_sample_loop(d, gaussian_x0(m, s2, d), x_T.shape, steps, spacing, order=order,
                                      noise=x_T.clone(), clip_denoised=False,
                                      callback=lambda i, x, p: visited.setdefault(i, x))
            x_at_target = visited[indices[indices.index(target) - 1]]  # the step from the index before lands there
            errors[order].append((x_at_target - exact).abs().max().item())
    ratios = {k: [a / b for a, b in zip(v, v[1:])] for k, v in errors.items()}
    assert all(1.8 < r < 2.2 for r in ratios[1]), ratios
    assert all(3.6 < r < 4.4 for r in ratios[2]), ratios
    assert all(e2 < e1 for e1, e2 in zip(errors[1], errors[2]))


@given(st.integers(1, 1200), st.data())
def test_trailing_timesteps_are_the_nearest_indices_to_even_spacing(T, data):
    """Trailing spacing: step i of K sits at the index nearest to the evenly spaced point T (K - i) / K - 1, so the
    gaps are T / K rounded, never truncated (truncation drifts a step early wherever the fraction exceeds 1/2)."""
    K = data.draw(st.integers(1, T))
    for i, t in enumerate(spaced_timesteps(T, K, "trailing")):
        assert abs((t + 1) - T * (K - i) / K) <= 0.5 + 1e-9


@pytest.mark.parametrize("T,K", [(20, 5), (100, 7)])
def test_ancestral_on_a_spaced_chain_adds_the_spaced_posterior_variance(T, K):
    """sample_loop's ddpm sampler with K < T steps is Algorithm 2 on the spaced chain: its first step from t to s
    adds noise of the variance of q(x_s | x_t, x_0) for that chain, beta~ = (1 - abar_s) / (1 - abar_t) *
    (1 - abar_t / abar_s) (Eq. 7 with the chain's beta_t = 1 - abar_t / abar_s). Monte Carlo with x_T = 0 and a
    network predicting eps = 0, so the step's mean is 0 and its spread is the noise alone."""
    d = GaussianDiffusion(make_beta_schedule("linear", T, 1e-3, 0.2), dtype=torch.float64)
    t, s = spaced_timesteps(T, K)[:2]
    first = []
    sample_loop(d, lambda x, tt: torch.zeros_like(x), (40_000, 1), "ddpm", K, noise=torch.zeros(40_000, 1,
                dtype=torch.float64), generator=torch.Generator().manual_seed(0),
                callback=lambda i, x, x0: first.append(x.clone()) if not first else None)
    abar_t, abar_s = d.alphas_cumprod[t].item(), d.alphas_cumprod[s].item()
    beta = 1 - abar_t / abar_s
    variance = beta * (1 - abar_s) / (1 - abar_t)
    assert first[0].mean().abs() < 4 * math.sqrt(variance / 40_000)
    assert abs(first[0].var().item() / variance - 1) < 0.05
