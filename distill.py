"""
Distilling a trained DDPM into a sampler of 1-4 network calls, from the papers that came after it:
- progressive distillation (Salimans & Ho 2022, arXiv:2202.00512, Algorithm 2): a student learns to take in one
  DDIM step what its teacher takes in two, then becomes the next teacher, halving the steps each round;
- consistency distillation (Song, Dhariwal, Chen, Sutskever 2023, arXiv:2303.01469, Algorithms 1 and 2): a
  student learns f(x_t, t) -> x_0, the same all along the teacher's ODE trajectory, with f(x, t_min) = x built in.
Both students predict v (Salimans & Ho, Sec. 4: an eps-student fails at few steps, x0_hat = (x_t - sigma eps) /
alpha magnifying its errors where alpha -> 0). A student starts from its teacher's weights; an eps-teacher's output
is read as v, which is right where the two agree (v -> eps as abar_t -> 1) and retrained where they differ: by the
first round itself in progressive distillation, by a regression onto the teacher's predictions first
(TeacherRegression) in consistency distillation.
Each method is an objective of train.py's loop (training.Objective's interface): draw() and __call__ give the
loss, begin() switches rounds and phases between updates, state() is what a checkpoint keeps to resume exactly.
Names: timesteps are this project's 0-based indices into the T-step schedule; alpha_t = sqrt(abar_t) and sigma_t =
sqrt(1 - abar_t) (samplers.alpha_sigma), the papers' VP notation; Consistency Models' (EDM's) noise level, their t,
is `noise_level` = sigma_t / alpha_t, their x being ours divided by alpha_t; x0_hat is a network's prediction of
x_0 (Salimans & Ho's x^_theta).
"""
import math

import torch

from samplers import alpha_sigma, ddim_sample_loop, ddim_step, spaced_timesteps

# ---- progressive distillation ----


def halving_rounds(teacher_steps, student_steps):
    """The student step counts of each round, teacher_steps / 2 down to student_steps; ValueError if halving
    does not reach it."""
    rounds, n = [], teacher_steps
    while n > student_steps and n % 2 == 0:
        n //= 2
        rounds.append(n)
    if n != student_steps or not rounds:
        raise ValueError(f"{student_steps} student steps are not reachable by halving {teacher_steps} teacher steps")
    return rounds


def nested_grid(num_timesteps, steps):
    """The timesteps a sampler of `steps` steps visits: trailing spacing, index round(T j / steps) - 1 for
    j = steps..1. For steps = 2^k the grid of steps / 2 is every other point of it (the same fractions j / steps),
    so each round's steps are a subset of the round before's."""
    return spaced_timesteps(num_timesteps, steps, "trailing")


def distillation_target(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2):
    """Algorithm 2: the x~ for which one DDIM step t -> t'' of the student lands where the teacher's two steps
    t -> t' -> t'' did: x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)."""
    ratio = sigma_t2 / sigma_t
    return (z_t2 - ratio * z_t) / (alpha_t2 - ratio * alpha_t)


