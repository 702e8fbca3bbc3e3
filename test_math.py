"""
Property tests of ddpm.py: every formula is checked against an independent route (the forward
chain iterated step by step, Bayes' rule for Gaussians, Monte Carlo, numerical integration,
autograd) over schedules, timesteps and data drawn by hypothesis. Each docstring states the
identity the test checks. Independent derivations are computed in float64 from the betas alone.
"""

import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

from conftest import FAST, SLOW, chain_moments, destroying_schedules, full, gaussian_logpdf, oracle, schedules
from ddpm import GaussianDiffusion, discretized_gaussian_log_likelihood, make_beta_schedule, normal_kl

# ---- the schedule tables ----


@FAST
@given(schedules())
def test_schedule_tables(betas):
    """abar_t is strictly decreasing in (0, 1); abar at index 0 is alpha_1; abar_prev is abar
    shifted by one with abar_0 = 1; the posterior variance at index 0 is 0;
    sqrt(abar)^2 + sqrt(1 - abar)^2 = 1; buffers are float32."""
    d = GaussianDiffusion(betas)
    abar = d.alphas_cumprod.double()
    assert d.betas.dtype == torch.float32 and len(abar) == len(betas)
    assert ((abar > 0) & (abar < 1)).all()
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0].item() == pytest.approx(1 - betas[0].item(), rel=1e-6)
    assert d.alphas_cumprod_prev[0] == 1 and torch.equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    assert d.posterior_variance[0] == 0
    one = d.sqrt_alphas_cumprod.double() ** 2 + d.sqrt_one_minus_alphas_cumprod.double() ** 2
    assert torch.allclose(one, torch.ones_like(one), atol=1e-6)


@FAST
@given(schedules())
def test_tables_are_float64_math_stored_as_float32(betas):
    """STYLE rule 5: the default float32 buffers are the float64 tables rounded once (not float32
    math), and .to(dtype) / state_dict carry them."""
    d32, d64 = GaussianDiffusion(betas), GaussianDiffusion(betas, dtype=torch.float64)
    for name, buf in d32.named_buffers():
        assert buf.dtype == torch.float32
        assert torch.equal(buf, getattr(d64, name).float()), name
    assert set(d32.state_dict()) >= {"betas", "alphas_cumprod", "posterior_mean_coef1"}


@FAST
@given(schedules(min_t=3), st.sampled_from(["fixedlarge", "fixedsmall"]))
def test_reverse_variances(betas, var_type):
    """Sec. 3.2: sigma_t^2 = beta_t (fixedlarge) or beta~_t = (1-abar_{t-1})/(1-abar_t) beta_t
    (fixedsmall) for every t > 1, derived here from the product of alphas. At the first step both
    use beta~_2, as the original code does (beta~_1 = 0 would make the decoder degenerate)."""
    d = GaussianDiffusion(betas, var_type=var_type)
    abar = torch.cumprod(1 - betas, 0)
    tilde = (1 - abar[:-1]) / (1 - abar[1:]) * betas[1:]
    expected = betas[1:] if var_type == "fixedlarge" else tilde
    assert torch.allclose(d.model_variance[1:].double(), expected, rtol=1e-5, atol=1e-12)
    assert torch.allclose(d.model_log_variance.double(), d.model_variance.double().log(), atol=1e-5)
    assert d.model_variance[0].item() == pytest.approx(tilde[0].item(), rel=1e-6)


@FAST
@given(st.integers(2, 2000))
def test_cosine_schedule_closed_form(T):
    """Nichol & Dhariwal's cosine schedule: abar_t = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2,
    wherever their beta clipping at 0.999 is inactive."""
    betas = make_beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = torch.cumprod(1 - betas, 0)
    for t in range(1, T):  # the last beta is the clipped one
        if betas[:t].max() < 0.999:
            assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9, abs=1e-12)


def test_linear_schedule_is_the_papers():
    """Sec. 4: T = 1000 betas rising linearly from 1e-4 to 0.02, in float64."""
    betas = make_beta_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    with pytest.raises(ValueError):
        make_beta_schedule("quadratic")


# ---- the forward process ----


@FAST
@given(schedules(), st.floats(-1, 1), st.data())
def test_closed_form_equals_iterated_chain_moments(betas, x0, data):
    """Eq. (4) q(x_t|x_0) = N(sqrt(abar_t) x_0, (1-abar_t) I) equals the moments of Eq. (2)
    iterated t times from the point mass at x_0."""
    d = GaussianDiffusion(betas)
    means, variances = chain_moments(betas, x0, 0.0)
    t = data.draw(st.integers(0, len(betas) - 1))
    mean, var, log_var = d.q_mean_variance(torch.full((1, 1), x0), full(1, t))
    assert mean.item() == pytest.approx(means[t], abs=1e-6)
    assert var.item() == pytest.approx(variances[t], rel=1e-5, abs=1e-7)
    assert log_var.exp().item() == pytest.approx(variances[t], rel=1e-5, abs=1e-7)


