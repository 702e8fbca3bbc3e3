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

import sample
from checkpoint import build_diffusion
from conftest import FAST, HERE, TINY_DIFFUSION as DIFFUSION, TINY_NET as TINY, randomized, read_npz, write_checkpoint
from data import make_shapes, to_uint8
from guidance import classifier_free_guidance, model_fn
from samplers import ddim_sample_loop
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
    assert sample.parse_classes("ship,3, cat", 10, sample.CIFAR10_CLASSES) == [8, 3, 3]
    assert sample.parse_classes("2,0,2", 3, ()) == [2, 0, 2]
    for bad in ("3", "-1", "ship", "1,,2"):
        with pytest.raises(SystemExit, match="^error: --class"):
            sample.parse_classes(bad, 3, ())


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