class ProgressiveLoss:
    """One round of Algorithm 2: for t on the student's grid of `steps` steps, z_t = alpha_t x + sigma_t eps, two
    DDIM steps of the teacher t -> t' -> t'' on the grid of 2 steps, the target x~, and the loss
    w(lambda_t) ||x~ - x0_hat_student(z_t)||^2 with the truncated-SNR weight max(SNR_t, 1) or SNR_t + 1 (Sec. 4;
    SNR + 1 on x is the plain loss on v). The student is a v-network; the teacher any network of its diffusion.
    clip_teacher: the teacher's x0_hat clipped to [-1, 1] in its two steps, as its sampler clips; False is
    Algorithm 2 as printed (and its reference code, whose teachers predict x, or x and eps)."""

    def __init__(self, diffusion, teacher, teacher_diffusion, steps, weighting="snr-trunc", bf16=False,
                 clip_teacher=True):
        self.diffusion, self.teacher, self.teacher_diffusion = diffusion, teacher, teacher_diffusion
        self.steps, self.weighting, self.bf16, self.clip_teacher = steps, weighting, bf16, clip_teacher
        grid, device = nested_grid(diffusion.num_timesteps, 2 * steps) + [-1], diffusion.betas.device
        # t > t' > t'', on the diffusion's device once: indexing them each step is no host sync
        self.t, self.t1, self.t2 = (torch.tensor(grid[k::2][:steps], device=device) for k in range(3))

    def draw(self, x0, y):
        i = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device)  # Alg. 2: t = i / N
        return self.t[i], torch.randn_like(x0), i

    def __call__(self, model, x0, y, t, noise, i):
        d, dev = self.diffusion, x0.device
        t1, t2 = self.t1[i], self.t2[i]
        z_t = d.q_sample(x0, t, noise)
        alpha_t, sigma_t = alpha_sigma(d, t, x0)
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=self.bf16 and dev.type == "cuda"):
            teacher = lambda x, tt: self.teacher(x, tt, y)
            alpha_t1, sigma_t1 = alpha_sigma(d, t1, x0)
            alpha_t2, sigma_t2 = alpha_sigma(d, t2, x0)
            x0_hat = self.teacher_diffusion.p_mean_variance(teacher, z_t, t, clip_denoised=self.clip_teacher)[3]
            z_t1 = ddim_step(z_t, x0_hat, alpha_t, sigma_t, alpha_t1, sigma_t1)
            x0_hat1 = self.teacher_diffusion.p_mean_variance(teacher, z_t1, t1, clip_denoised=self.clip_teacher)[3]
            z_t2 = ddim_step(z_t1, x0_hat1, alpha_t1, sigma_t1, alpha_t2, sigma_t2)
            target = distillation_target(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2).float()
        with torch.autocast(dev.type, torch.bfloat16, enabled=self.bf16 and dev.type == "cuda"):
            v = model(z_t, t, y).float()
        x0_hat_student = d.predict_start_from_v(z_t, t, v)
        snr = (alpha_t / sigma_t).square().flatten()
        weight = snr.clamp(min=1.0) if self.weighting == "snr-trunc" else snr + 1
        return weight * ((target - x0_hat_student) ** 2).flatten(1).mean(1), None


def progressive_schedule(teacher_steps, student_steps, total_updates):
    """The rounds of a progressive run: the student's steps in each (halving_rounds) and the update each begins
    at, the run's updates split evenly over them."""
    rounds = halving_rounds(teacher_steps, student_steps)
    per_round = math.ceil(total_updates / len(rounds))
    return rounds, [r * per_round for r in range(len(rounds))]


class ProgressiveDistillation:
    """Algorithm 2's outer loop as train.py runs it: round r trains a student of rounds[r] steps from update
    starts[r] on. At a round's first update the student becomes the teacher (a v-network, read through the
    student's own diffusion) and the EMA restarts from it, so a round's samples owe nothing to the round before's
    step count; as in the reference implementation (google-research/diffusion_distillation), the learning rate is
    annealed linearly to 0 within each round (anneal) and Adam's state starts afresh each round (reset_adam). Unlike
    the reference, the teacher's x0_hat is clipped in the target (clip_teacher, ProgressiveLoss): the student learns
    the teacher's sampler as it samples, which for an eps-teacher is far from its unclipped ODE. The
    rounds and their starts are fixed when the run begins and kept in the checkpoint, so a resume with another
    --steps continues the same round."""
    metric = None

    def __init__(self, diffusion, teacher, teacher_diffusion, teacher_diffusion_config, rounds, starts, round=0,
                 total_updates=None, weighting="snr-trunc", bf16=False, anneal=True, reset_adam=True,
                 clip_teacher=True):
        self.diffusion, self.teacher, self.teacher_diffusion = diffusion, teacher, teacher_diffusion
        self.teacher_diffusion_config, self.rounds, self.starts, self.round = teacher_diffusion_config, rounds, starts, round
        self.total_updates, self.weighting, self.bf16 = total_updates, weighting, bf16
        self.anneal, self.reset_adam, self.clip_teacher, self._clip = anneal, reset_adam, clip_teacher, True
        self.loss, self.announced = self._round_loss(), False

    @property
    def clip(self):
        """Whether x0 is clipped to [-1, 1] in the student's samples, and with clip_teacher in the teacher's steps
        of the target (not for latents)."""
        return self._clip

    @clip.setter
    def clip(self, value):
        self._clip = value
        self.loss.clip_teacher = self.clip_teacher and value

    def _round_loss(self):
        return ProgressiveLoss(self.diffusion, self.teacher, self.teacher_diffusion, self.rounds[self.round],
                               self.weighting, self.bf16, self.clip_teacher and self._clip)

    def draw(self, x0, y):
        return self.loss.draw(x0, y)

    def __call__(self, model, x0, y, *draws):
        return self.loss(model, x0, y, *draws)

    def begin(self, step, model, ema, optimizer):
        """Before update step + 1: a new round starts here, or the run (re)starts; -> a line for the log, or None."""
        if self.round + 1 < len(self.rounds) and step == self.starts[self.round + 1]:
            self.round += 1
            self.teacher.load_state_dict(model.state_dict())
            self.teacher_diffusion, self.teacher_diffusion_config = self.diffusion, None  # the student's own
            ema.load_state_dict(model.state_dict())
            if self.reset_adam:  # each round a fresh optimizer, as the reference's each new training state
                optimizer.state.clear()
            self.loss = self._round_loss()
        elif self.announced:
            return None
        self.announced, r = True, self.round
        end = self.starts[r + 1] if r + 1 < len(self.rounds) else self.total_updates
        return (f"round {r + 1}/{len(self.rounds)}: a student of {self.rounds[r]} steps learns the teacher's "
                f"{2 * self.rounds[r]} (steps {self.starts[r]}-{end})")

    def after_update(self, model):
        pass

    def learning_rate(self, step, lr):
        """The rate of update step + 1, from the run's (lr, after its warmup): annealed linearly to 0 within each
        round, as the reference does (a round's last updates fine-tune what its first ones learned), or lr itself."""
        if not self.anneal:
            return lr
        end = self.starts[self.round + 1] if self.round + 1 < len(self.rounds) else self.total_updates
        return lr * (end - step) / (end - self.starts[self.round])

    def state(self, diffusion_config):
        """What a checkpoint keeps: the round's teacher, the rounds, and how the student samples now."""
        return dict(teacher=self.teacher.state_dict(), teacher_config=self.teacher.config,
                    teacher_diffusion_config=self.teacher_diffusion_config or diffusion_config, rounds=self.rounds,
                    round_starts=self.starts, round=self.round, sampling=dict(sampler="ddim", steps=self.rounds[self.round]))

    def sample(self, model, shape, generator):
        """The student's own sampler: DDIM (eta 0) over the round's steps."""
        return ddim_sample_loop(self.diffusion, model, shape, self.rounds[self.round], 0.0, generator=generator,
                                clip_denoised=self.clip)

