"""Tests for classifier-free guidance (Ho & Salimans 2021) in sample.py: w = 0 is the conditional model, the
guided prediction equals (1 + w) eps(x, c) - w eps(x, null) from one batched pass, no --class means the null label,
and a short CPU run of train.py --class-cond on the built-in shapes gives samples whose class a simple classifier
recognises better with guidance than without, far above what a model ignoring the label could reach."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import metrics
import sample
from checkpoint import build_diffusion
from conftest import (FAST, HERE, TINY_DIFFUSION as DIFFUSION, TINY_NET as TINY, assert_one_line_error, full,
                      randomized, read_npz, run_script, schedules, write_checkpoint)
from data import CIFAR10_CLASSES, make_shapes, parse_classes
from ddpm import GaussianDiffusion, make_beta_schedule
from guidance import (NoisyClassifier, classifier_free_guidance, classifier_grad, classifier_guidance,
                      classifier_guided_eps, model_fn)
from imagefiles import to_uint8
from samplers import ddim_sample, ddim_sample_loop, is_full_chain, sample_loop
from unet import UNet


@FAST
@given(st.floats(-2, 10), st.integers(0, 2**31 - 1))
def test_classifier_free_guidance(w, seed):
    """eps~ = (1+w) eps_c - w eps_u: w = 0 gives the conditional prediction; equal predictions are
    a fixed point; eps~ - eps_u = (1+w)(eps_c - eps_u), extrapolation along the difference."""
    g = torch.Generator().manual_seed(seed)
    c, u = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert torch.equal(classifier_free_guidance(c, u, 0.0), c)
    assert torch.allclose(classifier_free_guidance(c, c, w), c, atol=1e-5)
    assert torch.allclose(classifier_free_guidance(c, u, w) - u, (1 + w) * (c - u), atol=1e-4)


def test_zero_guidance_is_the_conditional_prediction():
    """w = 0: classifier_free_guidance(c, u, 0) = c, and sample.py's model function returns net(x, t, y) itself."""
    net = randomized(UNet(**TINY, num_classes=3))
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = net(x, t, y)
        assert torch.equal(classifier_free_guidance(cond, torch.randn_like(cond), 0.0), cond)
        assert torch.equal(model_fn(net, y, 0.0, False)(x, t), cond)


def test_guided_prediction_one_batched_pass():
    """w > 0: the prediction from one forward pass over [x; x] with labels [y; null] equals
    (1 + w) net(x, t, y) - w net(x, t, null) from two separate passes (the net treats examples independently)."""
    net = randomized(UNet(**TINY, num_classes=3))
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99]), torch.tensor([0, 1, 2, 1])
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        guided = model_fn(net, y, 3.0, False)(x, t)
        assert calls == [8]
        expected = 4.0 * net(x, t, y) - 3.0 * net(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)


def test_class_list_parsing():
    """--class takes indices or, for a CIFAR-10 model, names; anything else is one error line."""
    assert parse_classes("ship,3, cat", 10, CIFAR10_CLASSES) == [8, 3, 3]
    assert parse_classes("2,0,2", 3, ()) == [2, 0, 2]
    for bad in ("3", "-1", "ship", "1,,2"):
        with pytest.raises(ValueError, match="^--class"):
            parse_classes(bad, 3, ())