@SLOW
@given(schedules(max_t=60), st.floats(-1, 1), st.integers(0, 2**31 - 1))
def test_q_sample_matches_chain_monte_carlo(betas, x0, seed):
    """Monte Carlo: running the chain (2) step by step and drawing q_sample (4) in one jump give
    the same distribution at every t (means and variances agree within 6 standard errors)."""
    d = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(seed)
    n = 20000
    x = torch.full((n,), x0, dtype=torch.float64)
    for t, beta in enumerate(betas.tolist()):
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
        jump = d.q_sample(torch.full((n, 1), x0), full(n, t), torch.randn(n, 1, generator=g)).squeeze(1)
        var = x.var().item()
        se_mean = math.sqrt(2 * var / n)
        assert abs(x.mean().item() - jump.mean().item()) < 6 * se_mean + 1e-6
        assert abs(var - jump.double().var().item()) < 6 * var * math.sqrt(4 / n) + 1e-6


@SLOW
@given(destroying_schedules(), st.floats(-5, 5), st.floats(0.01, 4.0), st.integers(0, 2**31 - 1))
def test_x_T_converges_to_standard_normal(betas, mu, sd, seed):
    """For data of any mean and variance, x_T has mean sqrt(abar_T) mu -> 0 and variance
    abar_T sd^2 + 1 - abar_T -> 1 once the schedule destroys the signal (abar_T ~ 0). The chain
    moments are checked exactly, and q_sample of x_T by Monte Carlo against N(0, 1)."""
    d = GaussianDiffusion(betas)
    means, variances = chain_moments(betas, mu, sd ** 2)
    abar_T = torch.prod(1 - betas).item()
    assert abar_T < 1e-3
    assert abs(means[-1]) <= math.sqrt(abar_T) * abs(mu) + 1e-12
    assert variances[-1] == pytest.approx(1 + abar_T * (sd ** 2 - 1), rel=1e-9)
    g = torch.Generator().manual_seed(seed)
    n = 40000
    x0 = mu + sd * torch.randn(n, 1, generator=g)
    x_T = d.q_sample(x0, full(n, len(betas) - 1), torch.randn(n, 1, generator=g))
    assert abs(x_T.mean().item()) < 6 / math.sqrt(n) + math.sqrt(abar_T) * abs(mu)
    assert abs(x_T.var().item() - 1) < 6 * math.sqrt(2 / n) + abar_T * sd ** 2 * 2


@FAST
@given(st.floats(1e-4, 0.2), st.integers(1, 400), st.floats(-3, 3), st.floats(0.0, 4.0))
def test_constant_beta_geometric_series(beta, T, mu, var0):
    """With constant beta, Var(x_t) = (1-beta)^t Var(x_0) + 1 - (1-beta)^t: the geometric series
    sum_{s<t} beta (1-beta)^s = 1 - (1-beta)^t. Checked against Eq. (4) applied to data of
    variance var0 (Var = abar var0 + 1 - abar) and against the iterated moment recursion."""
    d = GaussianDiffusion(make_beta_schedule("const", T, beta_end=beta))
    t = T - 1
    geometric = (1 - beta) ** T * var0 + sum(beta * (1 - beta) ** s for s in range(T))
    _, var_given_x0, _ = d.q_mean_variance(torch.zeros(1, 1), full(1, t))
    abar = d.alphas_cumprod[t].item()
    assert abar * var0 + var_given_x0.item() == pytest.approx(geometric, rel=1e-4, abs=1e-6)
    _, variances = chain_moments(make_beta_schedule("const", T, beta_end=beta), mu, var0)
    assert variances[-1] == pytest.approx(geometric, rel=1e-9)


# ---- the posterior q(x_{t-1} | x_t, x_0) ----