# ---- the first student of an eps-teacher ----


class TeacherRegression:
    """How a v-student starts from an eps-teacher (this project's design: the papers' teachers already share their
    students' parameterisation). Read as v, an eps-network is right only at low noise (v -> eps as abar_t -> 1);
    converted exactly, v = (eps - sigma_t z_t) / alpha_t, it carries the eps-network's errors magnified by
    1 / alpha_t (157 at t = T - 1 on the linear schedule). So the student first regresses onto the teacher's own
    prediction, as the teacher samples with it: z_t = alpha_t x + sigma_t eps for t uniform over the T steps
    (Algorithm 1's draw), x~ the teacher's clipped x0_hat, and the v it implies with the eps it implies,
    v~ = alpha_t (z_t - alpha_t x~) / sigma_t - sigma_t x~ = (alpha_t z_t - x~) / sigma_t; the loss ||v - v~||^2 is
    (1 + SNR_t) ||x0_hat_student - x~||^2. Afterwards the student's x0_hat is the teacher's at every noise level,
    so its consistency function (f = x0_hat above t_min) is the teacher's denoiser, where Consistency Models'
    students start."""

    clip = True  # the teacher's x0_hat clipped to [-1, 1], as it samples (not for latents)

    def __init__(self, diffusion, teacher, teacher_diffusion, bf16=False):
        self.diffusion, self.teacher, self.teacher_diffusion, self.bf16 = diffusion, teacher, teacher_diffusion, bf16

    def draw(self, x0, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        return t, torch.randn_like(x0)

    def __call__(self, model, x0, y, t, noise):
        dev = x0.device
        z_t = self.diffusion.q_sample(x0, t, noise)
        alpha_t, sigma_t = alpha_sigma(self.diffusion, t, x0)
        autocast = torch.autocast(dev.type, torch.bfloat16, enabled=self.bf16 and dev.type == "cuda")
        with torch.no_grad(), autocast:
            x0_hat = self.teacher_diffusion.p_mean_variance(lambda x, tt: self.teacher(x, tt, y), z_t, t,
                                                            clip_denoised=self.clip)[3].float()
        with autocast:
            v = model(z_t, t, y).float()
        return ((v - (alpha_t * z_t - x0_hat) / sigma_t) ** 2).flatten(1).mean(1), None

# ---- consistency distillation ----


SIGMA_DATA = 0.5  # EDM's and Consistency Models' data standard deviation, for c_skip and c_out


def noise_level(diffusion, t):
    """Consistency Models' (EDM's) noise level at index t, sigma_t / alpha_t: x_t / alpha_t = x_0 + (sigma_t /
    alpha_t) eps."""
    alpha, sigma = alpha_sigma(diffusion, t)
    return sigma / alpha


def nearest_indices(diffusion, levels):
    """The timestep indices whose noise levels are nearest (in log) to each of the given levels."""
    table = noise_level(diffusion, torch.arange(diffusion.num_timesteps, device=diffusion.betas.device))
    table = table.double().cpu().log()
    return [int((table - math.log(level)).abs().argmin()) for level in levels]


def cd_timesteps(diffusion, n=18, rho=7.0):
    """Consistency Models Sec. 4's discretisation, t_i = (t_min^(1/rho) + (i-1)/(N-1) (t_max^(1/rho) -
    t_min^(1/rho)))^rho for i = 1..N (EDM's, rho = 7), t_min and t_max our chain's first and last noise levels, each
    moved to the index of nearest noise level; increasing, each index once (t_1 = 0: t_min, t_N = T - 1)."""
    ends = noise_level(diffusion, torch.tensor([0, diffusion.num_timesteps - 1], device=diffusion.betas.device))
    lo, hi = (ends.double().cpu() ** (1 / rho)).tolist()
    wanted = (lo + torch.arange(n, dtype=torch.float64) / (n - 1) * (hi - lo)) ** rho
    return sorted(set(nearest_indices(diffusion, wanted.tolist())))


def boundary_scalings(level, level_min):
    """Consistency Models Appendix C, at noise level `level`: c_skip = s_data^2 / ((level - level_min)^2 + s_data^2)
    and c_out = s_data (level - level_min) / sqrt(s_data^2 + level^2), so that c_skip(level_min) = 1 and
    c_out(level_min) = 0."""
    c_skip = SIGMA_DATA ** 2 / ((level - level_min) ** 2 + SIGMA_DATA ** 2)
    c_out = SIGMA_DATA * (level - level_min) / (SIGMA_DATA ** 2 + level ** 2).sqrt()
    return c_skip, c_out


def edm_scalings(level):
    """EDM's preconditioning (Karras et al. 2022, Table 1), which Consistency Models' scalings shift by level_min:
    the denoiser is D = c_skip x + c_out F with c_skip = s_data^2 / (level^2 + s_data^2), c_out = level s_data /
    sqrt(level^2 + s_data^2)."""
    return SIGMA_DATA ** 2 / (level ** 2 + SIGMA_DATA ** 2), level * SIGMA_DATA / (level ** 2 + SIGMA_DATA ** 2).sqrt()


def consistency_function(diffusion, model, x_t, t):
    """f(x, t) = c_skip(t) x + c_out(t) F(x, t), Consistency Models Eq. (5), in their coordinates (x = x_t / alpha_t),
    F the raw output EDM's preconditioning gives for the network's x0_hat, F = (x0_hat - c_skip^EDM x) / c_out^EDM
    (the parameterisation of the paper's EDM teachers and their students). At t_min c_skip = 1 and c_out = 0, so
    f(x, t_min) = x for any weights; above it, where the noise level is far above t_min's, f is x0_hat: a student
    whose x0_hat is its teacher's starts as the teacher's denoiser, as the paper's students do (f = c_skip x +
    (1 - c_skip) x0_hat instead would start with a c_skip share of the noisy x in it)."""
    alpha, sigma = alpha_sigma(diffusion, t, x_t)
    level = sigma / alpha
    c_skip, c_out = boundary_scalings(level, noise_level(diffusion, torch.zeros_like(t[:1])))
    skip_edm, out_edm = edm_scalings(level)
    x = x_t / alpha
    x0_hat = diffusion.predict_start_from_v(x_t, t, model(x_t, t).float())
    return c_skip * x + c_out * (x0_hat - skip_edm * x) / out_edm


def heun_step(diffusion, teacher, x_t, t, t_prev, heun=True):
    """One step of the teacher's probability-flow ODE from t to t_prev < t, Eq. (6)'s Phi. In EDM's coordinates
    (x / alpha against the noise level) eps_hat is the ODE's slope, and Euler, x' = x + (level_prev - level) eps_hat,
    is the DDIM step with eta = 0 (samplers.ddim_step); Heun (EDM, Karras et al. 2022, Algorithm 1) takes the same
    step with eps_hat averaged at both ends: two teacher passes, the first shared with Euler. Unclipped. Returns
    x_{t_prev} (ours, VP)."""
    alpha, sigma = alpha_sigma(diffusion, t, x_t)
    alpha_prev, sigma_prev = alpha_sigma(diffusion, t_prev, x_t)
    x0_hat = lambda x, tt: diffusion.p_mean_variance(teacher, x, tt, clip_denoised=False)[3]
    x0_hat_t = x0_hat(x_t, t)
    euler = ddim_step(x_t, x0_hat_t, alpha, sigma, alpha_prev, sigma_prev)
    if not heun:
        return euler
    eps_t = diffusion.predict_noise_from_start(x_t, t, x0_hat_t)
    eps_euler = diffusion.predict_noise_from_start(euler, t_prev, x0_hat(euler, t_prev))
    eps_mean = (eps_t + eps_euler) / 2
    return ddim_step(x_t, (x_t - sigma * eps_mean) / alpha, alpha, sigma, alpha_prev, sigma_prev)


def pseudo_huber(a, b):
    """The pseudo-Huber distance of improved consistency training (Song & Dhariwal 2023, arXiv:2310.14189):
    sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d), d the dimension of an image."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d)
    return (((a - b) ** 2).flatten(1).sum(1) + c ** 2).sqrt() - c


class ConsistencyLoss:
    """Algorithm 2 (CD): n ~ U{1..N-1}, x_{t_{n+1}} = q_sample(x, t_{n+1}), one teacher ODE step to t_n, and
    lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)), lambda = 1 (Eq. 7). The target network
    theta- is an EMA of the student, Eq. (8): theta- <- mu theta- + (1 - mu) theta after each update (mu = 0.95,
    the paper's ImageNet 64 and LSUN setting; mu = 0, its CIFAR-10 one, makes it the student itself without
    gradient). d: "l2" (mean squared) or "pseudo-huber"."""

    def __init__(self, diffusion, teacher, teacher_diffusion, target, mu=0.95, n=18, solver="heun", distance="l2",
                 bf16=False):
        self.diffusion, self.teacher, self.teacher_diffusion, self.target = diffusion, teacher, teacher_diffusion, target
        self.mu, self.solver, self.distance, self.bf16 = mu, solver, distance, bf16
        self.timesteps = torch.tensor(cd_timesteps(diffusion, n), device=diffusion.betas.device)

    def draw(self, x0, y):
        n = torch.randint(0, len(self.timesteps) - 1, (x0.shape[0],), device=x0.device)
        return self.timesteps[n + 1], torch.randn_like(x0), n

    def teacher_step(self, x_t, t, t_prev, y):
        """Eq. (6): x^_{t_n} = x_{t_{n+1}} + (t_n - t_{n+1}) Phi(x_{t_{n+1}}, t_{n+1}; phi), Phi Euler (DDIM) or Heun."""
        teacher = lambda x, tt: self.teacher(x, tt, y)
        return heun_step(self.teacher_diffusion, teacher, x_t, t, t_prev, heun=self.solver == "heun")

    def __call__(self, model, x0, y, t, noise, n):
        dev = x0.device
        t_prev = self.timesteps[n]
        x_t = self.diffusion.q_sample(x0, t, noise)
        autocast = torch.autocast(dev.type, torch.bfloat16, enabled=self.bf16 and dev.type == "cuda")
        with torch.no_grad(), autocast:
            x_prev = self.teacher_step(x_t, t, t_prev, y).float()
            target = consistency_function(self.diffusion, lambda x, tt: self.target(x, tt, y), x_prev, t_prev)
        with autocast:
            pred = consistency_function(self.diffusion, lambda x, tt: model(x, tt, y), x_t, t)
        if self.distance == "pseudo-huber":
            return pseudo_huber(pred, target), None
        return ((pred - target) ** 2).flatten(1).mean(1), None

    @torch.no_grad()
    def after_update(self, student):
        """Eq. (8), the target network's EMA of the student."""
        torch._foreach_lerp_(list(self.target.parameters()), list(student.parameters()), 1.0 - self.mu)


