"""
Tests of cascade.py (cascaded diffusion, Ho et al. 2021): the resampling pair, Gaussian conditioning augmentation
against the moments of q and its levels as trained, the super-resolution model against the plain U-Net it extends,
the cascade's stage against the plain sampler; then train.py --low-res and sample.py --upsample / --low-res end to
end on tiny nets.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from cascade import Stage, SuperResolution, augment, conditioned, downsample, project, upsample, upsample_stage
from checkpoint import build_diffusion, load_checkpoint, save_checkpoint
from conftest import FAST, TINY_DIFFUSION, TINY_NET, TRAIN_TINY, assert_one_line_error, randomized, read_npz, run_script
from data import make_shapes
from imagefiles import write_npz
from samplers import sample_loop
from unet import UNet


def test_resampling_pair():
    """Area downsampling is the mean of each block; nearest upsampling repeats each pixel; downsampling undoes
    upsampling, to float rounding (the super-resolution input, downsampled back, is the low-resolution image)."""
    x = torch.randn(2, 3, 8, 8)
    for size, k in ((4, 2), (2, 4)):  # at 2x bilinear happens to be the block mean too; at 4x it is not
        assert torch.allclose(downsample(x, size), x.unfold(2, k, k).unfold(3, k, k).mean((-1, -2)))
    assert torch.equal(upsample(x, 16), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(downsample(upsample(x, 16), 8), x)
    assert torch.allclose(downsample(upsample(x, 32), 8), x, atol=1e-6, rtol=0)


def test_conditioning_augmentation_is_q():
    """s = -1 (none): the condition is up(x_lr) itself, bit for bit. s >= 0: c~ = q_sample(c, s), whose moments
    over many draws are those of q(x_s | c): mean sqrt(abar_s) c, variance 1 - abar_s (Monte Carlo, 6 standard
    errors)."""
    d = build_diffusion(TINY_DIFFUSION)
    c = torch.rand(1, 3, 4, 4) * 2 - 1
    n = 20000
    assert torch.equal(augment(d, c, torch.tensor([-1]), torch.randn(1, 3, 4, 4)), c)
    for s in (0, 30, 99):
        g = torch.Generator().manual_seed(s)
        draws = augment(d, c.expand(n, -1, -1, -1), torch.full((n,), s), torch.randn(n, 3, 4, 4, generator=g))
        abar = d.alphas_cumprod[s]
        se = (1 - abar).sqrt() / n ** 0.5
        assert (draws.mean(0) - abar.sqrt() * c[0]).abs().max() < 6 * se + 1e-6
        assert (draws.var(0) - (1 - abar)).abs().max() < 6 * (1 - abar) * (2 / n) ** 0.5 + 1e-6


def test_the_training_condition_is_the_batch_downsampled_and_augmented_with_its_own_noise():
    """SuperResolutionLoss: the model is handed x_t of the batch and c~ = q_sample(up(down(x_0)), s, aug_noise),
    the augmentation noise drawn apart from the diffusion's (the two are independent in CDM's Sec. 3.2), and s."""
    from cascade import SuperResolutionLoss
    d = build_diffusion(TINY_DIFFUSION)
    loss = SuperResolutionLoss(d, low_res=4, max_aug=50)
    x0 = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(1)
    t, noise, s, aug_noise = loss.draw(x0, None)
    assert not torch.equal(noise, aug_noise) and s.min() >= -1 and s.max() < 50
    seen = {}
    def model(x, tt, cond, level):
        seen.update(x=x, cond=cond, level=level)
        return torch.zeros_like(x)
    loss(model, x0, None, t, noise, s, aug_noise)
    assert torch.equal(seen["cond"], augment(d, upsample(downsample(x0, 4), 8), s, aug_noise))
    assert torch.equal(seen["x"], d.q_sample(x0, t, noise)) and torch.equal(seen["level"], s)


def test_training_draws_no_augmentation_and_every_level_uniformly():
    """CDM's conditioning augmentation as trained (SuperResolutionLoss.draw): s uniform over none (-1, what a cascade
    stage samples with by default) and 0, ..., max_aug - 1, and t uniform over the T steps (Algorithm 1). Over
    51,000 draws with max_aug = 50 each of the 51 levels and each of the T timesteps comes up, every count within 6
    standard errors of its binomial mean."""
    from cascade import SuperResolutionLoss
    d = build_diffusion(TINY_DIFFUSION)
    loss, n = SuperResolutionLoss(d, low_res=4, max_aug=50), 51_000
    torch.manual_seed(0)
    t, _, s, _ = loss.draw(torch.zeros(n, 1, 1, 1), None)
    assert Stage(net=None, diffusion=d, size=8).cond_aug == -1
    for draws, values in ((s + 1, 51), (t, d.num_timesteps)):
        assert draws.min() >= 0 and draws.max() < values
        counts, p = torch.bincount(draws, minlength=values).double(), 1 / values
        assert (counts - n * p).abs().max() < 6 * (n * p * (1 - p)) ** 0.5, counts


def test_zero_conditioning_weights_compute_the_unconditional_network():
    """A super-resolution model whose weights on the condition (the input convolution's extra channels) and on the
    augmentation level (its embedding's last layer) are zero computes the plain U-Net with the remaining weights."""
    sr = randomized(SuperResolution(low_res=4, **TINY_NET))
    plain = UNet(**TINY_NET)
    with torch.no_grad():
        sr.unet.conv_in.weight[:, 3:] = 0
        for p in sr.aug[1].parameters():
            p.zero_()
        state = {k: v for k, v in sr.unet.state_dict().items()}
        state["conv_in.weight"] = state["conv_in.weight"][:, :3]
        plain.load_state_dict(state)
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 70])
        out = sr(x, t, torch.randn(2, 3, 8, 8), torch.tensor([-1, 50]))
        torch.testing.assert_close(out, plain.eval()(x, t), atol=1e-5, rtol=1e-5)


