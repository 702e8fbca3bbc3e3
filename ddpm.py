"""
The diffusion math of "Denoising Diffusion Probabilistic Models" (Ho, Jain, Abbeel 2020,
arXiv:2006.11239): the forward process (Sec. 2), the reverse process and its training objective
(Sec. 3, Algorithms 1 and 2), and the variational bound in bits/dim (Eqs. 5, 13). Only torch.

Conventions, stated once:
- Timesteps are 0-based, as in the original code: index t in 0..T-1 stands for the paper's t+1,
  i.e. x_t has had t+1 noising steps. So betas[t] is the paper's beta_{t+1}, alphas_cumprod[t] is
  abar_{t+1}, and alphas_cumprod_prev[t] is abar_t (= 1 at t = 0, where x_{t-1} is the data x_0).
- Data x0 is scaled to [-1, 1], shape (B, C, H, W) (any trailing shape works); t is a LongTensor
  of shape (B,). Per-timestep tables are gathered at t and broadcast over the trailing dims.
- The network is any callable model(x_t, t) returning a tensor shaped like x_t: the predicted
  noise eps (mean_type="eps", the paper's choice), the predicted x_0 (mean_type="x0"), or
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (mean_type="v", Salimans & Ho 2022; not in this paper).
- Schedules are computed in float64 and stored as float32 buffers (so .to(device) works).
"""

import math

import torch
import torch.nn as nn