class ConsistencyDistillation:
    """Algorithm 2 (CD) as train.py runs it. From an eps- or x0-teacher the first convert_steps updates are the
    conversion (TeacherRegression); at the switch the target network and the EMA restart from the converted
    student, and consistency distillation proper begins, its target network an EMA of the student (Eq. 8) after
    each update. convert_steps is a number of updates, kept in the checkpoint: a resume with another --steps keeps
    the switch where it was."""
    metric = None

    def __init__(self, diffusion, teacher, teacher_diffusion, teacher_diffusion_config, target, convert_steps=0,
                 total_updates=None, mu=0.95, n=18, solver="heun", distance="l2", bf16=False):
        self.diffusion, self.teacher, self.target = diffusion, teacher, target
        self.teacher_diffusion_config, self.convert_steps, self.total_updates = (teacher_diffusion_config,
                                                                                 convert_steps, total_updates)
        self.distill = ConsistencyLoss(diffusion, teacher, teacher_diffusion, target, mu, n, solver, distance, bf16)
        self.convert = TeacherRegression(diffusion, teacher, teacher_diffusion, bf16)
        self.loss = None  # the phase: self.convert or self.distill, set by begin()

    def draw(self, x0, y):
        return self.loss.draw(x0, y)

    def __call__(self, model, x0, y, *draws):
        return self.loss(model, x0, y, *draws)

    def begin(self, step, model, ema, optimizer):
        """Before update step + 1: the conversion runs, or distillation begins (at the switch, the target network
        and the EMA from the converted student); -> a line for the log when the phase is new, or None."""
        if step < self.convert_steps:
            if self.loss is self.convert:
                return None
            self.loss = self.convert
            return f"steps 0-{self.convert_steps}: the v-student regresses onto the teacher's own x0 predictions"
        if self.loss is self.distill:
            return None
        if step == self.convert_steps > 0:
            self.target.load_state_dict(model.state_dict())
            ema.load_state_dict(model.state_dict())
        self.loss = self.distill
        return f"steps {step}-{self.total_updates}: consistency distillation"

    def after_update(self, model):
        if self.loss is self.distill:
            self.distill.after_update(model)

    def learning_rate(self, step, lr):
        return lr

    def state(self, diffusion_config):
        return dict(teacher=self.teacher.state_dict(), teacher_config=self.teacher.config,
                    teacher_diffusion_config=self.teacher_diffusion_config, target=self.target.state_dict(),
                    convert_steps=self.convert_steps, sampling=dict(sampler="consistency", steps=1))

    def sample(self, model, shape, generator):
        """The student's own sampler: one step."""
        return consistency_sample(self.diffusion, model, shape, generator=generator, clip=self.clip)

    @property
    def clip(self):
        """Whether x0 is clipped to [-1, 1], in the conversion's target and in sampling (not for latents)."""
        return self.convert.clip

    @clip.setter
    def clip(self, value):
        self.convert.clip = value