def test_a_cascade_stage_is_the_plain_sampler_on_the_conditioned_model():
    """cascade.upsample_stage = the augmentation noise drawn first, then sample_loop on conditioned(model, c~, s),
    with the same generator: the cascade adds nothing else."""
    d = build_diffusion(TINY_DIFFUSION)
    sr = randomized(SuperResolution(low_res=4, **TINY_NET))
    x_lr = torch.rand(2, 3, 4, 4) * 2 - 1
    stage = Stage(net=sr, diffusion=d, size=8, sampler="ddim", steps=5, eta=None, spacing="trailing", cond_aug=20)
    with torch.no_grad():
        ours = upsample_stage(stage, x_lr, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        s = torch.full((2,), 20)
        cond = augment(d, upsample(x_lr, 8), s, torch.randn(2, 3, 8, 8, generator=g))
        plain = sample_loop(d, conditioned(sr, cond, s), (2, 3, 8, 8), "ddim", 5, generator=g)
    assert torch.equal(ours, plain)


@FAST
@given(st.sampled_from([2, 4]), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_projection_is_the_range_null_space_decomposition_with_the_pseudo_inverse(k, channels, seed):
    """Where nothing reaches the bounds, cascade.project is DDNM's formula built from matrices: A the area
    downsampling written out as a matrix, A^+ = torch.linalg.pinv(A) (not assumed to be nearest upsampling),
    x0 <- A^+ y + (I - A^+ A) x0. The result is consistent (A x = y), projecting twice changes nothing, and the detail
    x0 - A^+ A x0 is kept."""
    g = torch.Generator().manual_seed(seed)
    n = 8 // k
    offset = 3 * torch.rand(1, generator=g, dtype=torch.float64)  # where the image sits; its detail stays small
    x0 = torch.rand(2, channels, 8, 8, generator=g, dtype=torch.float64) * 0.4 - 0.2 + offset
    y = torch.rand(2, channels, n, n, generator=g, dtype=torch.float64) - 0.5
    A = torch.stack([downsample(e.view(1, 1, 8, 8), n).flatten() for e in torch.eye(64, dtype=torch.float64)], 1)
    A_pinv = torch.linalg.pinv(A)
    flat = x0.reshape(-1, 64).T
    ddnm = (A_pinv @ y.reshape(-1, n * n).T + (torch.eye(64, dtype=torch.float64) - A_pinv @ A) @ flat).T
    ours = project(x0, y)
    torch.testing.assert_close(ours, ddnm.reshape(x0.shape), atol=1e-10, rtol=0)
    torch.testing.assert_close(downsample(ours, n), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(project(ours, y), ours, atol=1e-10, rtol=0)
    detail = lambda x: x - upsample(downsample(x, n), 8)
    torch.testing.assert_close(detail(ours), detail(x0), atol=1e-10, rtol=0)


@FAST
@given(st.sampled_from([2, 4]), st.floats(0.1, 3), st.integers(0, 2**31 - 1))
def test_projection_within_the_bounds_is_the_nearest_consistent_image(k, spread, seed):
    """Where pixels reach the bounds, project(x0, y) is the nearest image in [-1, 1] with area downsampling y: it
    lies in the box, is consistent, and meets the KKT conditions of that convex problem, which make it the nearest:
    x - x0 is one constant c a block on the pixels strictly inside (-1, 1), with x0 + c >= 1 where x = 1 and
    x0 + c <= -1 where x = -1."""
    g = torch.Generator().manual_seed(seed)
    n = 8 // k
    x0 = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) * spread
    y = torch.rand(3, 3, n, n, generator=g, dtype=torch.float64) * 1.8 - 0.9
    x = project(x0, y)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(downsample(x, n), y, atol=1e-9, rtol=0)
    per_block = lambda v: v.unfold(2, k, k).unfold(3, k, k).reshape(-1, k * k)  # one row a block
    xb, zb = per_block(x), per_block(x0)
    for row, z in zip(xb, zb):
        top, bottom = row >= 1 - 1e-9, row <= -1 + 1e-9
        free = ~top & ~bottom
        # the constants c the clipped pixels allow: x0 + c >= 1 on top, x0 + c <= -1 on the bottom
        c_min = (1 - z[top]).max() if top.any() else -float("inf")
        c_max = (-1 - z[bottom]).min() if bottom.any() else float("inf")
        if free.any():
            c = (row - z)[free]
            assert (c - c[0]).abs().max() < 1e-8
            c_min, c_max = max(c_min, c[0] - 1e-8), min(c_max, c[0] + 1e-8)
        assert c_min <= c_max + 1e-8


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, None), ("ddpm", 20, None), ("ddim", 10, None),
                                                ("dpm++", 10, None), ("dpm++", 10, 1.0), ("restart", 10, None)])
