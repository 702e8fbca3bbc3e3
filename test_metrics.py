"""Tests of metrics.py, the built-in shapes' quality number: two sets of real shapes are close and noise is far;
its command line says what the number is (for the built-in shapes only) and shows the feature classifier training;
the second number, the RMSE to the nearest real shape, against a direct computation and against noise."""
import pytest
import torch

import metrics
from conftest import run_script
from data import make_shapes
from imagefiles import write_npz


def test_real_shapes_score_near_zero_and_noise_far():
    """The Frechet distance in the classifier's features: held-out shapes against another draw of shapes is small,
    uniform noise is far, and the classifier sees the shapes' own classes."""
    real, labels = make_shapes(500, 8, 3, seed=5)
    noise = torch.randint(0, 256, (500, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert metrics.shapes_distance(real, 500) < 10 < 100 < metrics.shapes_distance(noise, 500)
    assert (metrics.classify(real) == labels).float().mean() > 0.9


def test_nearest_real_is_the_brute_force_minimum():
    """nearest_real against a direct route: for each sample, the RMSE in uint8 levels to every reference image, the
    least of them, averaged over the samples (a mean of minima, not a minimum of means)."""
    g = torch.Generator().manual_seed(0)
    reference, _ = make_shapes(60, 8, 3, seed=metrics.REFERENCE_SEED)
    samples = torch.cat([reference[:3], torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8, generator=g)])
    direct = [min((s.double() - r.double()).square().mean().sqrt().item() for r in reference) for s in samples]
    assert abs(metrics.nearest_real(samples, 60, chunk=3) - sum(direct) / len(direct)) < 1e-3
    assert metrics.nearest_real(reference[:3], 60) < 1e-3  # a reference image is its own nearest


def test_nearest_real_sees_noise_that_leaves_a_shape_recognisable():
    """The pixel number rises with noise the classifier still sees through: shapes with Gaussian noise of 30 levels
    are classified as well as clean ones, and lie more than 10 levels farther from the real shapes."""
    real, labels = make_shapes(200, 8, 3, seed=5)
    noisy = (real.float() + 30 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    noisy = noisy.round().to(torch.uint8)
    assert (metrics.classify(noisy) == labels).float().mean() > 0.9
    assert metrics.nearest_real(noisy, 2000) > metrics.nearest_real(real, 2000) + 10


def test_the_command_line_says_what_the_number_is(tmp_path):
    """python metrics.py FILE: one line saying the number is for the built-in shapes only (not the FID), progress
    while its classifier trains, then the number and how often the asked-for class is seen."""
    images, labels = make_shapes(64, 12, 1, seed=6)  # a size no other test trains the classifier for
    write_npz(str(tmp_path / "s.npz"), {"arr_0": images, "arr_1": labels})
    r = run_script("metrics.py", tmp_path / "s.npz")
    assert r.returncode == 0, r.stderr
    assert "defined for the built-in shapes only" in r.stdout and "not the FID" in r.stdout
    assert "training the feature classifier for 12x12x1 shapes: step 600/600" in r.stdout
    assert f"{tmp_path / 's.npz'}: 64 samples | quality " in r.stdout and "asked-for class seen" in r.stdout
    assert "| nearest real shape " in r.stdout and " levels of 255 (real shapes " in r.stdout


def test_the_bootstrap_spread_of_the_nearest_real_shape_is_its_standard_error(tmp_path):
    """bootstrap's spread of the nearest-real number (a mean over the samples) against its closed form: the
    standard deviation of a mean of n draws with replacement is the samples' own (population) sd over sqrt(n), here
    within 15% over 400 resamples; the two numbers are shapes_distance's and nearest_real's; and the quality number's
    spread is positive and smaller than the number."""
    real, _ = make_shapes(200, 8, 3, seed=7)
    noisy = (real.float() + torch.randn(real.shape, generator=torch.Generator().manual_seed(0)) * 30).clamp(0, 255)
    images = noisy.round().to(torch.uint8)
    quality, q_sd, nearest, n_sd = metrics.bootstrap(images, 500, resamples=400)
    rmse = metrics.nearest_rmses(images, metrics._real_rows(20000, 8, 3))
    assert abs(n_sd / (rmse.std(unbiased=False).item() / len(images) ** 0.5) - 1) < 0.15
    assert quality == pytest.approx(metrics.shapes_distance(images, 500), rel=1e-5)  # the numbers themselves, as
    assert nearest == pytest.approx(metrics.nearest_real(images), rel=1e-5)          # their own functions give them
    assert 0 < q_sd < quality
    write_npz(str(tmp_path / "s.npz"), {"arr_0": images})
    r = run_script("metrics.py", tmp_path / "s.npz")
    assert r.returncode == 0 and " ± " in r.stdout and "a bootstrap's sd over the samples" in r.stdout