def make_beta_schedule(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """The variances beta_1..beta_T of the forward process (2), in float64, shape (T,)."""
    if name == "linear":  # Sec. 4: linear from 1e-4 to 0.02, T = 1000
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif name == "cosine":  # Nichol & Dhariwal 2021, Eq. (17); not in this paper
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # their clipping, to avoid a singularity at t = T
    elif name == "const":  # constant beta (the original code's "const")
        betas = torch.full((num_timesteps,), beta_end, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {name!r}: use linear, cosine or const")
    return betas


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x):
    # The exact Gaussian CDF. The original code uses a tanh approximation here (a TF artefact).
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Eq. (13): log p(x_0 | x_1) of data x in [-1, 1] on 256 bins of width 2/255, each bin the
    integral of N(means, exp(log_scales)^2) over [x - 1/255, x + 1/255], the edge bins open-ended."""
    assert x.shape == means.shape == log_scales.shape
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_std * (centered + 1.0 / 255))   # delta_+ of Eq. (13)
    cdf_min = standard_normal_cdf(inv_std * (centered - 1.0 / 255))    # delta_-
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))                # bin 0: (-inf, x + 1/255]
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # bin 255: [x - 1/255, inf)
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def extract(table, t, x):
    """table[t] shaped (B, 1, ..., 1) to broadcast against x."""
    assert t.shape == (x.shape[0],), f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}"
    return table[t].view(-1, *([1] * (x.dim() - 1)))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion(nn.Module):
    """The forward process q, the reverse process p_theta, and their losses.
    The tables are computed in float64 and stored in `dtype` (float32; the tests use float64)."""

    def __init__(self, betas, mean_type="eps", var_type="fixedlarge", dtype=torch.float32):
        super().__init__()
        if mean_type not in ("eps", "x0", "v"):
            raise ValueError(f"mean_type must be 'eps', 'x0' or 'v', got {mean_type!r}")
        if var_type not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"var_type must be 'fixedlarge' or 'fixedsmall', got {var_type!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D schedule with every beta in (0, 1]")
        if (torch.cumprod(1.0 - betas, 0).float() == 0).any():
            raise ValueError("abar_t underflows float32: the schedule destroys the signal too fast")
        self.mean_type, self.var_type = mean_type, var_type
        self.num_timesteps = len(betas)

        # Eq. (4): alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Eq. (7): beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; zero at t = 0 (index), where
        # the posterior is a point mass at x_0, so its log is clipped to the next value.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        # Eq. (7): mu~_t = coef1 x_0 + coef2 x_t
        posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
        # Sec. 3.2: sigma_t^2 = beta_t ("fixedlarge", CIFAR-10) or beta~_t ("fixedsmall").
        # As in the original code, fixedlarge uses beta~_2 at the first step instead of beta_1,
        # which only matters for the decoder L_0 (no noise is added at the last sampling step).
        if var_type == "fixedlarge":
            model_variance = torch.cat([posterior_variance[1:2], betas[1:]])
        else:
            model_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]])

        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=torch.log(1.0 - alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=posterior_mean_coef1,
            posterior_mean_coef2=posterior_mean_coef2,
            model_variance=model_variance,
            model_log_variance=torch.log(model_variance),
        )
        for name, value in tables.items():  # float64 math, stored as float32 unless asked otherwise
            self.register_buffer(name, value.to(dtype))

    # ---- the forward process q (Sec. 2) ----

    def q_mean_variance(self, x0, t):
        """Eq. (4): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0, t, noise=None):
        """Eq. (4), reparameterised: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x0)
        assert noise.shape == x0.shape
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Eqs. (6), (7): q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I).
        Returns (mean, variance, log_variance); the log variance is clipped at t = 0."""
        assert x0.shape == x_t.shape
        mean = (extract(self.posterior_mean_coef1, t, x_t) * x0
                + extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- moving between x_0, eps and the score ----

    def predict_start_from_noise(self, x_t, t, noise):
        """Eq. (15): x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        assert x_t.shape == noise.shape
        return ((x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * noise)
                / extract(self.sqrt_alphas_cumprod, t, x_t))

    def predict_noise_from_start(self, x_t, t, x0):
        """Eq. (15) solved for eps: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        assert x_t.shape == x0.shape
        return ((x_t - extract(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def predict_start_from_v(self, x_t, t, v):
        """Progressive distillation's v-parameterisation (Salimans & Ho 2022, Sec. 4 and Appendix D; not in this
        paper): x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, well conditioned at every t, where Eq. (15) divides by
        sqrt(abar_t) -> 0."""
        return extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def predict_v(self, x0, t, noise):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the target of a v-network (Salimans & Ho 2022, Sec. 4)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * noise - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def predict_start(self, x_t, t, model_output):
        """x0_hat from what the network predicts (mean_type): Eq. (15) from eps, the v-parameterisation's from v,
        or x_0 itself."""
        if self.mean_type == "eps":
            return self.predict_start_from_noise(x_t, t, model_output)
        if self.mean_type == "v":
            return self.predict_start_from_v(x_t, t, model_output)
        return model_output

    def output_from_start(self, x_t, t, x0):
        """The inverse of predict_start: what a network of this mean_type outputs when its x0_hat is x0 (eps by
        Eq. (15) solved for eps; v from that eps and x0), for a sampler that changes x0_hat and hands it back."""
        if self.mean_type == "x0":
            return x0
        eps = self.predict_noise_from_start(x_t, t, x0)
        return eps if self.mean_type == "eps" else self.predict_v(x0, t, eps)

    def score_from_noise(self, x_t, t, noise):
        """Sec. 3.2: grad_{x_t} log q(x_t | x_0) = -eps / sqrt(1 - abar_t), so an eps-predictor
        is a scaled score model (the link to denoising score matching, Song & Ermon 2019)."""
        return -noise / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    # ---- the reverse process p_theta (Sec. 3.2) ----

    def p_mean_variance(self, model, x_t, t, clip_denoised=True):
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I).
        Returns (mean, variance, log_variance, pred_xstart).

        With mean_type "eps" and no clipping the mean is Eq. (11),
        mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t), which equals the
        posterior mean (7) at x0_hat of Eq. (15); that second form is what is computed, because
        it allows clipping x0_hat to [-1, 1] as the original code does (Algorithm 2 does not)."""
        model_output = model(x_t, t)
        assert model_output.shape == x_t.shape, "the model must return a tensor shaped like x_t"
        pred_xstart = self.predict_start(x_t, t, model_output.to(x_t.dtype))  # a bf16 network feeds fp32 math
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        variance = extract(self.model_variance, t, x_t).expand_as(x_t)
        log_variance = extract(self.model_log_variance, t, x_t).expand_as(x_t)
        return mean, variance, log_variance, pred_xstart

    def p_sample(self, model, x_t, t, noise=None, clip_denoised=True, return_pred_xstart=False, cond_fn=None):
        """One step of Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z,
        with z = 0 at the last step (index t = 0), where the mean is returned. cond_fn: classifier guidance
        (Dhariwal & Nichol 2021, Algorithm 1; not in this paper), the mean shifted by sigma_t^2 cond_fn(x_t, t)."""
        if noise is None:
            noise = torch.randn_like(x_t)
        mean, variance, log_variance, pred_xstart = self.p_mean_variance(model, x_t, t, clip_denoised)
        if cond_fn is not None:
            mean = mean + variance * cond_fn(x_t, t)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        sample = mean + nonzero * torch.exp(0.5 * log_variance) * noise
        return (sample, pred_xstart) if return_pred_xstart else sample

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, generator=None, clip_denoised=True,
                      callback=None, start=None, cond_fn=None):
        """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = mu_theta(x_t, t) + sigma_t z.
        noise is x_T (drawn if None). Every draw (x_T and each z) comes from generator, so a seeded
        generator gives reproducible samples and leaves the global random state untouched.
        start: begin at index start with noise as that x_t, i.e. draw x_0 ~ p_theta(x_0 | x_t), the reverse
        process as a decoder (Sec. 4.3, Figure 7; Sec. 4.4). callback(i, x, pred_xstart) after each step.
        cond_fn: classifier guidance, as in p_sample."""
        device = self.betas.device
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
        start = self.num_timesteps - 1 if start is None else start
        for i in reversed(range(start + 1)):  # line 2
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            # line 3: z ~ N(0, I) if t > 1, else z = 0 (passed as zeros, so p_sample draws nothing)
            z = torch.randn(shape, generator=generator, device=device) if i > 0 else torch.zeros_like(x)
            x, pred_xstart = self.p_sample(model, x, t, z, clip_denoised, return_pred_xstart=True, cond_fn=cond_fn)
            if callback is not None:
                callback(i, x, pred_xstart)
        return x  # line 6

    @torch.no_grad()
    def interpolate(self, model, x0, x0_prime, t, lambdas, noise, noise_prime, generator_seed=0, clip_denoised=True):
        """Sec. 4.4, Figure 8: encode two images with q, x_t = q_sample(x0, t, noise) and x'_t likewise, mix the
        latents linearly, xbar_t = (1 - lambda) x_t + lambda x'_t (the paper prints x_0 and x'_0 there; the
        latents are meant, as its next sentence says), and decode each with the reverse process from index t,
        its noise fixed across lambda (every decode draws from a generator seeded alike). -> (len(lambdas), B, ...)"""
        x_t, x_t_prime = self.q_sample(x0, t, noise), self.q_sample(x0_prime, t, noise_prime)
        out = []
        for lam in lambdas:
            g = torch.Generator(x0.device).manual_seed(generator_seed)
            out.append(self.p_sample_loop(model, x0.shape, (1 - lam) * x_t + lam * x_t_prime, g, clip_denoised,
                                          start=int(t[0])))
        return torch.stack(out)

    # ---- training (Algorithm 1) ----

    def training_losses(self, model, x0, t, noise=None):
        """Algorithm 1 / Eq. (14), per example: L_simple = || eps - eps_theta(x_t, t) ||^2,
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, averaged over pixels. With mean_type "x0"
        the target is x_0 instead (the paper's ablation in Table 2), with "v" it is v."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # Alg. 1 lines 2-4
        model_output = model(x_t, t)
        assert model_output.shape == x0.shape
        target = noise if self.mean_type == "eps" else x0 if self.mean_type == "x0" else self.predict_v(x0, t, noise)
        return _mean_flat((target - model_output) ** 2)  # line 5

    # ---- the variational bound, Eq. (5), in bits per dimension ----

    def _vb_terms_bpd(self, model, x0, x_t, t, clip_denoised=True):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) for t > 0 (Eq. 5, between
        Gaussians), and the decoder L_0 = -log p_theta(x_0|x_1) of Eq. (13) at index t = 0; bits/dim."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        mean, _, log_variance, pred_xstart = self.p_mean_variance(model, x_t, t, clip_denoised)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(
            x0, means=mean, log_scales=0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), pred_xstart

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim; no learned parameters."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return _mean_flat(kl) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, clip_denoised=True, generator=None, callback=None):
        """Eq. (5): L = L_T + sum_{t>1} L_{t-1} + L_0, each term estimated with one draw of x_t
        (from generator), in bits/dim (the NLL column of Table 1). Returns a dict of (B,) tensors
        total_bpd, prior_bpd (L_T), vb_bpd (sum of L_{t-1}), decoder_bpd (L_0), and (B, T) tensors
        terms_bpd (index 0 holding L_0) and mse, the squared error of x0_hat (Eq. 15) at each t,
        as in the original code (Sec. 4.3 reads its root as the distortion, Figure 5). callback(i) after each t."""
        terms, mse = [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            term, pred_xstart = self._vb_terms_bpd(model, x0, x_t, t, clip_denoised)
            terms.append(term)
            mse.append(_mean_flat((pred_xstart - x0) ** 2))
            if callback is not None:
                callback(i)
        terms_bpd = torch.stack(terms[::-1], dim=1)
        prior_bpd = self.prior_bpd(x0)
        return dict(total_bpd=terms_bpd.sum(dim=1) + prior_bpd, prior_bpd=prior_bpd,
                    vb_bpd=terms_bpd[:, 1:].sum(dim=1), decoder_bpd=terms_bpd[:, 0],
                    terms_bpd=terms_bpd, mse=torch.stack(mse[::-1], dim=1))


def rate_distortion(bpd):
    """Sec. 4.3, Figure 5 (progressive coding, Algorithms 3 and 4): what a receiver has after each step of the
    reverse process, from calc_bpd_loop's terms. Receiving x_T costs L_T, each x_{t-1} then L_{t-1}, and x_0 last
    L_0: the rate after step k (k = 1..T, x_{T-k+1} received; k = T + 1, x_0) is the running sum, ending at the
    total bound. The distortion after step k is the RMSE of x0_hat (Eq. 15) from the latest x_t, on the [0, 255]
    scale, and 0 once x_0 itself is received. The paper's summary reads rate = L_T + ... + L_1 (at k = T) and
    distortion = L_0 in bits/dim. Returns (rate (B, T + 1), distortion (B, T + 1)), in reverse-process order."""
    rate = torch.cat([bpd["prior_bpd"][:, None], bpd["terms_bpd"].flip(1)], dim=1).cumsum(1)  # L_T, +L_{T-1}, ...
    distortion = bpd["mse"].flip(1).sqrt() * 127.5  # from x_T (index T-1) down to x_1 (index 0)
    distortion = torch.cat([distortion, torch.zeros_like(distortion[:, :1])], dim=1)
    return rate, distortion