def test_a_projected_stage_is_consistent_with_its_input_whatever_the_network(mean_type, sampler, steps, eta):
    """Stage(project=True): every sampler's output, area-downsampled, is its low-resolution input, even for a
    network that ignores its condition (random weights), Algorithm 2's full chain included; the same stage without
    the projection is far from it."""
    d = build_diffusion(dict(TINY_DIFFUSION, mean_type=mean_type))
    sr = randomized(SuperResolution(low_res=4, **TINY_NET))
    x_lr = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    rmse = {}
    for on in (False, True):
        stage = Stage(net=sr, diffusion=d, size=8, sampler=sampler, steps=steps, eta=eta, project=on)
        with torch.no_grad():
            out = upsample_stage(stage, x_lr, torch.Generator().manual_seed(1))
        rmse[on] = ((downsample(out, 4) - x_lr) * 127.5).square().mean().sqrt().item()
    assert rmse[True] < 0.01 and rmse[False] > 10, rmse


def test_a_cascade_stage_runs_its_network_in_bf16_when_asked():
    """Stage(bf16=True), what sample.py --bf16 builds: the super-resolution network runs under bf16 autocast, as
    every other network does through guidance.model_fn, and the sampler's math and output stay fp32."""
    d = build_diffusion(TINY_DIFFUSION)
    sr = randomized(SuperResolution(low_res=4, **TINY_NET))
    seen = []
    sr.unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.no_grad():
        out = upsample_stage(Stage(sr, d, 8, "ddim", 2, bf16=True), torch.rand(2, 3, 4, 4) * 2 - 1,
                             torch.Generator().manual_seed(0))
    assert seen == [torch.bfloat16] * 2 and out.dtype == torch.float32


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    """A tiny base model on 8x8 shapes and a super-resolution model 8 -> 16 on 16x16 shapes, trained by train.py."""
    out = tmp_path_factory.mktemp("cascade")
    r = run_script("train.py", *TRAIN_TINY, "--steps", "2", "--sample-every", "0", "--out", out / "base")
    assert r.returncode == 0, r.stderr
    tiny16 = [a if a != "8" else "16" for a in TRAIN_TINY]
    r = run_script("train.py", *tiny16, "--low-res", "8", "--cond-aug-max", "20", "--steps", "2", "--sample-every",
                   "2", "--sample-steps", "2", "--out", out / "sr")
    assert r.returncode == 0, r.stderr
    return out