def test_no_class_samples_with_the_null_label(tmp_path, capsys):
    """A class-conditional checkpoint without --class gives the samples of the unconditional model: Algorithm 2 with
    eps(x, null), the null label being num_classes; and they differ from those of class 0."""
    net = write_checkpoint(str(tmp_path / "c.pt"), num_classes=3)
    sample.main([str(tmp_path / "c.pt"), "--n", "2", "--steps", "10", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert "null label 3" in capsys.readouterr().out
    got = read_npz(tmp_path / "s.npz")
    assert list(got) == ["arr_0"]  # no labels asked for, none stored
    diffusion = build_diffusion(DIFFUSION)
    def draw(label):
        g = torch.Generator().manual_seed(0)
        y = torch.full((2,), label)
        return to_uint8(ddim_sample_loop(diffusion, lambda x, t: net(x, t, y), (2, 3, 8, 8), 10, generator=g))
    assert torch.equal(got["arr_0"], draw(3))
    assert not torch.equal(got["arr_0"], draw(0))

# ---- the "must show": guidance makes the samples more recognisably of their class


def colour_features(images):
    """Mean colour of the shape's pixels (any channel above 80; the backgrounds are darker than 40), else of all."""
    x = images.float()
    mask = (x.max(dim=3).values > 80).float()[..., None]
    return torch.where(mask.sum((1, 2)) > 0, (x * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1), x.mean((1, 2)))


class NearestMean:
    """The simple classifier: each make_shapes class has its own colour, so the nearest class-mean colour."""
    def __init__(self, images, labels):
        f = colour_features(images)
        self.means = torch.stack([f[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    def __call__(self, images):
        return torch.cdist(colour_features(images), self.means).argmin(1)


# tiny net on 8x8 shapes, T = 100; measured about 40 s of training on one core of this 2-core machine
TRAIN = ["--data", "shapes", "--class-cond", "--image-size", "8", "--ch", "32", "--ch-mult", "1,2",
         "--num-res-blocks", "1", "--attn", "", "--timesteps", "100", "--batch-size", "32", "--steps", "500",
         "--lr", "1e-3", "--warmup", "20", "--ema-decay", "0.99", "--sample-every", "0", "--num-samples", "4",
         "--sample-steps", "2", "--log-every", "100", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("guided") / "run"
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *TRAIN, "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


def test_guidance_makes_classes_recognisable(trained, tmp_path, capsys):
    """32 samples per class (Algorithm 2, 100 steps) with w = 0 and w = 3: the nearest-mean colour classifier, exact on
    real shapes, finds the asked-for class more often with guidance, and at least 70% of the time; a model that
    ignored the label would score 25% whatever it drew (the classes are asked for equally often)."""
    real, labels = make_shapes(2000, image_size=8, seed=1)
    classify = NearestMean(real, labels)
    assert (classify(real) == labels).float().mean() > 0.99
    accuracy = {}
    for w in (0, 3):
        npz = str(tmp_path / f"w{w}.npz")
        sample.main([trained, "--class", "0,1,2,3", "--n", "128", "--guidance", str(w), "--out",
                     str(tmp_path / f"w{w}.png"), "--npz", npz, "--device", "cpu"])
        arrays = read_npz(npz)
        assert arrays["arr_1"].bincount().tolist() == [32, 32, 32, 32]
        accuracy[w] = (classify(arrays["arr_0"]) == arrays["arr_1"]).float().mean().item()
    print(f"accuracy without guidance {accuracy[0]:.3f}, with w = 3 {accuracy[3]:.3f}")
    assert accuracy[3] > accuracy[0], accuracy
    assert accuracy[3] >= 0.7, accuracy

# ---- classifier guidance (Dhariwal & Nichol 2021)


def linear_classifier(num_classes=3, seed=0):
    """log p(y | x) = softmax(W x)_y, independent of t: its gradient in x is known in closed form,
    W_y - sum_k p_k W_k."""
    W = torch.randn(num_classes, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1
    def classifier(x, t):
        return x.flatten(1).double() @ W.T
    def grad(x, y):
        p = torch.softmax(classifier(x, None), dim=1)
        return (W[y] - p @ W).view_as(x)
    classifier.num_classes = num_classes
    return classifier, grad


def test_zero_scale_is_the_unguided_sampler():
    """s = 0: classifier guidance leaves every sampler's output bitwise unchanged (Algorithm 2 over all T, DDIM and
    DPM-Solver++ as ODE and SDE, Restart), the classifier's gradient being scaled to exactly 0."""
    d = build_diffusion(DIFFUSION)
    net = randomized(UNet(**TINY))
    classifier, _ = linear_classifier()
    y = torch.tensor([0, 2])
    for sampler, steps, eta in (("ddpm", 100, None), ("ddim", 10, None), ("dpm++", 10, None), ("dpm++", 10, 1.0),
                                ("restart", 10, None)):
        full = is_full_chain(sampler, steps, "trailing", d.num_timesteps)
        guided = lambda cond: classifier_guidance(d, lambda x, t: net(x, t), cond, full)  # -> (model, cond_fn)
        runs = [sample_loop(d, *guided(cond)[:1], (2, 3, 8, 8), sampler, steps, eta, generator=torch.Generator()
                            .manual_seed(0), cond_fn=guided(cond)[1]) for cond in (None, classifier_grad(classifier, y, 0.0))]
        assert torch.equal(*runs), sampler


def test_algorithm_1_shifts_the_mean_by_s_sigma_squared_g():
    """Algorithm 1: one ancestral step with guidance moves the mean by exactly s * sigma_t^2 * g (fixedlarge
    sigma_t^2 = beta_t), g = grad log p(y | x_t) of a classifier whose gradient is known in closed form."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), dtype=torch.float64)
    classifier, grad = linear_classifier()
    x_t, y, t, s = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2]), torch.tensor([50, 7]), 2.5
    z = torch.randn_like(x_t)
    model = lambda x, tt: 0.3 * x
    plain = d.p_sample(model, x_t, t, z)
    guided = d.p_sample(model, x_t, t, z, cond_fn=classifier_grad(classifier, y, s))
    sigma2 = d.betas[t].view(-1, 1, 1, 1)
    assert torch.allclose(guided - plain, s * sigma2 * grad(x_t, y), rtol=1e-9, atol=1e-12)


def test_algorithm_2_shift_is_the_posterior_mean_shift():
    """Algorithm 2 on a DDIM step with eta = 1 and t_prev = t - 1, i.e. the posterior (7) at x0_hat: eps moves by
    -s sqrt(1 - abar_t) g, so x0_hat by (1 - abar_t) / sqrt(abar_t) s g, so the posterior mean by coef1 times that,
    which is beta_t / sqrt(alpha_t) s g (derived by hand from Eqs. 7 and 15)."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), dtype=torch.float64)
    classifier, grad = linear_classifier()
    x_t, y, s = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1]), 1.7
    t = torch.tensor([40, 40])
    model = lambda x, tt: 0.3 * x
    guided_model = classifier_guided_eps(d, model, classifier_grad(classifier, y, s))
    zero = torch.zeros_like(x_t)
    plain = ddim_sample(d, model, x_t, t, 39, eta=1.0, noise=zero, clip_denoised=False)
    guided = ddim_sample(d, guided_model, x_t, t, 39, eta=1.0, noise=zero, clip_denoised=False)
    beta = d.betas[40]
    assert torch.allclose(guided - plain, beta / (1 - beta).sqrt() * s * grad(x_t, y), rtol=1e-8, atol=1e-12)


@FAST
@given(schedules(min_t=20, max_t=200), st.sampled_from(["x0", "v"]), st.floats(0.1, 5), st.integers(0, 2**31 - 1),
       st.data())
def test_classifier_guidance_shifts_eps_whatever_the_network_predicts(betas, mean_type, s, seed, data):
    """Algorithm 2's shift belongs on eps: a network predicting x0 or v that makes the same predictions as an
    eps-network (its output converted exactly, float64) is guided to the same DDIM step, at any noise level."""
    d_eps, d_other = (GaussianDiffusion(betas, mean_type=m, dtype=torch.float64) for m in ("eps", mean_type))
    classifier, _ = linear_classifier()
    g = torch.Generator().manual_seed(seed)
    x_t, y = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2])
    i = data.draw(st.integers(1, len(betas) - 1))
    t = full(2, i)
    eps_model = lambda x, tt: 0.3 * x + 0.1
    def other_model(x, tt):  # the eps-network's prediction, in the other parameterisation
        x0 = d_eps.predict_start_from_noise(x, tt, eps_model(x, tt))
        return x0 if mean_type == "x0" else d_eps.predict_v(x0, tt, eps_model(x, tt))
    cond_fn = classifier_grad(classifier, y, s)
    want = ddim_sample(d_eps, classifier_guided_eps(d_eps, eps_model, cond_fn), x_t, t, i - 1, clip_denoised=False)
    got = ddim_sample(d_other, classifier_guided_eps(d_other, other_model, cond_fn), x_t, t, i - 1, clip_denoised=False)
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-9)


@FAST
@given(st.floats(0, 8), st.integers(0, 99), st.integers(0, 2**31 - 1))
def test_classifier_free_guidance_is_classifier_guidance_with_the_implicit_classifier(w, i, seed):
    """Ho & Salimans' implicit classifier, grad log p^i(c | x_t) = -(eps_c - eps_u) / sqrt(1 - abar_t): used by
    Algorithm 2 with s = w it gives eps_c + w (eps_c - eps_u) = classifier_free_guidance(eps_c, eps_u, w)."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, 1e-3, 0.2), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    eps_c, eps_u = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.full((2,), i)
    implicit = lambda x, tt: -w * (eps_c - eps_u) / d.sqrt_one_minus_alphas_cumprod[tt].view(-1, 1, 1, 1)
    guided = classifier_guided_eps(d, lambda x, tt: eps_c, implicit)(torch.zeros_like(eps_c), t)
    assert torch.allclose(guided, classifier_free_guidance(eps_c, eps_u, w), rtol=1e-10, atol=1e-10)


def test_classifier_gradient_is_per_sample_and_matches_finite_differences():
    """classifier_grad on the noise-aware classifier (float64): central differences of log p(y | x_t, t) agree with
    autograd on sampled coordinates, and permuting the batch permutes the gradients (GroupNorm: no sample sees
    another)."""
    clf = randomized(NoisyClassifier(3, **dict(TINY, dropout=0.0))).double()
    x, t, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 30, 60, 99]), torch.tensor([0, 1, 2, 1])
    g = classifier_grad(clf, y, 1.0)(x, t)
    log_p = lambda xx: torch.log_softmax(clf(xx, t), 1)[torch.arange(4), y]
    for idx in [(0, 0, 1, 2), (1, 2, 7, 7), (3, 1, 4, 0)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        numeric = (log_p(x + e) - log_p(x - e))[idx[0]] / 2e-6
        assert numeric.item() == pytest.approx(g[idx].item(), rel=1e-5, abs=1e-8)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(classifier_grad(clf, y[perm], 1.0)(x[perm], t[perm]), g[perm], atol=1e-12)


@pytest.fixture(scope="module")
def unconditional_and_classifier(tmp_path_factory):
    """An unconditional model and a classifier on 8x8 shapes, trained by train.py (a minute or so on one core)."""
    out = tmp_path_factory.mktemp("cg")
    common = ["--data", "shapes", "--image-size", "8", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1",
              "--attn", "", "--timesteps", "100", "--batch-size", "32", "--lr", "1e-3", "--warmup", "20",
              "--sample-every", "0", "--log-every", "100", "--device", "cpu"]
    r = run_script("train.py", *common, "--steps", "500", "--ema-decay", "0.99", "--out", out / "model", timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *common, "--classifier", "--steps", "300", "--ema-decay", "0.9", "--out",
                   out / "clf", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "accuracy by t quartile" in r.stdout
    return out


def test_classifier_guidance_steers_an_unconditional_model(unconditional_and_classifier, tmp_path, capsys):
    """The issue's bar: an unconditional model guided by a classifier trained with train.py --classifier. 32 samples
    per class, Algorithm 2 over all T = 100 steps: the shapes classifier of metrics.py recognises the asked-for
    class in at least 60% of guided samples (chance: 25%; a classifier that knows nothing steers toward nothing)
    and in at least 25 points more than without guidance."""
    model, clf = str(unconditional_and_classifier / "model"), str(unconditional_and_classifier / "clf")
    accuracy = {}
    for s in (0.0, 4.0):
        npz = str(tmp_path / f"s{s}.npz")
        sample.main([model, "--classifier", clf, "--classifier-scale", str(s), "--class", "square,disk,triangle,cross",
                     "--n", "128", "--npz", npz, "--out", str(tmp_path / "g.png"), "--device", "cpu"])
        arrays = read_npz(npz)
        accuracy[s] = (metrics.classify(arrays["arr_0"]) == arrays["arr_1"]).float().mean().item()
    print(f"classifier guidance: recognised {accuracy[0.0]:.3f} unguided, {accuracy[4.0]:.3f} at scale 4")
    assert accuracy[4.0] >= 0.6 and accuracy[4.0] >= accuracy[0.0] + 0.25, accuracy


def test_classifier_guidance_bad_combinations(unconditional_and_classifier, tmp_path):
    """One clear line each: a classifier given as the model, a model as the classifier, --classifier without
    --class, a classifier trained for another T."""
    model, clf = unconditional_and_classifier / "model", unconditional_and_classifier / "clf"
    cases = [([clf], "is a classifier"), ([model, "--classifier", model, "--class", "0"], "is not a classifier"),
             ([model, "--classifier", clf], "needs --class")]
    for argv, expect in cases:
        r = run_script("sample.py", *argv, "--device", "cpu", "--out", tmp_path / "g.png")
        assert expect in assert_one_line_error(r), argv
    torch.save(dict(torch.load(clf / "ckpt.pt"), diffusion_config=dict(DIFFUSION, num_timesteps=50)),
               tmp_path / "clf50.pt")
    r = run_script("sample.py", model, "--classifier", tmp_path / "clf50.pt", "--class", "0", "--device", "cpu")
    assert "trained for another diffusion" in assert_one_line_error(r)
