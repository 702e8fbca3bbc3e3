"""Tests of the routes to high resolution beside the cascade: latent diffusion's first stage (autoencoder.py: its KL
against the closed form and Monte Carlo, the scale factor's unit variance) and a latent model end to end (train.py
--autoencoder, --latent, a student of a latent teacher, sample.py with every sampler); simple diffusion's shifted
schedule (its log-SNR moved by exactly 2 log(base / d)) and multiscale loss (highres.py; eps-, x0- and v-networks,
each through the eps it implies); bad input one line each."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import export
from autoencoder import Autoencoder, DiagonalGaussian, FirstStage, latent_scale
from checkpoint import build_diffusion, load_checkpoint
from conftest import (FAST, TRAIN_TINY, assert_one_line_error, in_process, one_line_error, randomized, read_npz,
                      run_script)
from data import make_shapes
from ddpm import GaussianDiffusion, make_beta_schedule
from highres import MultiscaleLoss, logsnr, shift_for, shifted_cosine_betas
from imagefiles import from_uint8

# ---- the first stage


@FAST
@given(st.floats(-3, 3), st.floats(-4, 2), st.integers(0, 2**31 - 1))
def test_kl_is_the_closed_form_and_its_monte_carlo_estimate(mean, logvar, seed):
    """KL(q || N(0, I)) = 0.5 sum(mean^2 + var - 1 - log var), summed over the latent: torch.distributions' closed
    form, and E_q[log q(z) - log p(z)] over 200,000 draws (6 standard errors)."""
    g = torch.Generator().manual_seed(seed)
    m = mean + 0.3 * torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    lv = logvar + 0.3 * torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    q = DiagonalGaussian(torch.cat([m, lv], dim=1))
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                               torch.distributions.Normal(0.0, 1.0)).sum()
    assert torch.allclose(q.kl()[0], closed, rtol=1e-10)
    z = q.sample(torch.randn(200_000, 2, 2, 2, generator=g, dtype=torch.float64))
    log_ratio = (torch.distributions.Normal(m, (0.5 * lv).exp()).log_prob(z)
                 - torch.distributions.Normal(0.0, 1.0).log_prob(z)).flatten(1).sum(1)
    assert abs(log_ratio.mean() - closed) < 6 * log_ratio.std() / 200_000 ** 0.5 + 1e-6


def test_the_scale_factor_gives_latents_of_unit_variance():
    """latent_scale is 1 / std of the latents of the given images: scaled, a fresh draw of them has std 1 (the
    diffusion model's data variance), whatever the autoencoder's own latent scale."""
    ae = randomized(Autoencoder(image_size=8, latent_channels=2, ch=32, ch_mult=(1, 2), num_res_blocks=1))
    with torch.no_grad():  # latents far from unit variance, so the factor has something to do
        ae.encoder[-1].weight[:2].mul_(5)
    x = from_uint8(make_shapes(512, 8, 3, seed=3)[0])
    scale = latent_scale(ae, x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = ae.encode(x)
        z = q.sample(torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(1))) * scale
    assert z.shape == (512, 2, 4, 4) and abs(z.std().item() - 1) < 0.02 and abs(scale - 1) > 0.05


def test_the_decoders_last_norm_keeps_each_images_mean_colour():
    """GroupNorm is blind to a constant added to every channel of a group. At ch 32, the reference's 32 groups are
    one channel each, so the decoder's last norm, swish, conv would give the same image for features shifted by any
    per-channel constant: the image's mean colour could not pass. With groups of 4 channels (train.py's default) it
    passes; a checkpoint's config from before group_channels builds the 32 groups it was trained with."""
    from torch import nn
    new = randomized(Autoencoder(image_size=8, latent_channels=2, ch=32, ch_mult=(1, 2), group_channels=4))
    old = Autoencoder(**{k: v for k, v in new.config.items() if k != "group_channels"})
    old.load_state_dict(new.state_dict())
    h, offset = torch.randn(2, 32, 8, 8), torch.randn(1, 32, 1, 1)
    with torch.no_grad():
        moved = [(ae.decoder[-3:](h + offset) - ae.decoder[-3:](h)).abs().max().item() for ae in (new, old)]
    assert moved[0] > 0.05 and moved[1] < 1e-4
    assert {m.num_channels // m.num_groups for m in new.modules() if isinstance(m, nn.GroupNorm)} == {4}
    assert {m.num_groups for m in old.modules() if isinstance(m, nn.GroupNorm)} == {32}


@pytest.mark.parametrize("flip", [True, False])
def test_cached_latents_are_the_draws_of_encoding_every_batch(flip):
    """A latent run encodes its images once (training.Batches): each batch is then z = mean + std eps with the
    mean and std of q_E(z | x) of the batch's images as they are drawn (mirrored or not), and the same random
    numbers in the same order as encoding the pixel batch afresh (what the run did before, and resume relies on)."""
    from training import Batches
    stage = FirstStage(randomized(Autoencoder(image_size=8, latent_channels=2, ch=32, ch_mult=(1, 2),
                                              num_res_blocks=1)), 0.7)
    images = make_shapes(40, 8, 3, seed=5)[0]
    images[:, :, :4] //= 3  # no image is its own mirror image, so a wrong flip shows
    cached, pixels = Batches(images, None, 8, 1, flip, stage, chunk=16), Batches(images, None, 8, 1, flip)
    for step in range(7):  # across an epoch's end
        torch.manual_seed(step)
        z, _ = cached(step)
        torch.manual_seed(step)
        with torch.no_grad():
            q = stage.autoencoder.encode(pixels(step)[0])
            want = q.sample(torch.randn(q.mean.shape)) * 0.7
        assert z.shape == (8, 2, 4, 4) and torch.allclose(z, want, atol=1e-5)


# ---- simple diffusion


@FAST
@given(st.integers(10, 1000), st.sampled_from([8, 16, 32, 64]), st.sampled_from([8, 16, 32, 64, 128, 256]))
def test_the_shifted_schedule_moves_log_snr_by_2_log_base_over_d(T, base, d):
    """Eq. (5): the shifted cosine schedule's log-SNR is the cosine's plus 2 log(base / d) at every t where neither
    beta is clipped at 0.999, and the shift is 0 (the cosine itself) at d = base."""
    cosine, shifted = make_beta_schedule("cosine", T), shifted_cosine_betas(T, shift_for(base, d))
    free = (torch.cumprod(1 - shifted, 0) > 1e-6) & (shifted < 0.999) & (cosine < 0.999)
    free = torch.cummin(free.long(), 0).values.bool()  # the steps before the first clipped one
    assert free[: T // 2].all()  # (so the check below sees most of the chain, not nothing)
    diff = (logsnr(shifted) - logsnr(cosine))[free]
    assert torch.allclose(diff, torch.full_like(diff, 2 * math.log(base / d)), atol=1e-6)
    if base == d:
        assert torch.allclose(shifted, cosine, atol=1e-12)


def test_multiscale_loss_is_the_pooled_eps_error_weighted_one_over_resolution():
    """Sec. 3.2: zero for a network whose eps_hat is the true eps; otherwise sum over s = base, 2 base, ..., d of
    (1/s) times the mean squared error of the eps errors average-pooled to s x s (by hand here, for d = 16, base 4)."""
    d = GaussianDiffusion(make_beta_schedule("linear", 50, 1e-3, 0.2), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([5, 40])
    loss = MultiscaleLoss(d, 4)
    exact = lambda x, tt: d.predict_noise_from_start(x, tt, x0)
    assert torch.allclose(loss(exact, x0, t, noise), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    off = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    error = -off  # eps - eps_hat
    pool = lambda x, s: x.unfold(2, 16 // s, 16 // s).unfold(3, 16 // s, 16 // s).mean((-1, -2))
    by_hand = sum((pool(error, s) ** 2).flatten(1).mean(1) / s for s in (4, 8)) + (error ** 2).flatten(1).mean(1) / 16
    assert torch.allclose(loss(lambda x, tt: exact(x, tt) + off, x0, t, noise), by_hand)

@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_multiscale_loss_reads_an_x0_or_v_network_through_the_eps_it_implies(mean_type):
    """Sec. 3.2's loss is on eps_hat, what the network's prediction implies, not on its raw output: an x0- or
    v-network that predicts exactly (x_0, or v = alpha eps - sigma x_0) has zero loss, and one off by `off` has the
    eps error of its prediction, eps - eps_hat = (alpha / sigma) off for x0 (eps_hat = (x_t - alpha x0_hat) / sigma,
    DDPM Eq. 15 solved for eps) and -alpha off for v (eps_hat = sigma x_t + alpha v_hat), pooled and weighted
    1/s as for eps (by hand, d = 16, base 4). Reading the output as eps fails both."""
    betas = make_beta_schedule("linear", 50, 1e-3, 0.2)
    d = GaussianDiffusion(betas, mean_type=mean_type, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, noise, off = (torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([5, 40])
    abar = torch.cumprod(1 - betas.double(), 0)[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    truth = x0 if mean_type == "x0" else alpha * noise - sigma * x0
    loss = MultiscaleLoss(d, 4)
    assert torch.allclose(loss(lambda x, tt: truth, x0, t, noise), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    error = alpha / sigma * off if mean_type == "x0" else -alpha * off
    pool = lambda x, s: x.unfold(2, 16 // s, 16 // s).unfold(3, 16 // s, 16 // s).mean((-1, -2))
    by_hand = sum((pool(error, s) ** 2).flatten(1).mean(1) / s for s in (4, 8)) + (error ** 2).flatten(1).mean(1) / 16
    assert torch.allclose(loss(lambda x, tt: truth + off, x0, t, noise), by_hand)

# ---- latent diffusion, end to end


LATENT_TINY = ["--ch", "32", "--ch-mult", "1", "--num-res-blocks", "1", "--attn", "", "--timesteps", "50",
               "--batch-size", "8", "--warmup", "2", "--ema-decay", "0.9", "--device", "cpu", "--sample-every", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny autoencoder (8x8 shapes to 4x4x2 latents) and a tiny latent diffusion model on its latents."""
    out = tmp_path_factory.mktemp("latent")
    r = run_script("train.py", *TRAIN_TINY, "--autoencoder", "--downsample", "2", "--latent-channels", "2",
                   "--steps", "3", "--sample-every", "3", "--out", out / "ae")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data", "shapes", "--image-size", "8", *LATENT_TINY, "--latent", out / "ae",
                   "--steps", "3", "--sample-every", "3", "--sample-steps", "3", "--out", out / "ldm")
    assert r.returncode == 0, r.stderr
    return out


def test_a_latent_model_trains_records_its_first_stage_and_samples_with_every_sampler(runs, tmp_path):
    """train.py --latent AE: the checkpoint holds the autoencoder and the scale factor; sample.py draws 4x4x2
    latents with Algorithm 2, DDIM and DPM-Solver++, decodes them, and writes 8x8x3 images (uint8, the .npz and the
    grid); its training grids are decoded too."""
    ae, ldm = load_checkpoint(str(runs / "ae")), load_checkpoint(str(runs / "ldm"))
    assert ae["kind"] == "autoencoder" and ldm["kind"] == "diffusion" and ldm["model_config"]["image_size"] == 4
    assert ldm["first_stage_config"] == ae["model_config"] and ldm["scale_factor"] > 0
    assert ae["model_config"]["group_channels"] == ldm["model_config"]["group_channels"] == 4
    assert all(torch.equal(ldm["first_stage"][k], ae["ema"][k]) for k in ae["ema"])
    assert (runs / "ae" / "samples_0000003.png").exists() and (runs / "ldm" / "samples_0000003.png").exists()
    for sampler, steps, eta in (("ddpm", 50, []), ("ddim", 5, []), ("dpm++", 5, []), ("dpm++", 5, ["--eta", "1"]),
                                ("restart", 6, [])):
        r = run_script("sample.py", runs / "ldm", "-n", "3", "--sampler", sampler, "--steps", steps, *eta, "--device",
                       "cpu", "--npz", tmp_path / f"{sampler}.npz", "--out", tmp_path / f"{sampler}.png")
        assert r.returncode == 0 and "latents of a 2x autoencoder" in r.stdout, r.stdout + r.stderr
        images = read_npz(tmp_path / f"{sampler}.npz")["arr_0"]
        assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8 and images.float().std() > 0


def test_the_first_stage_scales_one_way_and_latent_samples_are_not_clipped(runs, tmp_path):
    """FirstStage.encode is the scale times a draw from q_E and decode divides it out before D, so D(mean) through
    the stage is the autoencoder's own reconstruction; and a latent model's x0_hat is not clipped to [-1, 1]
    (unit-variance latents lie outside it a third of the time): its samples are those of --no-clip."""
    ae = randomized(Autoencoder(image_size=8, latent_channels=2, ch=32, ch_mult=(1, 2)))
    stage, x = FirstStage(ae, 2.5), torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(0)
    z = stage.encode(x)
    torch.manual_seed(0)
    q = ae.encode(x)
    assert torch.allclose(z, q.sample(torch.randn_like(q.mean)) * 2.5)
    with torch.no_grad():
        assert torch.allclose(stage.decode(q.mean * 2.5), ae(x), atol=1e-6)
    for extra in ([], ["--no-clip"]):
        r = run_script("sample.py", runs / "ldm", "-n", "3", "--sampler", "ddim", "--steps", "5", "--device", "cpu",
                       "--npz", tmp_path / f"s{len(extra)}.npz", "--out", tmp_path / "s.png", *extra)
        assert r.returncode == 0, r.stderr
    assert torch.equal(read_npz(tmp_path / "s0.npz")["arr_0"], read_npz(tmp_path / "s1.npz")["arr_0"])


def test_the_first_stage_keeps_no_average_by_default(tmp_path):
    """An --autoencoder run without --ema-decay keeps no EMA, as the reference's first stage is trained (its saved
    "ema" weights are the trained ones, which a latent run then encodes with); a diffusion run keeps the paper's
    0.9999, and an explicit --ema-decay is honoured by both."""
    tiny = [a for a in TRAIN_TINY if a not in ("--ema-decay", "0.9")]
    for name, extra, decay in (("ae", ["--autoencoder"], 0.0), ("ae-ema", ["--autoencoder", "--ema-decay", "0.9"], 0.9),
                               ("ddpm", [], 0.9999)):
        r = run_script("train.py", *tiny, *extra, "--steps", "3", "--sample-every", "0", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        ckpt = load_checkpoint(str(tmp_path / name))
        same = all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
        assert ckpt["args"]["ema_decay"] == decay and same == (decay == 0), name


def test_a_latent_run_resumes_exactly(runs, tmp_path):
    """Stopped (SIGTERM) in update 2 and resumed, a latent run ends where an uninterrupted one does: its latents,
    encoded again at the restart, are drawn from the restored random state."""
    common = ["--data", "shapes", "--image-size", "8", *LATENT_TINY, "--latent", str(runs / "ae"), "--steps", "4"]
    r = run_script("train.py", *common, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    with pytest.raises(SystemExit) as stopped:
        in_process(common + ["--out", str(tmp_path / "b")], stop_after=2)
    assert stopped.value.code == 0 and load_checkpoint(str(tmp_path / "b"))["step"] == 2
    r = run_script("train.py", "--resume", tmp_path / "b")
    assert r.returncode == 0 and "resuming at step 2" in r.stdout, r.stderr
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key


def test_a_caption_model_on_latents_resumes_exactly_and_samples_a_caption(runs, tmp_path):
    """--latent AE --caption-cond (latent diffusion's text-to-image form, cross-attention at the latents' 4x4):
    stopped in update 2 and resumed, it ends where an uninterrupted run does (its captions and dropped captions
    drawn from the restored state); sample.py --caption draws guided latents and decodes them to images, one row
    of the .npz's arr_1 per caption."""
    common = ["--data", "captions", "--image-size", "8", *LATENT_TINY, "--attn", "4", "--caption-cond", "--latent",
              str(runs / "ae"), "--steps", "4"]
    r = run_script("train.py", *common, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    with pytest.raises(SystemExit) as stopped:
        in_process(common + ["--out", str(tmp_path / "b")], stop_after=2)
    assert stopped.value.code == 0
    assert run_script("train.py", "--resume", tmp_path / "b").returncode == 0
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert len(a["model_config"]["captions"]) == 16 and any("cross" in name for name in a["model"])
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    r = run_script("sample.py", tmp_path / "a", "-n", "4", "--caption", "red disk", "--caption", "blue cross",
                   "--guidance", "2", "--sampler", "ddim", "--steps", "3", "--device", "cpu", "--npz",
                   tmp_path / "s.npz", "--out", tmp_path / "s.png")
    assert r.returncode == 0, r.stdout + r.stderr
    arrays = read_npz(tmp_path / "s.npz")
    assert arrays["arr_0"].shape == (4, 8, 8, 3) and arrays["arr_1"].tolist() == [0, 0, 1, 1]


def test_a_student_of_a_latent_teacher_learns_its_latents(runs, tmp_path):
    """Progressive distillation from a latent teacher: the student's checkpoint keeps the teacher's first stage, and
    sample.py decodes the student's 2-step samples to images."""
    r = run_script("train.py", "--distill", "progressive", "--teacher", runs / "ldm", "--teacher-steps", "4",
                   "--student-steps", "2", "--data", "shapes", "--image-size", "8", *LATENT_TINY, "--steps", "2",
                   "--out", tmp_path / "pd")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(tmp_path / "pd"))["scale_factor"] == load_checkpoint(str(runs / "ldm"))["scale_factor"]
    r = run_script("sample.py", tmp_path / "pd", "-n", "2", "--device", "cpu", "--npz", tmp_path / "s.npz", "--out",
                   tmp_path / "s.png")
    assert r.returncode == 0 and read_npz(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 3), r.stdout + r.stderr


def test_a_shifted_schedule_is_kept_in_the_checkpoint(tmp_path):
    """--schedule cosine --shift-base 8 on 16x16 data: the checkpoint's diffusion is the cosine shifted by
    2 log(8 / 16), which sample.py builds without being told."""
    tiny16 = [a if a != "8" else "16" for a in TRAIN_TINY]
    r = run_script("train.py", *tiny16, "--schedule", "cosine", "--shift-base", "8", "--steps", "1", "--sample-every",
                   "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    config = load_checkpoint(str(tmp_path / "run"))["diffusion_config"]
    assert config["shift_base"] == 8 and config["logsnr_shift"] == pytest.approx(2 * math.log(0.5))
    assert torch.allclose(build_diffusion(config).betas, shifted_cosine_betas(50, 2 * math.log(0.5)).float())
    assert run_script("sample.py", tmp_path / "run", "-n", "2", "--steps", "3", "--device", "cpu", "--out",
                      tmp_path / "s.png").returncode == 0


def test_bad_latent_input_is_one_line(runs, tmp_path, capsys):
    """A diffusion checkpoint given as the autoencoder, an autoencoder for other images than the data, latents too
    small for the network's attention, a shift without the cosine schedule, a multiscale base that does not fit or a
    run of another kind, an LDM whose autoencoder weights are gone, sampling an autoencoder, a latent model's
    trajectory (latents are no pictures), and a latent model in the sampler bench: one clear line each."""
    import train
    base = ["--data", "shapes", "--image-size", "8", *LATENT_TINY, "--steps", "1", "--out", str(tmp_path / "x")]
    cases = [(["--latent", str(runs / "ldm")], "is a diffusion checkpoint, not an autoencoder"),
             (["--latent", str(runs / "ae"), "--image-size", "16"], "encodes 8x8x3 images; the data are 16x16x3"),
             (["--latent", str(runs / "ae"), "--attn", "8"], "attn_resolutions"),
             (["--shift-base", "8"], "add --schedule cosine"),
             (["--multiscale", "3"], "must be square and base times a power of two"),
             (["--multiscale", "4", "--classifier"], "--multiscale is a diffusion model's loss")]
    for extra, expect in cases:
        assert expect in one_line_error(train.main, [*base, *extra], capsys), extra
    stripped = dict(load_checkpoint(str(runs / "ldm")))
    del stripped["first_stage"]
    torch.save(stripped, tmp_path / "stripped.pt")
    for path, expect, *extra in ((tmp_path / "stripped.pt", "autoencoder weights are missing"),
                                 (runs / "ae", "draws no samples"),
                                 (runs / "ldm", "work on pixels", "--trajectory", tmp_path / "t.png")):
        r = run_script("sample.py", path, "-n", "1", "--device", "cpu", "--out", tmp_path / "g.png", *extra)
        assert expect in assert_one_line_error(r)
    r = run_script("bench_samplers.py", runs / "ldm", "--n", "2", "--nfe", "1", "--device", "cpu")
    assert "measures a diffusion model on pixels" in assert_one_line_error(r)


def test_a_latent_model_does_not_export_as_pixels(runs, tmp_path, capsys):
    """A DDPMPipeline has no decoder and no 1/scale: a latent model exported to it would hand out latents as images
    (and clip them). One line, no folder."""
    assert "is a latent diffusion model" in one_line_error(export.main, [str(runs / "ldm"), "--to-diffusers",
                                                                        str(tmp_path / "d")], capsys)
    assert not (tmp_path / "d").exists()


def test_a_classifier_guides_only_the_latents_it_was_trained_on(runs, tmp_path, capsys):
    """A latent model is guided only by a classifier of its own first stage's latents (the same autoencoder and
    scale factor, both in either checkpoint): one of the same stage guides; a pixel classifier whose images have the
    latents' shape, one of another autoencoder with that latent shape, and one of the same autoencoder at another
    scale factor each get one line."""
    import sample
    from guidance import NoisyClassifier
    ldm = load_checkpoint(str(runs / "ldm"))
    clf = NoisyClassifier(4, **{k: v for k, v in ldm["model_config"].items() if k != "num_classes"})
    stage = {k: ldm[k] for k in ("first_stage", "first_stage_config", "scale_factor")}
    other = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ldm["first_stage"].items()}
    cases = {"same": stage, "pixels": {}, "other autoencoder": dict(stage, first_stage=other),
             "other scale": dict(stage, scale_factor=stage["scale_factor"] * 1.01)}
    for name, first_stage in cases.items():
        torch.save({"model": clf.state_dict(), "ema": clf.state_dict(), "step": 1, "kind": "classifier",
                    "model_config": clf.config, "diffusion_config": ldm["diffusion_config"], "args": {},
                    "format": "ddpm-checkpoint-v1", **first_stage}, tmp_path / f"{name}.pt")
    argv = [str(runs / "ldm"), "-n", "2", "--steps", "2", "--class", "1", "--device", "cpu", "--out"]
    sample.main([*argv, str(tmp_path / "s.png"), "--classifier", str(tmp_path / "same.pt")])
    assert (tmp_path / "s.png").exists()
    for name, expect in [("pixels", "trained on pixels and the model draws latents"),
                         ("other autoencoder", "latents of another autoencoder"),
                         ("other scale", "each run measures its own scale factor")]:
        assert expect in one_line_error(sample.main, [*argv, str(tmp_path / "x.png"), "--classifier",
                                                      str(tmp_path / f"{name}.pt")], capsys), name