def test_super_resolution_training_and_the_cascade(cascade, tmp_path):
    """train.py --low-res 8 on 16x16 data records the stage; sample.py BASE --upsample SR draws 8x8 samples and carries
    them to 16x16 (the .npz holds the final size); sample.py SR --low-res IMAGES upsamples given images."""
    ckpt = load_checkpoint(str(cascade / "sr"))
    assert ckpt["kind"] == "sr" and ckpt["model_config"]["low_res"] == 8 and ckpt["cond_aug_max"] == 20
    assert (cascade / "sr" / "samples_0000002.png").exists()
    r = run_script("sample.py", cascade / "base", "--upsample", cascade / "sr", "--n", "3", "--steps", "3",
                   "--upsample-steps", "4", "--cond-aug", "5", "--device", "cpu", "--npz", tmp_path / "c.npz",
                   "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    assert "then up to 16x16 by ddpm in 4 steps, augmentation 5" in r.stdout  # augmented: not projected
    assert "cascade: the output area-downsampled to its input's size differs from it by RMSE" in r.stdout
    assert read_npz(tmp_path / "c.npz")["arr_0"].shape == (3, 16, 16, 3)
    for flags, projected in (([], True), (["--no-project"], False)):
        r = run_script("sample.py", cascade / "base", "--upsample", cascade / "sr", "--n", "3", "--steps", "3",
                       "--upsample-steps", "4", *flags, "--device", "cpu", "--out", tmp_path / "p.png")
        assert r.returncode == 0, r.stderr
        assert ("4 steps, projected, augmentation none" in r.stdout) == projected, r.stdout
        assert ("differs from it by RMSE 0.00 levels" in r.stdout) == projected, r.stdout  # CDM's: as trained
    write_npz(str(tmp_path / "low.npz"), {"arr_0": make_shapes(5, 8, 3, seed=2)[0]})
    r = run_script("sample.py", cascade / "sr", "--low-res", tmp_path / "low.npz", "--steps", "3", "--cond-aug", "none",
                   "--device", "cpu", "--npz", tmp_path / "up.npz", "--out", tmp_path / "up.png")
    assert r.returncode == 0, r.stderr
    assert read_npz(tmp_path / "up.npz")["arr_0"].shape == (5, 16, 16, 3)


def test_no_ema_reaches_every_stage_of_a_cascade(cascade, tmp_path):
    """sample.py BASE --upsample SR --no-ema takes the stage's raw weights too: a copy of the stage whose EMA is
    noise samples the same images bit for bit (with the EMA it would not)."""
    ckpt = load_checkpoint(str(cascade / "sr"))
    g = torch.Generator().manual_seed(0)
    ckpt["ema"] = {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in ckpt["ema"].items()}
    (tmp_path / "noisy").mkdir()
    save_checkpoint(str(tmp_path / "noisy" / "ckpt.pt"), ckpt)
    for name, stage in (("a", cascade / "sr"), ("b", tmp_path / "noisy")):
        r = run_script("sample.py", cascade / "base", "--upsample", stage, "--n", "2", "--steps", "3",
                       "--upsample-steps", "3", "--no-ema", "--device", "cpu", "--npz", tmp_path / f"{name}.npz",
                       "--out", tmp_path / f"{name}.png")
        assert r.returncode == 0, r.stderr
    assert torch.equal(read_npz(tmp_path / "a.npz")["arr_0"], read_npz(tmp_path / "b.npz")["arr_0"])


def test_cascade_bad_combinations(cascade, tmp_path):
    """One clear line each: a super-resolution checkpoint as the base (no --low-res), stages whose sizes do not
    chain, a base model as a stage, --low-res images of the wrong size, an augmentation level or a stage's steps
    outside its T."""
    write_npz(str(tmp_path / "low16.npz"), {"arr_0": make_shapes(2, 16, 3, seed=2)[0]})
    cases = [([cascade / "sr"], "is a super-resolution model"),
             ([cascade / "base", "--upsample", cascade / "sr", "--upsample", cascade / "sr"], "does not chain"),
             ([cascade / "base", "--upsample", cascade / "base"], "is not a super-resolution model"),
             ([cascade / "sr", "--low-res", tmp_path / "low16.npz"], "does not chain"),
             ([cascade / "base", "--upsample", cascade / "sr", "--cond-aug", "500"], "--cond-aug must be none or 0..49"),
             ([cascade / "base", "--upsample", cascade / "sr", "--upsample-steps", "0"], "--upsample-steps 1..50")]
    for argv, expect in cases:
        r = run_script("sample.py", *argv, "--device", "cpu", "--out", tmp_path / "g.png")
        assert expect in assert_one_line_error(r), argv