@FAST
@given(schedules(), st.data())
def test_posterior_is_bayes_rule(betas, data):
    """Eqs. (6), (7) equal Bayes' rule q(x_{t-1}|x_t,x_0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x_0) done as a
    product of Gaussians in x_{t-1}: precision = 1/(1-abar_{t-1}) + alpha_t/beta_t, mean =
    variance (sqrt(abar_{t-1}) x_0/(1-abar_{t-1}) + sqrt(alpha_t) x_t/beta_t). At index 0 the
    posterior is the point mass at x_0."""
    d = GaussianDiffusion(betas)
    n = 8
    x0 = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)), dtype=torch.float64)
    x_t = torch.tensor(data.draw(st.lists(st.floats(-4, 4), min_size=n, max_size=n)), dtype=torch.float64)
    t = data.draw(st.integers(0, len(betas) - 1))
    mean, var, log_var = d.q_posterior_mean_variance(x0.view(n, 1).float(), x_t.view(n, 1).float(), full(n, t))
    if t == 0:
        assert torch.allclose(mean.squeeze(1).double(), x0, atol=1e-6) and (var == 0).all()
        return
    beta = betas[t]
    abar_prev = torch.prod(1 - betas[:t])
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_var = 1 / precision
    expected_mean = expected_var * (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * x_t / beta)
    assert torch.allclose(var.squeeze(1).double(), expected_var.expand(n), rtol=1e-4)
    assert torch.allclose(log_var.squeeze(1).double(), expected_var.log().expand(n), atol=1e-4)
    assert torch.allclose(mean.squeeze(1).double(), expected_mean, rtol=1e-4, atol=1e-5)


@SLOW
@given(schedules(min_t=2, max_t=200), st.floats(-1, 1), st.integers(0, 2**31 - 1), st.data())
def test_posterior_monte_carlo_regression(betas, x0, seed, data):
    """Monte Carlo: draw x_{t-1} ~ q(x_{t-1}|x_0), x_t ~ q(x_t|x_{t-1}) and regress x_{t-1} on x_t.
    The least-squares slope is posterior_mean_coef2, the intercept coef1 x_0, and the residual
    variance beta~_t (Eqs. 6, 7), within Monte Carlo error."""
    t = data.draw(st.integers(1, len(betas) - 1))
    d = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(seed)
    n = 100000
    abar_prev = torch.prod(1 - betas[:t]).item()
    beta = betas[t].item()
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
    xc = x_t - x_t.mean()
    slope = (xc * (x_prev - x_prev.mean())).sum() / (xc ** 2).sum()
    intercept = x_prev.mean() - slope * x_t.mean()
    resid_var = (x_prev - intercept - slope * x_t).var()
    coef1, coef2 = d.posterior_mean_coef1[t].item(), d.posterior_mean_coef2[t].item()
    post_var = d.posterior_variance[t].item()
    se_slope = math.sqrt(post_var / (xc ** 2).sum().item())
    assert abs(slope.item() - coef2) < 6 * se_slope + 1e-5
    # The intercept's error is dominated by slope error times mean(x_t).
    assert abs(intercept.item() - coef1 * x0) < 6 * (se_slope * abs(x_t.mean().item()) + math.sqrt(post_var / n)) + 1e-5
    assert abs(resid_var.item() - post_var) < 6 * post_var * math.sqrt(2 / n) + 1e-7


# ---- noise, x0 and the score ----


@FAST
@given(schedules(), st.integers(0, 2**31 - 1), st.data())
def test_x0_eps_roundtrip(betas, seed, data):
    """Eq. (15) and its inverse: with x_t = q_sample(x_0, t, eps), predict_start_from_noise
    recovers x_0 and predict_noise_from_start recovers eps. Recovering x_0 divides by sqrt(abar_t), which
    magnifies float64 rounding of x_t (~1e-16) by 1/sqrt(abar_t): the tolerance says so."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=4, max_size=4)))
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    x_t = d.q_sample(x0, t, eps)
    tol = 1e-13 / d.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    assert ((d.predict_start_from_noise(x_t, t, eps) - x0).abs() <= tol).all()
    assert torch.allclose(d.predict_noise_from_start(x_t, t, x0), eps, atol=1e-6)


@FAST
@given(schedules(), st.sampled_from(["eps", "x0", "v"]), st.integers(0, 2**31 - 1), st.data())
def test_output_from_start_is_the_networks_target(betas, mean_type, seed, data):
    """output_from_start inverts predict_start: for x_t = q_sample(x_0, t, eps) it gives the output a network of
    each mean_type is trained to (eps; x_0; v = sqrt(abar) eps - sqrt(1 - abar) x_0, from alpha and sigma here),
    and predict_start takes that output back to x_0."""
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=4, max_size=4)))
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    x_t = d.q_sample(x0, t, eps)
    abar = torch.cumprod(1 - betas.double(), 0)[t].view(-1, 1, 1, 1)
    target = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[mean_type]
    out = d.output_from_start(x_t, t, x0)
    assert torch.allclose(out, target, atol=1e-6)
    tol = 1e-13 / abar.sqrt() + 1e-12  # from eps, x_0 divides by sqrt(abar_t) (test_x0_eps_roundtrip)
    assert ((d.predict_start(x_t, t, out) - x0).abs() <= tol).all()


@FAST
@given(schedules(min_t=2), st.integers(0, 2**31 - 1), st.data())
def test_eq11_mean_is_posterior_mean_at_predicted_x0(betas, seed, data):
    """Eq. (11): mu_theta = (x_t - beta_t/sqrt(1-abar_t) eps_theta)/sqrt(alpha_t), computed here
    from the betas in float64, equals the mean p_mean_variance returns (the posterior mean (7)
    at x0_hat of Eq. (15)) when x0_hat is not clipped, for any network output."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(1, len(betas) - 1), min_size=3, max_size=3)))
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2
    eps_theta = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    mean, _, _, _ = d.p_mean_variance(lambda x, tt: eps_theta, x_t, t, clip_denoised=False)
    abar = torch.cumprod(1 - betas, 0)[t].view(3, 1, 1, 1)
    beta = betas[t].view(3, 1, 1, 1)
    expected = (x_t - beta / (1 - abar).sqrt() * eps_theta) / (1 - beta).sqrt()
    assert torch.allclose(mean, expected, rtol=1e-5, atol=1e-5)


