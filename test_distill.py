"""
Tests of distill.py (progressive distillation, Salimans & Ho 2022; consistency distillation, Song et al. 2023) and
of the v-parameterisation in ddpm.py: each checked by a second route (the teacher's own steps, the closed-form
ODE of Gaussian data, the algebra of the parameterisations), then train.py --distill and sample.py on students,
end to end on tiny nets. Each docstring states what it checks.
"""
import csv
import math

import pytest
import torch
from hypothesis import given, strategies as st

import distill
from checkpoint import load_checkpoint
from conftest import (FAST, TINY_NET, TRAIN_TINY, assert_one_line_error, full, in_process, randomized, read_npz,
                      run_script, schedules)
from ddpm import GaussianDiffusion, make_beta_schedule
from samplers import alpha_sigma, ddim_sample, ddim_step
from unet import UNet

# ---- the v-parameterisation (Salimans & Ho, Sec. 4)


@FAST
@given(schedules(), st.integers(0, 2**31 - 1), st.data())
def test_v_round_trips_and_its_loss_is_snr_plus_one_times_the_x0_loss(betas, seed, data):
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0: from (x_t, v) predict_start_from_v recovers x_0, and eps =
    sqrt(1 - abar) x_t + sqrt(abar) v; a v-network's mistake costs ||v - v_hat||^2 = (1 + SNR) ||x_0 - x0_hat||^2
    (SNR = abar / (1 - abar)), the SNR+1 weighting; training_losses with mean_type "v" is that v error."""
    d = GaussianDiffusion(betas, mean_type="v", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(0, len(betas) - 1), min_size=3, max_size=3)))
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x_t, v = d.q_sample(x0, t, eps), d.predict_v(x0, t, eps)
    a = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(d.predict_start_from_v(x_t, t, v), x0, atol=1e-10)
    assert torch.allclose((1 - a).sqrt() * x_t + a.sqrt() * v, eps, atol=1e-10)
    v_hat = v + 0.1 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x0_hat = d.predict_start_from_v(x_t, t, v_hat)
    snr = a / (1 - a)
    assert torch.allclose(((v - v_hat) ** 2), (1 + snr) * (x0 - x0_hat) ** 2, rtol=1e-8, atol=1e-12)
    assert torch.allclose(d.training_losses(lambda x, tt: v_hat, x0, t, eps), ((v - v_hat) ** 2).flatten(1).mean(1))

# ---- progressive distillation


def test_halving_rounds_and_nested_grids():
    """128 teacher steps halve to 64, 32, 16, 8, 4; 3 is not reachable; the grid of each round's student is every
    other point of its teacher's grid (so every round's steps are a subset of the one before)."""
    assert distill.halving_rounds(128, 4) == [64, 32, 16, 8, 4]
    for bad in (3, 128, 256):
        with pytest.raises(ValueError, match="not reachable"):
            distill.halving_rounds(128, bad)
    for T in (1000, 1024, 600):
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            fine, coarse = distill.nested_grid(T, n), distill.nested_grid(T, n // 2) if n > 2 else None
            assert len(set(fine)) == n and fine[0] == T - 1
            if coarse:
                assert coarse == fine[::2]


@FAST
@given(schedules(min_t=8, max_t=200), st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1), st.data())
def test_a_student_predicting_the_target_takes_the_teachers_two_steps_in_one(betas, steps, seed, data):
    """Algorithm 2's target x~: a student whose x0_hat is x~ lands, in one DDIM step t -> t'', exactly where the
    teacher's two DDIM steps t -> t' -> t'' (written here with ddim_sample_loop's own DDIM) land (float64)."""
    T = len(betas)
    steps = min(steps, T // 2)
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    teacher = lambda x, t: torch.tanh(x) * 0.6 + 0.05 * torch.cos(t.double()).view(-1, 1, 1, 1)
    grid = distill.nested_grid(T, 2 * steps) + [-1]
    k = data.draw(st.integers(0, steps - 1))
    t, t1, t2 = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
    z_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    z_t1 = ddim_sample(d, teacher, z_t, full(2, t), t1, clip_denoised=False)
    z_t2 = ddim_sample(d, teacher, z_t1, full(2, t1), t2, clip_denoised=False)
    a, s = alpha_sigma(d, full(2, t), z_t)
    a2, s2 = alpha_sigma(d, full(2, t2), z_t)
    target = distill.distillation_target(z_t, z_t2, a, s, a2, s2)
    student_step = ddim_step(z_t, target, a, s, a2, s2)
    assert torch.allclose(student_step, z_t2, rtol=1e-9, atol=1e-9)


def test_progressive_loss_is_zero_for_a_student_that_matches_and_positive_otherwise():
    """With the student replaced by a v-network that returns the v of the target x~ (computed from the teacher's
    two steps), the loss is 0; the teacher itself read as a v-network is not such a student."""
    betas = make_beta_schedule("linear", 64, 1e-3, 0.2)
    d_eps, d_v = GaussianDiffusion(betas), GaussianDiffusion(betas, mean_type="v")
    teacher = randomized(UNet(**dict(TINY_NET)))
    loss = distill.ProgressiveLoss(d_v, lambda x, t, y=None: teacher(x, t), d_eps, steps=4, clip_teacher=False)
    x0 = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(1)
    t, noise, i = loss.draw(x0, None)
    z_t = d_v.q_sample(x0, t, noise)
    with torch.no_grad():
        a, s = alpha_sigma(d_v, t, x0)
        a1, s1 = alpha_sigma(d_v, loss.t1[i], x0)
        a2, s2 = alpha_sigma(d_v, loss.t2[i], x0)
        x_hat = d_eps.p_mean_variance(lambda x, tt: teacher(x, tt), z_t, t, clip_denoised=False)[3]
        z1 = ddim_step(z_t, x_hat, a, s, a1, s1)
        x_hat1 = d_eps.p_mean_variance(lambda x, tt: teacher(x, tt), z1, loss.t1[i], clip_denoised=False)[3]
        z2 = ddim_step(z1, x_hat1, a1, s1, a2, s2)
        target = distill.distillation_target(z_t, z2, a, s, a2, s2)
        exact_v = (a * z_t - target) / s  # x0 = a z - s v  =>  v = (a z - x0) / s
        value, _ = loss(lambda x, tt, y: exact_v, x0, None, t, noise, i)
        assert value.abs().max() < 1e-6
        value, _ = loss(lambda x, tt, y: teacher(x, tt), x0, None, t, noise, i)
        assert value.min() > 1e-6


def test_a_clipped_teachers_target_is_its_clipped_sampler_in_one_step():
    """With clip_teacher (--pd-teacher-clip on, the default) the target x~ is the one for which one student step
    lands where two steps of the teacher's own sampler land, x0_hat clipped to [-1, 1] as it samples (written here
    with samplers.ddim_sample, clip_denoised=True); without, where its unclipped steps land (Algorithm 2 as
    printed); a teacher whose x0_hat leaves [-1, 1] makes the two targets differ. A latent run (objective.clip =
    False) never clips, whatever the flag, in this round and the next."""
    betas = make_beta_schedule("linear", 64, 1e-3, 0.2)
    d_eps, d_v = GaussianDiffusion(betas), GaussianDiffusion(betas, mean_type="v")
    teacher = lambda x, t, y=None: 3 * torch.tanh(x) + 0.1 * torch.cos(t.float()).view(-1, 1, 1, 1)  # |x0_hat| > 1
    x0 = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    targets = {}
    for clip in (False, True):
        loss = distill.ProgressiveLoss(d_v, teacher, d_eps, steps=4, clip_teacher=clip)
        torch.manual_seed(1)
        t, noise, i = loss.draw(x0, None)
        z_t = d_v.q_sample(x0, t, noise)
        z1 = ddim_sample(d_eps, teacher, z_t, t, loss.t1[i], clip_denoised=clip)
        z2 = ddim_sample(d_eps, teacher, z1, loss.t1[i], loss.t2[i], clip_denoised=clip)
        a, s = alpha_sigma(d_v, t, x0)
        targets[clip] = distill.distillation_target(z_t, z2, a, s, *alpha_sigma(d_v, loss.t2[i], x0))
        value, _ = loss(lambda x, tt, y: (a * z_t - targets[clip]) / s, x0, None, t, noise, i)  # v of x~
        assert value.abs().max() < 1e-6
    assert (targets[True] - targets[False]).abs().max() > 1e-2
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for clip in (False, True):
        pd = distill.ProgressiveDistillation(d_v, torch.nn.Linear(2, 2), d_eps, {}, [4, 2], [0, 5], 0, 10,
                                             clip_teacher=clip)
        assert pd.loss.clip_teacher == clip
        pd.clip = False  # what build_run sets for latents
        assert not pd.loss.clip_teacher
        pd.begin(5, net, ema, torch.optim.Adam(net.parameters()))  # the next round's loss
        assert pd.round == 1 and not pd.loss.clip_teacher

# ---- the first student of an eps-teacher


@FAST
@given(schedules(), st.integers(0, 2**31 - 1))
def test_the_converted_student_predicts_the_teachers_clipped_x0(betas, seed):
    """TeacherRegression's target, by a second route: a v-network returning v = sqrt(abar) eps~ - sqrt(1 - abar) x~
    (Salimans & Ho's definition, ddpm's predict_v), with x~ the eps-teacher's clipped x0_hat and eps~ the eps it
    implies (predict_noise_from_start), has zero loss, and its x0_hat is x~; the teacher read as v has not."""
    d_eps, d_v = GaussianDiffusion(betas, dtype=torch.float64), GaussianDiffusion(betas, mean_type="v", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    teacher = lambda x, t, y=None: 3 * torch.tanh(x + t.view(-1, 1, 1, 1) / len(betas))  # x~ often clipped
    loss = distill.TeacherRegression(d_v, teacher, d_eps)
    x0 = torch.rand(4, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.randint(0, len(betas), (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    z_t = d_v.q_sample(x0, t, noise)
    x_clip = d_eps.p_mean_variance(teacher, z_t, t, clip_denoised=True)[3]
    v = d_v.predict_v(x_clip, t, d_eps.predict_noise_from_start(z_t, t, x_clip))
    value, _ = loss(lambda x, tt, y: v, x0, None, t, noise)
    assert value.abs().max() < 1e-8 * max(1.0, v.abs().max().item() ** 2)
    unclipped = d_eps.p_mean_variance(teacher, z_t, t, clip_denoised=False)[3]
    if (unclipped.abs() > 1.01).any():  # the v of the unclipped x0 is not the target
        v_raw = d_v.predict_v(unclipped, t, d_eps.predict_noise_from_start(z_t, t, unclipped))
        assert loss(lambda x, tt, y: v_raw, x0, None, t, noise)[0].max() > 1e-6
    assert loss(teacher, x0, None, t, noise)[0].min() > 1e-6

# ---- consistency distillation


@FAST
@given(schedules(min_t=4), st.integers(0, 2**31 - 1))
def test_consistency_function_is_the_identity_at_t_min_for_any_weights(betas, seed):
    """f(x, t_min) = c_skip(t_min) x + c_out(t_min) F = x (in Consistency Models' coordinates x_t / alpha_t), c_skip
    = 1 and c_out = 0 there, whatever the network; elsewhere c_skip < 1."""
    d = GaussianDiffusion(betas, mean_type="v", dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wild = lambda x, t: 1e3 * torch.randn_like(x)
    f = distill.consistency_function(d, wild, x, full(2, 0))
    assert torch.equal(f, x / d.alphas_cumprod[0].sqrt())
    sigma = distill.noise_level(d, torch.arange(len(betas)))
    c_skip, c_out = distill.boundary_scalings(sigma, sigma[0])
    assert c_skip[0] == 1 and c_out[0] == 0 and (c_skip[1:] < 1).all() and (c_out[1:] > 0).all()


@FAST
@given(schedules(min_t=4), st.integers(0, 2**31 - 1), st.data())
def test_the_consistency_function_starts_as_the_networks_denoiser(betas, seed, data):
    """Above t_min, f = c_skip x + c_out F with F EDM's raw output for x0_hat is, by a second route,
    c_skip x + (1 - s_min / s)(x0_hat - c_skip^EDM x) (c_out / c_out^EDM = (s - s_min) / s): f - x0_hat is
    (c_skip - c_skip^EDM) x - (s_min / s)(x0_hat - c_skip^EDM x), small where s >> s_min, so a student that
    predicts its teacher's x0 starts as the teacher's denoiser."""
    d = GaussianDiffusion(betas, mean_type="v", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(data.draw(st.lists(st.integers(1, len(betas) - 1), min_size=3, max_size=3)))
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    f = distill.consistency_function(d, lambda x, tt: v, x_t, t)
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    s, s_min = ((1 - a) / a).sqrt(), distill.noise_level(d, torch.tensor(0))
    x, x0_hat = x_t / a.sqrt(), d.predict_start_from_v(x_t, t, v.float())
    c_skip = 0.25 / ((s - s_min) ** 2 + 0.25)
    assert torch.allclose(f, c_skip * x + (1 - s_min / s) * (x0_hat - 0.25 / (s ** 2 + 0.25) * x), rtol=1e-6, atol=1e-6)
    far = (s > 100 * s_min).flatten()
    if far.any():
        assert torch.allclose(f[far], x0_hat[far], atol=0.05 * (1 + x[far].abs().max().item()))


@FAST
@given(schedules(min_t=4), st.floats(-2, 2), st.integers(0, 2**31 - 1), st.data())
def test_heun_with_a_constant_eps_is_euler_is_ddim(betas, c, seed, data):
    """For a network whose eps is the same everywhere, Heun's two evaluations agree, so Heun = Euler; and the Euler
    step in Consistency Models' coordinates is DDIM with eta = 0."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    T = len(betas)
    t = data.draw(st.integers(1, T - 1))
    t_prev = data.draw(st.integers(0, t - 1))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    constant = lambda x, tt: torch.full_like(x, c)
    heun = distill.heun_step(d, constant, x, full(2, t), full(2, t_prev))
    euler = distill.heun_step(d, constant, x, full(2, t), full(2, t_prev), heun=False)
    ddim = ddim_sample(d, constant, x, full(2, t), t_prev, clip_denoised=False)
    assert torch.allclose(heun, euler, rtol=1e-9, atol=1e-9) and torch.allclose(euler, ddim, rtol=1e-9, atol=1e-9)
    moving = lambda x, tt: torch.tanh(x) + 0.01 * tt.double().view(-1, 1, 1, 1)
    euler = distill.heun_step(d, moving, x, full(2, t), full(2, t_prev), heun=False)
    assert torch.allclose(euler, ddim_sample(d, moving, x, full(2, t), t_prev, clip_denoised=False), atol=1e-9)


@FAST
@given(schedules(min_t=4), st.integers(0, 2**31 - 1), st.data())
def test_heun_is_edm_algorithm_1_written_out(betas, seed, data):
    """Heun's step (EDM, Karras et al. 2022, Algorithm 1, lines 4-8) written out in Consistency Models' coordinates
    x = x_t / alpha, noise level s = sigma / alpha: d = eps_hat(x, s); x_e = x + (s' - s) d; d' = eps_hat(x_e, s'),
    evaluated at the end of the step; x' = x + (s' - s) (d + d') / 2; for a network that is not constant."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    t = data.draw(st.integers(1, len(betas) - 1))
    t_prev = data.draw(st.integers(0, t - 1))
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    net = lambda x, tt: torch.tanh(x) + 0.01 * tt.double().view(-1, 1, 1, 1)  # an eps-network
    (a, s_t), (a_prev, s_prev) = alpha_sigma(d, t), alpha_sigma(d, t_prev)
    level, level_prev = s_t / a, s_prev / a_prev
    slope = d_1 = net(x_t, full(2, t))
    x_euler = x_t / a + (level_prev - level) * slope
    d_2 = net(x_euler * a_prev, full(2, t_prev))
    expected = (x_t / a + (level_prev - level) * (d_1 + d_2) / 2) * a_prev
    heun = distill.heun_step(d, net, x_t, full(2, t), full(2, t_prev))
    assert torch.allclose(heun, expected, rtol=1e-6, atol=1e-9)  # x_t / alpha reaches ~1e3 where abar -> 0


def three_pass_heun(d, teacher, x_t, t, t_prev):
    """Heun's step as distill.heun_step took it before issue 39, with three teacher passes: x0_hat at (x_t, t) for
    the Euler step, again at (x_t, t) for its eps, and at the Euler point (t_prev)."""
    (alpha, sigma), (alpha_prev, sigma_prev) = alpha_sigma(d, t, x_t), alpha_sigma(d, t_prev, x_t)
    x0_hat = lambda x, tt: d.p_mean_variance(teacher, x, tt, clip_denoised=False)[3]
    euler = ddim_step(x_t, x0_hat(x_t, t), alpha, sigma, alpha_prev, sigma_prev)
    eps_mean = (d.predict_noise_from_start(x_t, t, x0_hat(x_t, t))
                + d.predict_noise_from_start(euler, t_prev, x0_hat(euler, t_prev))) / 2
    return ddim_step(x_t, (x_t - sigma * eps_mean) / alpha, alpha, sigma, alpha_prev, sigma_prev)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_heun_takes_two_teacher_passes_and_gives_the_three_pass_result_bit_for_bit(mean_type):
    """Heun's step evaluates the teacher twice, at (x_t, t) and at the Euler point, and Euler once; a consistency
    distillation update (ConsistencyLoss) makes those 2 (or 1) teacher passes and no more; and the step equals the
    three-pass step it replaced (three_pass_heun) bit for bit, float32, a random UNet as the teacher of each kind."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type=mean_type)
    net, calls = randomized(UNet(**TINY_NET)), []
    teacher = lambda x, tt, y=None: calls.append(tt) or net(x, tt)
    x_t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t, t_prev = torch.tensor([99, 40, 7]), torch.tensor([80, 39, 0])
    with torch.no_grad():
        heun = distill.heun_step(d, teacher, x_t, t, t_prev)
        assert len(calls) == 2
        assert torch.equal(heun, three_pass_heun(d, net, x_t, t, t_prev))
        d_v = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type="v")
        for solver, passes in (("heun", 2), ("ddim", 1)):
            loss = distill.ConsistencyLoss(d_v, teacher, d, target=lambda x, tt, y: net(x, tt), n=6, solver=solver)
            x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
            calls.clear()
            loss(lambda x, tt, y: net(x, tt), x0, None, *loss.draw(x0, None))
            assert len(calls) == passes, solver


def test_pseudo_huber_is_that_of_improved_consistency_training():
    """Song & Dhariwal 2023, Sec. 3.3: d(x, y) = sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d), d the
    dimension of one image: 0 at x = y, ||x - y||^2 / (2c) for small differences and ||x - y|| - c for large ones."""
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    assert torch.equal(distill.pseudo_huber(x, x), torch.zeros(3, dtype=torch.float64))
    small, large = 1e-5 * torch.ones_like(x), torch.ones_like(x)  # ||.||^2 = 3072e-10, far below c^2; and 3072
    assert torch.allclose(distill.pseudo_huber(x + small, x), torch.full((3,), 3072e-10 / (2 * c), dtype=torch.float64),
                          rtol=1e-3)
    assert torch.allclose(distill.pseudo_huber(x + large, x), torch.full((3,), math.sqrt(3072 + c * c) - c,
                                                                        dtype=torch.float64), rtol=1e-12)


def test_one_step_of_multistep_sampling_is_one_step_sampling():
    """Algorithm 1 with a single time is f(x_T, T); more steps add noise back at falling noise levels."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type="v")
    net = randomized(UNet(**TINY_NET))
    model = lambda x, t: net(x, t)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    one = distill.consistency_sample(d, model, x_T.shape, 1, noise=x_T.clone())
    with torch.no_grad():
        direct = distill.consistency_function(d, model, x_T, full(3, 99)).clamp(-1, 1)
    assert torch.equal(one, direct)
    times = distill.consistency_levels(d, 3)
    assert distill.consistency_levels(d, 2, 0.3) == [99, distill.nearest_indices(d, [0.3])[0]]
    assert times[0] == 99 and times[0] > times[1] > times[2] >= 0


def exact_consistency(d, m, s2):
    """The exact consistency function for data N(m, s2 I): the ODE's closed form from (x_t, t) to t_min, in
    Consistency Models' coordinates (divided by alpha_{t_min}), as a v-network (v = (alpha x - x0_hat) / sigma with
    x0_hat chosen so f comes out exact: Eq. (5) solved for it)."""
    a_min = d.alphas_cumprod[0].double()

    def model(x, t):
        a = d.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        end = m * a_min.sqrt() + (x - m * a.sqrt()) * ((a_min * s2 + 1 - a_min) / (a * s2 + 1 - a)).sqrt()
        sigma = ((1 - a) / a).sqrt()
        c_skip, c_out = distill.boundary_scalings(sigma, distill.noise_level(d, torch.tensor(0)).double())
        skip_edm, out_edm = distill.edm_scalings(sigma)
        x0_hat = (end / a_min.sqrt() - c_skip * x / a.sqrt()) * out_edm / c_out.clamp(min=1e-300) + skip_edm * x / a.sqrt()
        x0_hat = torch.where(c_out > 0, x0_hat, torch.zeros_like(x0_hat))  # at t_min f = x for any x0_hat
        return (a.sqrt() * x - x0_hat) / (1 - a).sqrt()
    return model


@pytest.mark.parametrize("s2", [0.0, 0.3])
def test_the_exact_consistency_function_has_zero_loss(s2):
    """Data N(m, s2 I) with the exact teacher (the Gaussian's x0_hat): the exact consistency function (closed form)
    has zero CD loss. For s2 = 0 (a point mass) the teacher's DDIM step is itself exact; for s2 > 0 the teacher
    step is the exact ODE solution, so the test isolates the loss from the solver's discretisation."""
    betas = make_beta_schedule("linear", 200, 1e-3, 0.1)
    d = GaussianDiffusion(betas, mean_type="v", dtype=torch.float64)
    d_teacher = GaussianDiffusion(betas, mean_type="x0", dtype=torch.float64)
    m = 0.25

    def teacher(x, t, y=None):  # E[x_0 | x_t] for N(m, s2)
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        return m + s2 * a.sqrt() * (x - a.sqrt() * m) / (a * s2 + 1 - a)
    f_star = exact_consistency(d, m, s2)
    loss = distill.ConsistencyLoss(d, teacher, d_teacher, target=lambda x, t, y=None: f_star(x, t), n=18,
                                   solver="ddim")
    if s2 > 0:
        def exact_step(x_t, t, t_prev, y):
            a, a_prev = (d.alphas_cumprod[i].view(-1, 1, 1, 1) for i in (t, t_prev))
            return m * a_prev.sqrt() + (x_t - m * a.sqrt()) * ((a_prev * s2 + 1 - a_prev) / (a * s2 + 1 - a)).sqrt()
        loss.teacher_step = exact_step
    x0 = m + math.sqrt(s2) * torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    t, noise, n = loss.draw(x0, None)
    assert (t > loss.timesteps[n]).all()  # the student sits one level above the teacher step's end, t_{n+1} > t_n
    value, _ = loss(lambda x, tt, y: f_star(x, tt), x0, None, t, noise.double(), n)
    assert value.abs().max() < 1e-12
    off = loss(lambda x, tt, y: f_star(x, tt) + 0.01, x0, None, t, noise.double(), n)[0]  # a student slightly off
    assert off.min() > 0 and off.mean() > 1e-7


def test_multistep_consistency_sampling_is_algorithm_1_written_out():
    """Consistency Models' Algorithm 1 written out with a random v-network: x = f(x_T, T); then for
    each later noise level tau (falling geometrically from x_T's to `last`, each at the index of nearest level),
    x^ = x + sqrt(tau^2 - t_min^2) z and x = f(alpha_tau x^, tau), every draw from the sampler's generator in that
    order, the result clipped to [-1, 1]."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type="v", dtype=torch.float64)
    net = randomized(UNet(**TINY_NET))
    model = lambda x, t: net(x.float(), t)  # the sampler draws in float32; the diffusion's tables are float64
    ours = distill.consistency_sample(d, model, (2, 3, 8, 8), steps=3, generator=torch.Generator().manual_seed(7),
                                      last=0.5)
    abar = d.alphas_cumprod.double()
    level = ((1 - abar) / abar).sqrt()
    top = level[99].item()
    taus = [int((level.log() - math.log(top * (0.5 / top) ** (k / 2))).abs().argmin()) for k in (1, 2)]
    g = torch.Generator().manual_seed(7)
    x = distill.consistency_function(d, model, torch.randn(2, 3, 8, 8, generator=g), full(2, 99))
    for i in taus:
        z = torch.randn(2, 3, 8, 8, generator=g)
        x_hat = x + (level[i] ** 2 - level[0] ** 2).sqrt() * z
        x = distill.consistency_function(d, model, abar[i].sqrt() * x_hat, full(2, i))
    assert torch.allclose(ours, x.clamp(-1, 1), rtol=1e-6, atol=1e-6)


def test_cd_timesteps_follow_the_papers_discretisation():
    """Consistency Models Sec. 4: N noise levels spaced by rho = 7 between the chain's first and last, placed on the
    nearest indices: the first is index 0 (t_min), the last T - 1, strictly increasing."""
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    idx = distill.cd_timesteps(d, 18)
    assert idx[0] == 0 and idx[-1] == 999 and all(a < b for a, b in zip(idx, idx[1:])) and 15 <= len(idx) <= 18
    root = distill.noise_level(d, torch.tensor(idx)).double() ** (1 / 7)  # evenly spaced in sigma^(1/7), up to rounding
    steps = root.diff() / ((root[-1] - root[0]) / 17)
    assert steps.max() < 2.2 and steps[-8:].min() > 0.9

# ---- the command lines, end to end (tiny nets, CPU)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    r = run_script("train.py", *TRAIN_TINY, "--steps", "30", "--log-every", "30", "--sample-every", "0", "--out", out,
                   "--dropout", "0")
    assert r.returncode == 0, r.stderr
    return out


def distill_args(kind, teacher, out, *extra):
    tiny = [a for a in TRAIN_TINY]
    return ["--distill", kind, "--teacher", teacher, *tiny, "--log-every", "2", "--sample-every", "0", "--out", out,
            *extra]


def test_a_distillation_run_warms_up_not_at_all_unless_asked(teacher, tmp_path):
    """--warmup's default is the paper's 5000 for a diffusion run and 0 for --distill (the distillation papers' own
    code warms up not at all; 5000 steps of warmup kept a 200-update round's rate under 4% of --lr: docs/
    distillation.md); an explicit --warmup is honoured either way. The first logged rate of a progressive run
    without --warmup is --lr annealed, not warmed up."""
    import train
    for argv, expect in [([], 5000), (["--distill", "progressive"], 0), (["--distill", "consistency"], 0),
                         (["--distill", "progressive", "--warmup", "7"], 7), (["--warmup", "0"], 0)]:
        args, _ = train.get_args([*argv, "--teacher", str(teacher)] if argv[:1] == ["--distill"] else argv)
        train.check_args(args, 1)
        assert args.warmup == expect, argv
    tiny = [a for i, a in enumerate(TRAIN_TINY) if "--warmup" not in TRAIN_TINY[max(i - 1, 0):i + 1]]
    r = run_script("train.py", "--distill", "progressive", "--teacher", teacher, *tiny, "--teacher-steps", "4",
                   "--student-steps", "2", "--steps", "4", "--log-every", "1", "--sample-every", "0", "--lr", "1e-3",
                   "--out", tmp_path / "pd")
    assert r.returncode == 0, r.stderr
    assert "step 1/4 | loss" in r.stdout and "lr 1.00e-03" in r.stdout.split("step 1/4")[1].split("\n")[0]


def test_progressive_distillation_runs_resumes_and_samples_with_its_own_steps(teacher, tmp_path):
    """train.py --distill progressive: 8 teacher steps halve to 4 and 2 over --steps 8 (4 each); the checkpoint says
    the student samples with 2 DDIM steps, which sample.py then uses by default; stopped (SIGTERM) in step 5 and
    resumed, the run ends where an uninterrupted one does (round 2's teacher restored from the checkpoint, and read
    as the v-network it is)."""
    common = distill_args("progressive", teacher, tmp_path / "a", "--teacher-steps", "8", "--student-steps", "2",
                          "--round-lr", "anneal")
    r = run_script("train.py", *common, "--steps", "8")
    assert r.returncode == 0, r.stderr
    assert "round 1/2: a student of 4 steps learns the teacher's 8" in r.stdout and "round 2/2" in r.stdout
    logged = [float(line.split("| lr ")[1].split()[0]) for line in r.stdout.splitlines() if line.startswith("step ")]
    lr = 2e-4  # train.py's default, warmed up over TRAIN_TINY's 2 updates, then annealed to 0 in each round of 4
    assert logged == pytest.approx([lr * w * (end - s) / 4 for s, w, end in ((1, 0.5, 4), (3, 1, 4), (5, 1, 8),
                                                                           (7, 1, 8))])
    ckpt = load_checkpoint(str(tmp_path / "a"))
    assert ckpt["kind"] == "progressive" and ckpt["sampling"] == {"sampler": "ddim", "steps": 2}
    assert ckpt["diffusion_config"]["mean_type"] == "v"
    assert ckpt["teacher_diffusion_config"]["mean_type"] == "v"  # round 2's teacher is round 1's v-student
    b = distill_args("progressive", teacher, tmp_path / "b", "--teacher-steps", "8", "--student-steps", "2",
                     "--round-lr", "anneal")
    with pytest.raises(SystemExit) as stopped:
        in_process([str(a) for a in b] + ["--steps", "8"], stop_after=5)
    assert stopped.value.code == 0 and load_checkpoint(str(tmp_path / "b"))["step"] == 5
    r = run_script("train.py", "--resume", tmp_path / "b")
    assert r.returncode == 0 and "resuming at step 5" in r.stdout and "round 2/2" in r.stdout, r.stderr
    cb = load_checkpoint(str(tmp_path / "b"))
    for key in ("model", "ema", "teacher"):
        for name in ckpt[key]:
            assert torch.equal(ckpt[key][name], cb[key][name]), (key, name)
    r = run_script("sample.py", tmp_path / "a", "--n", "2", "--device", "cpu", "--out", tmp_path / "s.png",
                   "--npz", tmp_path / "s.npz")
    assert r.returncode == 0 and "DDIM eta 0.0, 2 steps" in r.stdout, r.stdout + r.stderr


def test_a_progressive_run_resumed_in_its_first_round_keeps_how_it_samples(teacher, tmp_path):
    """A one-round run (8 teacher steps to 4) stopped in its first round and resumed: every checkpoint says the
    student samples with 4 DDIM steps, so sample.py RUN works and RUN as a teacher starts from 4 steps. Resumed, it
    keeps its clipped teacher; a checkpoint from before --pd-teacher-clip resumes with the unclipped one it had."""
    common = distill_args("progressive", teacher, tmp_path / "a", "--teacher-steps", "8", "--student-steps", "4")
    with pytest.raises(SystemExit) as stopped:
        in_process([str(a) for a in common] + ["--steps", "4"], stop_after=2)
    assert stopped.value.code == 0 and load_checkpoint(str(tmp_path / "a"))["sampling"] == {"sampler": "ddim", "steps": 4}
    import train
    assert train.parse(["--resume", str(tmp_path / "a")])[0].pd_teacher_clip == "on"
    from checkpoint import save_checkpoint
    ckpt = load_checkpoint(str(tmp_path / "a"))  # as a run from before --pd-teacher-clip wrote it: unclipped targets
    save_checkpoint(str(tmp_path / "old.pt"), dict(ckpt, args={k: v for k, v in ckpt["args"].items()
                                                               if k != "pd_teacher_clip"}))
    assert train.parse(["--resume", str(tmp_path / "old.pt")])[0].pd_teacher_clip == "off"
    r = run_script("train.py", "--resume", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(tmp_path / "a"))["sampling"] == {"sampler": "ddim", "steps": 4}
    r = run_script("sample.py", tmp_path / "a", "-n", "2", "--device", "cpu", "--out", tmp_path / "s.png")
    assert r.returncode == 0 and "DDIM eta 0.0, 4 steps" in r.stdout, r.stdout + r.stderr
    r = run_script("train.py", *distill_args("progressive", tmp_path / "a", tmp_path / "b", "--student-steps", "2"),
                   "--steps", "1")
    assert r.returncode == 0 and "a student of 2 steps learns the teacher's 4" in r.stdout, r.stdout + r.stderr


def test_a_progressive_run_resumed_with_another_steps_keeps_its_rounds(teacher, tmp_path):
    """--steps 8 splits two rounds at update 4; stopped at update 5 (round 2, the teacher the round-1 student) and
    resumed with --steps 16, the run stays in round 2 (its starts are the checkpoint's), ending with 2 steps."""
    common = distill_args("progressive", teacher, tmp_path / "a", "--teacher-steps", "8", "--student-steps", "2")
    with pytest.raises(SystemExit):
        in_process([str(a) for a in common] + ["--steps", "8"], stop_after=5)
    r = run_script("train.py", "--resume", tmp_path / "a", "--steps", "16")
    assert r.returncode == 0, r.stderr
    assert "round 1/2" not in r.stdout and "round 2/2: a student of 2 steps learns the teacher's 4 (steps 4-16)" in r.stdout
    assert load_checkpoint(str(tmp_path / "a"))["sampling"] == {"sampler": "ddim", "steps": 2}


def test_a_consistency_student_refuses_classifier_guidance(teacher, tmp_path):
    """Classifier guidance is not part of a consistency model's sampler (Algorithm 1): --classifier on a consistency
    student is one clear line, not a run that says it is guided and is not; nor does a student take classifier-free
    guidance, which it was not distilled with."""
    r = run_script("train.py", *distill_args("consistency", teacher, tmp_path / "cd", "--cd-n", "6"), "--steps", "2")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *TRAIN_TINY, "--classifier", "--steps", "1", "--sample-every", "0", "--out",
                   tmp_path / "clf")
    assert r.returncode == 0, r.stderr
    r = run_script("sample.py", tmp_path / "cd", "--classifier", tmp_path / "clf", "--class", "0", "--device", "cpu",
                   "--out", tmp_path / "g.png")
    assert "takes no classifier guidance" in assert_one_line_error(r)
    r = run_script("sample.py", tmp_path / "cd", "--guidance", "1", "--device", "cpu")
    assert "learnt its teacher's unguided steps" in assert_one_line_error(r)  # nor classifier-free guidance


def test_consistency_distillation_runs_and_samples_in_one_or_two_steps(teacher, tmp_path):
    """train.py --distill consistency trains a student (target network an EMA with --cd-mu), whose checkpoint
    samples in one step by default and in two with --steps 2; an ancestral sampler on it is one clear line."""
    r = run_script("train.py", *distill_args("consistency", teacher, tmp_path / "cd", "--cd-n", "6",
                                             "--cd-mu", "0.5"), "--steps", "3")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(tmp_path / "cd"))
    assert ckpt["kind"] == "consistency" and set(ckpt["target"]) == set(ckpt["model"])
    for steps, label in ((None, "1 step"), ("2", "2 steps, last noise level 0.821")):
        r = run_script("sample.py", tmp_path / "cd", "--n", "3", "--device", "cpu", "--out", tmp_path / "s.png",
                       "--npz", tmp_path / "s.npz", *(["--steps", steps] if steps else []))
        assert r.returncode == 0 and f"consistency model, {label}" in r.stdout, r.stdout + r.stderr
        assert read_npz(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 3)
    two = read_npz(tmp_path / "s.npz")["arr_0"]
    r = run_script("sample.py", tmp_path / "cd", "--n", "3", "--device", "cpu", "--out", tmp_path / "s.png",
                   "--npz", tmp_path / "s5.npz", "--steps", "2", "--consistency-last", "5")
    assert r.returncode == 0 and "last noise level 5.0" in r.stdout, r.stdout + r.stderr
    assert not (read_npz(tmp_path / "s5.npz")["arr_0"] == two).all()  # the level reaches the sampler
    bad = run_script("sample.py", tmp_path / "cd", "--sampler", "ddpm", "--device", "cpu")
    assert "samples with its own sampler" in assert_one_line_error(bad)


def test_the_sampler_table_has_every_sampler_and_student_against_algorithm_2(teacher, tmp_path):
    """bench_samplers.py TEACHER --students PD,CD --rmse over two seeds: a row per sampler and NFE (the two T-step
    references once each; restart from 4 NFE), the progressive student at its own steps, the consistency student
    at each NFE up to 8; each row's numbers are the mean and spread over the seeds, its ratio the mean of each
    seed's quality over that seed's Algorithm 2; a checkpoint that is not a student is one line."""
    pd, cd = tmp_path / "pd", tmp_path / "cd"
    assert run_script("train.py", *distill_args("progressive", teacher, pd, "--teacher-steps", "4", "--student-steps",
                                                "2"), "--steps", "2").returncode == 0
    assert run_script("train.py", *distill_args("consistency", teacher, cd, "--cd-n", "6"), "--steps", "2").returncode == 0
    r = run_script("bench_samplers.py", teacher, "--students", f"{pd},{cd}", "--nfe", "1,2,4,50", "--n", "16",
                   "--seeds", "0,1", "--rmse", "--device", "cpu", "--csv", tmp_path / "t.csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    got = [(row["sampler"].split(" (")[0], int(row["nfe"])) for row in rows]
    ours = ("ddpm", "ddim", "dpm++", "dpm++")
    assert got == [("Algorithm 2, all T steps", 50), ("ddim, all T steps", 50), *[(name, n) for n in (1, 2)
                   for name in ours], *[(name, 4) for name in ours], ("restart", 4), ("dpm++", 50), ("dpm++", 50),
                   ("restart", 50), ("progressive student", 2), ("consistency student", 1), ("consistency student", 2),
                   ("consistency student", 4)]
    seeds = {}  # each seed's printed quality: the rows are their mean and spread
    for line in r.stdout.splitlines():
        if line.startswith("  seed "):
            seed, label, nfe, quality = [part.strip() for part in line.split("|")[:4]]
            seeds.setdefault((label, int(nfe)), []).append(float(quality.split()[1]))
    reference = seeds[("Algorithm 2, all T steps (the quality reference)", 50)]
    for row in rows:
        q = seeds[(row["sampler"], int(row["nfe"]))]
        assert len(q) == 2 and float(row["quality"]) == pytest.approx(sum(q) / 2, abs=0.01)
        assert float(row["quality_sd"]) == pytest.approx(abs(q[0] - q[1]) / 2 ** 0.5, abs=0.01)
        assert float(row["ratio"]) == pytest.approx((q[0] / reference[0] + q[1] / reference[1]) / 2, rel=1e-3)
    assert float(rows[1]["rmse"]) == 0 and all(float(row["img_per_s"]) > 0 for row in rows)
    assert all(0 < float(row["nearest"]) < 255 for row in rows)
    bad = run_script("bench_samplers.py", teacher, "--students", teacher, "--nfe", "1", "--n", "2", "--device", "cpu")
    assert "not a distilled student" in assert_one_line_error(bad)


def test_consistency_from_an_eps_teacher_converts_first_and_resumes_exactly(teacher, tmp_path):
    """--convert-steps 2 of --steps 4: the log names both phases; stopped at the switch (step 2) or after it (step
    3) and resumed, the run ends where an uninterrupted one does (student, EMA and target network); at the switch
    the target network restarts from the converted student."""
    common = lambda out: distill_args("consistency", teacher, out, "--cd-n", "6", "--cd-mu", "0.5",
                                      "--convert-steps", "2", "--steps", "4")
    r = run_script("train.py", *common(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "steps 0-2: the v-student regresses onto the teacher's own x0" in r.stdout, r.stdout
    assert "steps 2-4: consistency distillation" in r.stdout, r.stdout
    a = load_checkpoint(str(tmp_path / "a"))
    for stop in (2, 3):
        out = tmp_path / f"b{stop}"
        with pytest.raises(SystemExit) as stopped:
            in_process([str(x) for x in common(out)], stop_after=stop)
        assert stopped.value.code == 0 and load_checkpoint(str(out))["step"] == stop
        if stop == 2:
            converted = load_checkpoint(str(out))["model"]
        r = run_script("train.py", "--resume", out)
        assert r.returncode == 0 and f"resuming at step {stop}" in r.stdout, r.stderr
        b = load_checkpoint(str(out))
        for key in ("model", "ema", "target"):
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (stop, key, name)
    # mu = 1 and EMA decay 1: a target and an EMA that stay where the switch put them
    r = run_script("train.py", *common(tmp_path / "c"), "--cd-mu", "1", "--ema-decay", "1", "--steps", "3")
    assert r.returncode == 0, r.stderr
    c = load_checkpoint(str(tmp_path / "c"))
    for key in ("target", "ema"):
        assert all(torch.equal(c[key][name], converted[name]) for name in converted), key


def test_bad_distillation_input_is_one_line(teacher, tmp_path):
    """A teacher that is not a checkpoint, student steps that halving cannot reach, no teacher at all, and a
    conversion as long as the run: one clear line each."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [(["--distill", "progressive", "--teacher", str(tmp_path / "junk.pt")], "cannot read checkpoint"),
             (["--distill", "progressive", "--teacher", str(teacher), "--teacher-steps", "8", "--student-steps", "3"],
              "not reachable by halving"),
             (["--distill", "consistency"], "needs --teacher"),
             (["--distill", "consistency", "--teacher", str(teacher), "--convert-steps", "2"], "--convert-steps 2")]
    for flags, expect in cases:
        r = run_script("train.py", *TRAIN_TINY, *flags, "--steps", "2", "--out", tmp_path / "x")
        assert expect in assert_one_line_error(r)
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_progressive_weightings_are_truncated_snr_and_snr_plus_one():
    """Salimans & Ho Sec. 4: the x-loss weighted by max(SNR, 1) ("truncated SNR") or SNR + 1. The two losses of
    one student on one draw differ only by the weight, so their ratio is max(SNR_t, 1) / (SNR_t + 1) per sample,
    SNR_t = abar_t / (1 - abar_t): below 1 at low noise, 1 / (SNR + 1) at high noise."""
    betas = make_beta_schedule("linear", 1000)
    d_eps, d_v = GaussianDiffusion(betas), GaussianDiffusion(betas, mean_type="v")
    teacher = randomized(UNet(**dict(TINY_NET)))
    student = lambda x, t, y: teacher(x, t) * 0.5
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trunc = distill.ProgressiveLoss(d_v, lambda x, t, y=None: teacher(x, t), d_eps, steps=8)
    plus1 = distill.ProgressiveLoss(d_v, lambda x, t, y=None: teacher(x, t), d_eps, steps=8, weighting="snr+1")
    i = torch.arange(8)  # every step of the student's grid once
    t, noise = trunc.t[i], torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ratio = trunc(student, x0, None, t, noise, i)[0] / plus1(student, x0, None, t, noise, i)[0]
    abar = d_v.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    assert torch.allclose(ratio.double(), snr.clamp(min=1) / (snr + 1), rtol=1e-4)
    assert (snr > 1).any() and (snr < 1).any()  # both sides of the truncation drawn


def test_distillation_steps_move_no_tensor_between_devices(monkeypatch):
    """The distillation losses build their timestep tables on the diffusion's device once: a step (draw and loss, of
    progressive and consistency distillation and of the conversion) asks for no copy between devices, each of which
    would be a blocking host sync on a GPU."""
    d_eps = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2))
    d_v = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type="v")
    net = randomized(UNet(**TINY_NET))
    losses = [distill.ProgressiveLoss(d_v, net, d_eps, steps=4), distill.TeacherRegression(d_v, net, d_eps),
              distill.ConsistencyLoss(d_v, net, d_eps, net, n=6)]
    moves = []
    to = torch.Tensor.to
    def spy(self, *args, **kwargs):
        if any(isinstance(a, (str, torch.device)) for a in args) or "device" in kwargs:
            moves.append(args or kwargs)
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: moves.append("cpu") or to(self, "cpu"))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        for loss in losses:
            loss(lambda x, t, y: net(x, t), x0, None, *loss.draw(x0, None))
    assert moves == []


def built_run(kind, teacher, out, *extra):
    """runs.build_run for train.py's distillation flags (the tiny net's), on 8 shapes."""
    import runs
    import train
    from data import make_shapes
    args, _, kind, _ = train.parse(distill_args(kind, str(teacher), str(out), *extra))
    return runs.build_run(kind, args, None, make_shapes(8, 8, 3)[0], None, torch.device("cpu"))


def test_students_train_without_dropout_unless_asked(teacher, tmp_path):
    """The papers' students train with dropout 0 (the reference configs: "same as teacher but with 0 dropout"), the
    teacher keeping its own; --student-dropout sets another (the teacher's own value keeps its dropout). The
    consistency target network is built as the student (so with mu = 0 it has the student's weights) and runs
    without gradient. A student is the teacher's network: its normalisation groups too, whatever the flag's default."""
    from checkpoint import save_checkpoint
    ckpt = load_checkpoint(str(teacher))
    save_checkpoint(str(tmp_path / "teacher.pt"), dict(ckpt, model_config=dict(ckpt["model_config"], dropout=0.15,
                                                                                group_channels=2)))
    for kind, extra, want in (("progressive", [], 0.0), ("consistency", [], 0.0),
                              ("progressive", ["--student-dropout", "0.15"], 0.15)):
        run = built_run(kind, tmp_path / "teacher.pt", tmp_path / "s", *extra, "--dropout", "0.3")
        assert run.model_config["dropout"] == want and run.objective.teacher.config["dropout"] == 0.15  # its own
        assert run.model_config["group_channels"] == run.objective.teacher.config["group_channels"] == 2
        if kind == "consistency":
            target = run.objective.target
            assert target.config == run.model_config and not any(p.requires_grad for p in target.parameters())


def test_progressive_rounds_anneal_the_learning_rate_and_start_adam_afresh():
    """With anneal (the reference's, --round-lr anneal) the rate falls linearly to 0 within each round, with
    reset_adam (--round-adam reset) Adam's state starts afresh at a round's first update, and the EMA restarts
    from the student there either way (the defaults); without them the rate stays and the state is kept."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), mean_type="v")
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    net.config = {}
    make = lambda **kw: distill.ProgressiveDistillation(d, torch.nn.Linear(2, 2), d, {}, [4, 2], [0, 5], 0, 10, **kw)
    pd = make()
    assert pd.anneal and pd.reset_adam  # the library's defaults are the reference's, as train.py's flags
    assert pd.clip_teacher and pd.loss.clip_teacher  # and, as train.py's, the teacher clipped in the target
    assert [pd.learning_rate(s, 1.0) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    pd.begin(5, net, ema, optimizer)
    assert pd.round == 1 and not optimizer.state and torch.equal(ema.weight, net.weight)
    assert [pd.learning_rate(s, 1.0) for s in (5, 9)] == pytest.approx([1.0, 0.2])
    pd = make(anneal=False, reset_adam=False)
    optimizer.step()
    pd.begin(5, net, ema, optimizer)
    assert optimizer.state and pd.learning_rate(9, 1.0) == 1.0


def test_the_round_flags_reach_the_run(teacher, tmp_path):
    """train.py's --round-lr, --round-adam and --pd-teacher-clip set the run's objective: the reference's annealing
    and reset, and the clipped teacher, by default, each turned off by its flag."""
    for extra, want in (([], (True, True)), (["--round-lr", "constant"], (False, True)),
                        (["--round-adam", "keep"], (True, False))):
        run = built_run("progressive", teacher, tmp_path / "s", *extra)
        assert (run.objective.anneal, run.objective.reset_adam) == want
    assert built_run("progressive", teacher, tmp_path / "s").objective.clip_teacher
    assert not built_run("progressive", teacher, tmp_path / "s", "--pd-teacher-clip", "off").objective.clip_teacher


def test_consistency_target_is_an_ema_of_the_student():
    """Eq. (8): theta- <- mu theta- + (1 - mu) theta after each update; mu = 0 makes the target the student."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    student, target = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    loss = distill.ConsistencyLoss(d, None, d, target, mu=0.9, n=6)
    before = target.weight.detach().clone()
    loss.after_update(student)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * student.weight)
    loss.mu = 0.0
    loss.after_update(student)
    assert torch.equal(target.weight, student.weight)
