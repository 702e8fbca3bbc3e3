"""Tests for evaluate.py, the paper's Sec. 4.3-4.4 on a trained model: the NLL bound (Eq. 5) with its terms, on a
user's file and on CIFAR-10's test split; the shared-latents and interpolation figures; bad input as one line."""
import pickle

import pytest
import torch

import evaluate
from checkpoint import build_diffusion
from conftest import TINY_DIFFUSION as DIFFUSION, TINY_NET as TINY, randomized, write_checkpoint
from conftest import decode_png
from data import make_shapes
from imagefiles import write_npz
from unet import UNet


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run") / "ckpt.pt")
    write_checkpoint(path, args={"data": "shapes"})
    return path


def run(argv, capsys):
    evaluate.main([*argv, "--device", "cpu"])
    return capsys.readouterr().out


def test_nll_terms_sum_to_total(ckpt, tmp_path, capsys):
    """--nll on a user's .npz: finite bits/dim per running batch, and L_T + sum L_{t-1} + L_0 = total (Eq. 5)."""
    images, _ = make_shapes(3, image_size=8)
    write_npz(str(tmp_path / "test.npz"), {"arr_0": images})
    out = run([ckpt, "--nll", str(tmp_path / "test.npz"), "--batch-size", "2"], capsys)
    assert len([l for l in out.splitlines() if l.startswith(("2/3 | bpd", "3/3 | bpd"))]) == 2
    last = next(l for l in out.splitlines() if l.startswith("NLL <=")).split()
    total, prior, vb, decoder = (float(last[i]) for i in (2, 9, 13, 16))
    assert last[:2] == ["NLL", "<="] and all(map(torch.isfinite, torch.tensor([total, prior, vb, decoder])))
    assert total > 0 and abs(prior + vb + decoder - total) <= 2e-4  # each printed to 4 decimals
    # the value itself: calc_bpd_loop on the EMA net, the images scaled as in training, the per-batch generators
    net = UNet(**TINY)
    net.load_state_dict(torch.load(ckpt)["ema"])
    diffusion, expected = build_diffusion(DIFFUSION), []
    x0 = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        for b, part in enumerate(x0.split(2)):
            g = torch.Generator().manual_seed(b)
            expected.append(diffusion.calc_bpd_loop(lambda x, t: net.eval()(x, t), part, generator=g)["total_bpd"])
    assert total == pytest.approx(torch.cat(expected).mean().item(), abs=1e-4)


def test_nll_cifar10_test_split(tmp_path, capsys):
    """--nll cifar10 reads test_batch (the test split) from --data-dir; --n limits the images evaluated."""
    np = pytest.importorskip("numpy")  # only to write a pickle like CIFAR-10's
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1, 2]}, f, protocol=2)
    model = randomized(UNet(**dict(TINY, image_size=32)))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "model_config": model.config,
                "diffusion_config": dict(DIFFUSION, num_timesteps=20),
                "args": {}, "format": "ddpm-checkpoint-v1"}, tmp_path / "c.pt")
    out = run([str(tmp_path / "c.pt"), "--nll", "cifar10", "--data-dir", str(tmp_path), "--n", "2"], capsys)
    assert "NLL bound on 2 images of cifar10" in out and "bits/dim over 2 images" in out


def test_shared_latents_and_interpolation_figures(ckpt, tmp_path, capsys):
    """--shared-latents: one row per (image, t) holding the image, x_t and --draws samples; --interpolate: one row
    per t holding image A, the --lambdas interpolants and image B (Figures 7 and 8)."""
    out = run([ckpt, "--shared-latents", "shapes", "--index", "0,1", "--times", "10,100", "--draws", "3", "--out",
               str(tmp_path / "s.png")], capsys)
    assert decode_png(tmp_path / "s.png").shape == (2 + 4 * 10, 2 + 5 * 10, 3) and "wrote" in out
    run([ckpt, "--interpolate", "shapes", "--index", "0,1", "--times", "50", "--lambdas", "3", "--out",
         str(tmp_path / "i.png")], capsys)
    assert decode_png(tmp_path / "i.png").shape == (2 + 1 * 10, 2 + 5 * 10, 3)


@pytest.mark.parametrize("case", ["nll_missing_file", "nll_wrong_size", "two_jobs", "times_out_of_range",
                                  "one_image_to_interpolate", "not_a_checkpoint"])
def test_bad_input_one_line(case, ckpt, tmp_path):
    """Each mistake ends in SystemExit with one 'error:' line, and nothing is written."""
    images, _ = make_shapes(2, image_size=16)
    write_npz(str(tmp_path / "big.npz"), {"arr_0": images})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    argv = {"nll_missing_file": [ckpt, "--nll", str(tmp_path / "nope.npz")],
            "nll_wrong_size": [ckpt, "--nll", str(tmp_path / "big.npz")],
            "two_jobs": [ckpt, "--nll", "shapes", "--shared-latents", "shapes"],
            "times_out_of_range": [ckpt, "--shared-latents", "shapes", "--times", "0,101"],
            "one_image_to_interpolate": [ckpt, "--interpolate", "shapes", "--index", "3"],
            "not_a_checkpoint": [str(tmp_path / "notes.txt"), "--nll", "shapes"]}[case]
    with pytest.raises(SystemExit) as e:
        evaluate.main([*argv, "--device", "cpu", "--out", str(tmp_path / "g.png")])
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    assert not (tmp_path / "g.png").exists()