@FAST
@given(schedules(), st.integers(0, 2**31 - 1), st.data())
def test_score_identity(betas, seed, data):
    """Sec. 3.2: grad_{x_t} log q(x_t|x_0) = -eps/sqrt(1-abar_t), the gradient taken by autograd
    of the Gaussian log density of Eq. (4)."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = full(2, data.draw(st.integers(0, len(betas) - 1)))
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = d.q_sample(x0, t, eps).requires_grad_(True)
    abar = torch.prod(1 - betas[:t[0] + 1])
    gaussian_logpdf(x_t, abar.sqrt() * x0, 1 - abar).sum().backward()
    assert torch.allclose(d.score_from_noise(x_t, t, eps), x_t.grad, rtol=1e-7, atol=1e-9)


# ---- the reverse process ----


@FAST
@given(schedules(), st.sampled_from(["eps", "x0", "v"]), st.booleans(), st.integers(0, 2**31 - 1), st.data())
def test_oracle_network_gives_true_posterior_mean(betas, mean_type, clip, seed, data):
    """An oracle network (true noise, true x_0, or true v) makes p_mean_variance return the true
    posterior mean mu~_t(x_t, x_0) of Eq. (7) and x0_hat = x_0, at every t (clipping is a no-op
    for data in [-1, 1])."""
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=4, max_size=4)))
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = d.q_sample(x0, t, torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64))
    mean, _, _, pred_xstart = d.p_mean_variance(oracle(betas, x0, mean_type), x_t, t, clip)
    true_mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
    # x0 from eps divides x_t's float64 rounding by sqrt(abar_t) (see test_x0_eps_roundtrip); the mean
    # multiplies it back by sqrt(abar_{t-1}), so it is held to 1e-5 everywhere
    tol = 1e-5 + 1e-13 / d.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    assert ((pred_xstart - x0).abs() <= tol).all()
    assert torch.allclose(mean, true_mean, atol=1e-5)


@FAST
@given(schedules(), st.sampled_from(["fixedlarge", "fixedsmall"]), st.integers(0, 2**31 - 1), st.data())
def test_p_sample_step_noise(betas, var_type, seed, data):
    """Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, so p_sample is affine in z with slope
    sigma_t (sqrt(beta_t) or sqrt(beta~_t)) for t > 1, and at the last step (index 0) z is
    ignored and the mean is returned."""
    d = GaussianDiffusion(betas, var_type=var_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    i = data.draw(st.sampled_from([0, 1, len(betas) - 1]) | st.integers(0, len(betas) - 1))  # the ends, and any
    x_t = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    model = lambda x, t: 0.3 * x
    a = d.p_sample(model, x_t, full(2, i), torch.zeros_like(z))
    b = d.p_sample(model, x_t, full(2, i), z)
    if i == 0:
        assert torch.equal(a, b)
        return
    abar = torch.cumprod(1 - betas, 0)
    sigma2 = betas[i] if var_type == "fixedlarge" else (1 - abar[i - 1]) / (1 - abar[i]) * betas[i]
    assert torch.allclose((b - a) / z, sigma2.sqrt().expand_as(z), rtol=1e-5)


@SLOW
@given(schedules(max_t=80), st.sampled_from(["eps", "x0"]), st.integers(0, 2**31 - 1))
def test_reverse_chain_with_oracle_recovers_data(betas, mean_type, seed):
    """Algorithm 2 run with an oracle network ends exactly at x_0: at the last step the posterior
    mean is x0_hat (coef1 = 1, coef2 = 0) and no noise is added."""
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    model = oracle(betas, x0, mean_type)
    x_T = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    seen = []
    out = d.p_sample_loop(model, x0.shape, noise=x_T.clone(), callback=lambda i, x, p: seen.append(i))
    assert seen == list(range(len(betas) - 1, -1, -1))
    assert torch.allclose(out.double(), x0, atol=1e-5)


@FAST
@given(schedules(max_t=40), st.integers(0, 2**31 - 1))
def test_p_sample_loop_is_algorithm_2(betas, seed):
    """p_sample_loop equals Algorithm 2 written out from Eq. (11) in float64 (no clipping, sigma^2 =
    beta_t, z = 0 at the last step), fed the same noise draws in the same order."""
    d = GaussianDiffusion(betas)
    model = lambda x, t: torch.tanh(x) * (t.view(-1, 1, 1, 1) + 1) / len(betas)
    shape = (2, 1, 3, 3)
    out = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(seed), clip_denoised=False)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).double()  # line 1
    abar = torch.cumprod(1 - betas, 0)
    for i in reversed(range(len(betas))):  # line 2
        z = torch.randn(shape, generator=g).double() if i > 0 else torch.zeros(shape, dtype=torch.float64)
        eps = model(x, full(2, i))
        sigma = betas[i].sqrt() if i > 0 else 0.0
        x = (x - betas[i] / (1 - abar[i]).sqrt() * eps) / (1 - betas[i]).sqrt() + sigma * z  # line 4
    assert torch.allclose(out.double(), x, rtol=1e-3, atol=1e-4)


@FAST
@given(schedules(min_t=2), st.sampled_from(["eps", "x0"]), st.integers(0, 2**31 - 1), st.data())
def test_clipping_keeps_x0_in_range_and_mean_at_clipped_x0(betas, mean_type, seed, data):
    """The original code's clipping (an addition to Algorithm 2): for a network whose x0_hat leaves [-1, 1],
    p_mean_variance returns pred_x0 = clamp(x0_hat, -1, 1) and the posterior mean (7) at that clipped x_0,
    coef1 and coef2 computed here from the betas; with clip_denoised=False, the unclipped x0_hat."""
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=3, max_size=3)))
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out = 4 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)  # x0_hat far outside [-1, 1]
    abar = torch.cumprod(1 - betas, 0)
    a = abar[t].view(-1, 1, 1, 1)
    x0_hat = out if mean_type == "x0" else (x_t - (1 - a).sqrt() * out) / a.sqrt()  # Eq. (15)
    assume((x0_hat.abs() > 1).any())
    mean, _, _, pred = d.p_mean_variance(lambda x, tt: out, x_t, t, clip_denoised=True)
    assert pred.min() >= -1 and pred.max() <= 1
    assert torch.allclose(pred, x0_hat.clamp(-1, 1), atol=1e-12 / a.sqrt().min().item())
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])[t].view(-1, 1, 1, 1)
    beta = betas[t].view(-1, 1, 1, 1)
    expected = (a_prev.sqrt() * beta / (1 - a) * x0_hat.clamp(-1, 1)  # Eq. (7), written out
                + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x_t)
    assert torch.allclose(mean, expected, rtol=1e-6, atol=1e-8)
    _, _, _, unclipped = d.p_mean_variance(lambda x, tt: out, x_t, t, clip_denoised=False)
    assert torch.allclose(unclipped, x0_hat, rtol=1e-9, atol=1e-9)


def test_sampling_with_a_generator_leaves_the_global_random_state_alone():
    """p_sample_loop and calc_bpd_loop draw every random number from the generator they are given, the last
    step included (where z = 0), so a caller's global random stream (a training run's) is untouched."""
    d = GaussianDiffusion(make_beta_schedule("linear", 20, 1e-3, 0.2))
    model = lambda x, t: 0.1 * x
    before = torch.get_rng_state()
    d.p_sample_loop(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    d.p_sample_loop(model, (2, 1, 4, 4), noise=torch.zeros(2, 1, 4, 4), generator=torch.Generator())
    d.calc_bpd_loop(model, torch.zeros(2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


@FAST
@given(schedules(), st.integers(0, 2**31 - 1), st.data())
def test_training_loss_is_eq14(betas, seed, data):
    """Algorithm 1 / Eq. (14): loss = mean ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1-abar_t) eps, t)||^2
    computed here by hand; an oracle network has zero loss; the x0 ablation targets x_0."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=3, max_size=3)))
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    model = lambda x, tt: torch.sin(x) + tt.view(-1, 1, 1, 1) * 0.01
    abar = torch.cumprod(1 - betas, 0)[t].view(3, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    expected = ((eps - model(x_t, t)) ** 2).flatten(1).mean(1)
    assert torch.allclose(d.training_losses(model, x0, t, eps), expected, rtol=1e-6, atol=1e-8)
    assert torch.allclose(d.training_losses(oracle(betas, x0, "eps"), x0, t, eps), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    d0 = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    assert torch.allclose(d0.training_losses(oracle(betas, x0, "x0"), x0, t, eps), torch.zeros(3, dtype=torch.float64))


# ---- the bound in bits/dim ----


@FAST
@given(schedules(min_t=3, max_t=100), st.sampled_from(["fixedlarge", "fixedsmall"]), st.integers(0, 2**31 - 1))
def test_decoder_L0_by_hand(betas, var_type, seed):
    """Eq. (13) at the last step: L_0 = -log p(x_0 | x_1) summed over the 256-bin decoder, each pixel the mass
    of N(mu_theta(x_1, 1), sigma_1^2) on [x - 1/255, x + 1/255] (edges open), with mu_theta from Eq. (11) and the
    model's sigma_1^2 (beta~ of the second step for both variance types, as in the original code), all computed
    here from the betas with math.erf; in bits per dimension."""
    d = GaussianDiffusion(betas, var_type=var_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1
    x1 = d.q_sample(x0, full(2, 0), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
    eps_theta = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 0.3
    term, _ = d._vb_terms_bpd(lambda x, t: eps_theta, x0, x1, full(2, 0), clip_denoised=False)
    abar = torch.cumprod(1 - betas, 0)
    beta1 = betas[0].item()
    mu = (x1 - beta1 / math.sqrt(1 - abar[0].item()) * eps_theta) / math.sqrt(1 - beta1)  # Eq. (11) at t = 1
    sigma = math.sqrt((1 - abar[0].item()) / (1 - abar[1].item()) * betas[1].item())  # beta~_2
    cdf = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
    nats = torch.zeros(2)
    for idx in range(x0.numel()):
        b, rest = divmod(idx, x0[0].numel())
        x, m = x0.view(2, -1)[b, rest].item(), mu.view(2, -1)[b, rest].item()
        hi = 1.0 if x > 0.999 else cdf((x + 1 / 255 - m) / sigma)
        lo = 0.0 if x < -0.999 else cdf((x - 1 / 255 - m) / sigma)
        nats[b] -= math.log(max(hi - lo, 1e-12))
    expected = nats / x0[0].numel() / math.log(2)
    assert torch.allclose(term.float(), expected, rtol=1e-4, atol=1e-6)


@FAST
@given(schedules(min_t=3), st.integers(0, 2**31 - 1), st.data())
def test_kl_term_fixedlarge_by_hand(betas, seed, data):
    """Eq. (5): for t > 1, L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) with the fixedlarge
    variance sigma_t^2 = beta_t, which differs from the posterior's beta~_t, so the KL is not symmetric:
    per dimension 1/2 [log(beta_t / beta~_t) + beta~_t / beta_t + (mu~ - mu_theta)^2 / beta_t - 1], with mu~ and
    mu_theta from Eqs. (7) and (11), written out here from the betas; in bits per dimension."""
    d = GaussianDiffusion(betas, var_type="fixedlarge", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    i = data.draw(st.integers(1, len(betas) - 1))
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = d.q_sample(x0, full(2, i), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
    eps_theta = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    term, _ = d._vb_terms_bpd(lambda x, t: eps_theta, x0, x_t, full(2, i), clip_denoised=False)
    abar = torch.cumprod(1 - betas, 0)
    beta, a, a_prev = betas[i], abar[i], abar[i - 1]
    tilde = (1 - a_prev) / (1 - a) * beta
    mu_tilde = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x_t
    mu_theta = (x_t - beta / (1 - a).sqrt() * eps_theta) / (1 - beta).sqrt()
    kl = 0.5 * (torch.log(beta / tilde) + tilde / beta + (mu_tilde - mu_theta) ** 2 / beta - 1)
    assert torch.allclose(term, kl.flatten(1).mean(1) / math.log(2), rtol=1e-6, atol=1e-9)


@SLOW
@given(st.integers(2, 30), st.floats(0.01, 0.5), st.integers(0, 2**31 - 1))
def test_bpd_mse_is_the_x0_error(T, offset, seed):
    """calc_bpd_loop's mse is the squared error of x0_hat (Eq. 15) against x_0 at every t, as in the original
    code (Figure 5's distortion is its root): 0 for an oracle, offset^2 for an x0-network off by a constant (no
    clipping). It draws x_t from the generator: the same generator seed gives the same terms."""
    betas = make_beta_schedule("linear", T, 1e-3, 0.3)
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed)).double() / 127.5 - 1)
    exact = d.calc_bpd_loop(oracle(betas, x0, "x0"), x0, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(exact["mse"], torch.zeros(2, T, dtype=torch.float64), atol=1e-20)
    off = d.calc_bpd_loop(lambda x, t: x0 + offset, x0, clip_denoised=False, generator=torch.Generator())
    assert torch.allclose(off["mse"], torch.full((2, T), offset ** 2, dtype=torch.float64), rtol=1e-9)
    again = d.calc_bpd_loop(oracle(betas, x0, "x0"), x0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again["terms_bpd"], exact["terms_bpd"])


@FAST
@given(st.floats(-3, 3), st.floats(-4, 2), st.floats(-3, 3), st.floats(-4, 2))
def test_normal_kl_matches_numerical_integration(m1, lv1, m2, lv2):
    """KL(N1 || N2) in closed form equals the integral of p1 log(p1/p2) by the trapezoid rule."""
    sd1 = math.exp(0.5 * lv1)
    x = torch.linspace(m1 - 12 * sd1, m1 + 12 * sd1, 200001, dtype=torch.float64)
    lp1 = gaussian_logpdf(x, torch.tensor(m1, dtype=torch.float64), torch.tensor(math.exp(lv1), dtype=torch.float64))
    lp2 = gaussian_logpdf(x, torch.tensor(m2, dtype=torch.float64), torch.tensor(math.exp(lv2), dtype=torch.float64))
    numeric = torch.trapezoid(lp1.exp() * (lp1 - lp2), x).item()
    closed = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert closed == pytest.approx(numeric, rel=1e-5, abs=1e-7)


@FAST
@given(st.floats(-1.2, 1.2), st.floats(-6, 0.5))
def test_discretized_decoder_is_a_distribution_over_256_bins(mean, log_scale):
    """Eq. (13): the decoder's probabilities over the 256 values x = k/127.5 - 1 sum to 1, and each
    equals the integral of the Gaussian density over its bin [x - 1/255, x + 1/255] (edges
    open-ended), computed with math.erf in float64."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    probs = logp.exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    sd = math.exp(log_scale)
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (sd * math.sqrt(2))))
    for k in [0, 1, 64, 127, 128, 200, 254, 255]:
        lo = -math.inf if k == 0 else x[k].item() - 1 / 255
        hi = math.inf if k == 255 else x[k].item() + 1 / 255
        p = (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))
        if p > 1e-10:
            assert probs[k].item() == pytest.approx(p, rel=1e-6, abs=1e-12)


@SLOW
@given(st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_bpd_terms(T, seed):
    """Eq. (5): total = L_T + sum L_{t-1} + L_0. L_T equals the closed-form KL of
    N(sqrt(abar_T) x_0, 1-abar_T) from N(0, 1) per dimension in bits; with an oracle x0-network
    and fixedsmall variance every L_{t-1}, t > 1, is 0 (identical Gaussians); L_0 is the decoder
    NLL at the posterior mean, non-negative."""
    betas = make_beta_schedule("linear", T, 1e-3, 0.3)
    d = GaussianDiffusion(betas, mean_type="x0", var_type="fixedsmall", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1)
    out = d.calc_bpd_loop(oracle(betas, x0, "x0"), x0)
    assert out["terms_bpd"].shape == (2, T)
    assert torch.allclose(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"] + out["decoder_bpd"])
    assert torch.allclose(out["terms_bpd"][:, 1:], torch.zeros(2, T - 1, dtype=torch.float64), atol=1e-9)
    assert (out["decoder_bpd"] >= 0).all()
    abar_T = torch.prod(1 - betas)
    kl = 0.5 * (abar_T * x0 ** 2 + (1 - abar_T) - 1 - torch.log(1 - abar_T))
    assert torch.allclose(out["prior_bpd"], kl.flatten(1).mean(1) / math.log(2), rtol=1e-6)


def test_loss_weighting_eq12_matches_kl_for_eps_model():
    """Eq. (12): for t > 1 the KL term L_{t-1} with sigma_t^2 fixed equals
    beta_t^2 / (2 sigma_t^2 alpha_t (1-abar_t)) ||eps - eps_theta||^2 (in nats, per dimension),
    up to the constant KL between the two variances (zero for fixedsmall)."""
    betas = make_beta_schedule("linear", 50, 1e-3, 0.2)
    d = GaussianDiffusion(betas, var_type="fixedsmall", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 25, 49])
    x_t = d.q_sample(x0, t, eps)
    eps_theta = eps + 0.1 * torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    bpd, _ = d._vb_terms_bpd(lambda x, tt: eps_theta, x0, x_t, t, clip_denoised=False)
    abar = torch.cumprod(1 - betas, 0)
    beta, a = betas[t].view(4, 1, 1, 1), abar[t].view(4, 1, 1, 1)
    sigma2 = (1 - abar[t - 1]).view(4, 1, 1, 1) / (1 - a) * beta
    weighted = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - a)) * (eps - eps_theta) ** 2
    assert torch.allclose(bpd * math.log(2), weighted.flatten(1).mean(1), rtol=1e-6)


# ---- Sec. 4.3 and 4.4: the reverse process as a decoder ----


@FAST
@given(schedules(min_t=3, max_t=60), st.integers(0, 2**31 - 1), st.data())
def test_interpolation_ends_are_reconstructions(betas, seed, data):
    """Sec. 4.4: interpolation at lambda = 0 is the reconstruction of the first image, the reverse process run from
    x_t = q_sample(x_0, t, noise) with the same decoder noise (and lambda = 1 that of the second); the middle
    differs from both. Reconstruction from index 0 with an oracle network returns x_0 (no noise at the last step)."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0, x1 = (torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    n0, n1 = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    i = data.draw(st.integers(0, len(betas) - 1))
    t = full(2, i)
    model = lambda x, tt: torch.tanh(x) * 0.5
    out = d.interpolate(model, x0, x1, t, [0.0, 0.5, 1.0], n0, n1, generator_seed=seed)
    recon = lambda a, n: d.p_sample_loop(model, a.shape, d.q_sample(a, t, n), torch.Generator().manual_seed(seed),
                                         start=i)
    assert torch.equal(out[0], recon(x0, n0)) and torch.equal(out[2], recon(x1, n1))
    assert not torch.equal(out[1], out[0])
    exact = d.p_sample_loop(oracle(betas, x0, "eps"), x0.shape, d.q_sample(x0, full(2, 0), n0), start=0)
    assert torch.allclose(exact, x0, atol=1e-9)


@SLOW
@given(st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_rate_distortion_is_the_running_bound(T, seed):
    """Sec. 4.3, Figure 5: the rate after each reverse step is the running sum L_T, L_T + L_{T-1}, ... of the terms
    calc_bpd_loop returns, ending at its total after x_0; the distortion is the root of its x0 error on the
    [0, 255] scale, 0 at every step for an oracle network and 0 once x_0 is received."""
    from ddpm import rate_distortion
    betas = make_beta_schedule("linear", T, 1e-3, 0.3)
    d = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed)).double() / 127.5 - 1
    model = lambda x, t: 0.8 * x0 + 0.1 * torch.tanh(x)
    bpd = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(seed))
    rate, distortion = rate_distortion(bpd)
    assert rate.shape == distortion.shape == (2, T + 1)
    running = bpd["prior_bpd"].clone()
    for k in range(T):
        assert torch.allclose(rate[:, k], running)
        running = running + bpd["terms_bpd"][:, T - 1 - k]
        assert torch.allclose(distortion[:, k], bpd["mse"][:, T - 1 - k].sqrt() * 127.5)
    assert torch.allclose(rate[:, -1], bpd["total_bpd"]) and (distortion[:, -1] == 0).all()
    _, exact = rate_distortion(d.calc_bpd_loop(oracle(betas, x0, "x0"), x0))
    assert (exact == 0).all()


def test_bad_arguments_raise():
    """Unknown options and schedules that float32 cannot hold fail loudly."""
    with pytest.raises(ValueError):
        GaussianDiffusion(make_beta_schedule("const", 300, beta_end=0.5))  # abar_T underflows
    with pytest.raises(ValueError):
        GaussianDiffusion(make_beta_schedule(), mean_type="score")
    with pytest.raises(ValueError):
        GaussianDiffusion(make_beta_schedule(), var_type="learned")
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