def consistency_levels(diffusion, steps, last=0.821):
    """Where multistep sampling adds noise back: the first step from T - 1, then noise levels falling geometrically
    to `last` (Consistency Models' searched CIFAR-10 value for two steps, 0.821), each at the index of nearest noise
    level. For steps = 1 just T - 1."""
    T = diffusion.num_timesteps
    top = noise_level(diffusion, T - 1).item()
    wanted = [top * (last / top) ** (k / (steps - 1)) for k in range(1, steps)] if steps > 1 else []
    return [T - 1] + nearest_indices(diffusion, wanted)


@torch.no_grad()
def consistency_sample(diffusion, model, shape, steps=1, noise=None, generator=None, callback=None, last=0.821,
                       clip_between=False, clip=True):
    """Algorithm 1 (multistep consistency sampling): x <- f(x_T, T); then for each later time tau,
    x^ = x + sqrt(tau^2 - t_min^2) z and x <- f(x^, tau) (in Consistency Models' coordinates, tau a noise level; each
    x^ is handed to the network as alpha_tau x^). One step is f(x_T, T) alone; `last`: see consistency_levels.
    clip_between: each f clipped to [-1, 1] before noise is added back, as the reference code's denoiser does.
    Returns x_0 clipped to [-1, 1] (clip=False: not, for latents)."""
    device = diffusion.betas.device
    indices = consistency_levels(diffusion, steps, last)
    x_t = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    level_min = noise_level(diffusion, 0)
    x = None
    for i in indices:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        if x is not None:  # back to the noise level of index i: x^ = x + sqrt(tau^2 - t_min^2) z, then times alpha
            z = torch.randn(shape, generator=generator, device=device)
            alpha, _ = alpha_sigma(diffusion, i)
            x_t = (x + (noise_level(diffusion, i) ** 2 - level_min ** 2).sqrt() * z) * alpha
        x = consistency_function(diffusion, model, x_t, t)
        x = x.clamp(-1, 1) if clip_between and clip else x
        if callback is not None:
            callback(i, x_t, x)
    return x.clamp(-1, 1) if clip else x
