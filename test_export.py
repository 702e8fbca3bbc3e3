"""Tests of export.py: what leaves for diffusers is the model or a one-line refusal. The network computes the same eps
in diffusers' UNet2DModel (the default network of train.py included), the scheduler's timestep grid is the trailing
grid every sampler here uses, its alphas_cumprod are the model's for every schedule (the shifted cosine included),
and diffusers' pipeline from the exported folder draws what sample.py draws from the same x_T, for a diffusion model
and a progressive student. The diffusers halves are skipped without diffusers (requirements-dev.txt)."""
import json

import pytest
import torch

import export
import sample
from checkpoint import diffusion_config
from conftest import (TINY_DIFFUSION, TINY_NET, TRAIN_TINY, one_line_error, randomized, read_npz, run_script,
                      write_checkpoint)
from ddpm import GaussianDiffusion
from guidance import NoisyClassifier
from highres import shift_for
from pretrained import load_pretrained
from samplers import spaced_timesteps
from unet import UNet, network_groups

SCHEDULES = {  # diffusion configs of every schedule train.py makes, at T = 1000 and at another T
    "linear": diffusion_config("linear", 1000),
    "linear T=100": diffusion_config("linear", 100),
    "cosine": diffusion_config("cosine", 1000),
    "shifted cosine": dict(diffusion_config("cosine", 1000), shift_base=32, logsnr_shift=shift_for(32, 64)),
    "shifted cosine T=100, v": dict(diffusion_config("cosine", 100, mean_type="v"), logsnr_shift=shift_for(8, 32)),
}


def save(path, net, diffusion, **extra):
    """A train.py checkpoint holding net (as both weights) and its diffusion config."""
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "step": 1, "model_config": net.config,
                "diffusion_config": diffusion, "args": {}, "format": "ddpm-checkpoint-v1", **extra}, path)


def schedulers(config):
    """diffusers' schedulers as export.py configures them, for a diffusion model and for a progressive student."""
    diffusers = pytest.importorskip("diffusers")
    return [getattr(diffusers, c["_class_name"]).from_config(c)
            for c in (export.scheduler_config(config), export.scheduler_config(config, student=True))]


def both_draw(ckpt, folder, n, steps, tmp_path):
    """(sample.py's n images from ckpt with seed 0, diffusers' DDPMPipeline's from the exported folder at `steps`
    with a generator seeded 0), as int pixel levels: both draw x_T first from the seed."""
    diffusers = pytest.importorskip("diffusers")
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=n, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                      output_type="np").images
    sample.main([str(ckpt), "-n", str(n), "--seed", "0", "--npz", str(tmp_path / "s.npz"), "--out",
                 str(tmp_path / "s.png"), "--device", "cpu"])
    return read_npz(tmp_path / "s.npz")["arr_0"].int(), (torch.from_numpy(images) * 255).round().int()


@pytest.mark.parametrize("name", SCHEDULES)
def test_exported_alphas_cumprod_are_the_models(name):
    """Every schedule (the shifted cosine too, written as the model's own betas) gives diffusers' schedulers the
    model's alphas_cumprod (to float32's rounding of a product of up to 1000 terms)."""
    config = SCHEDULES[name]
    ours = GaussianDiffusion(export.diffusion_betas(config)).alphas_cumprod
    if "logsnr_shift" in config:  # the shift is there: these are not the unshifted cosine's
        assert not torch.allclose(GaussianDiffusion(export.diffusion_betas(dict(config, logsnr_shift=0))).alphas_cumprod,
                                  ours, rtol=0.01)
    for scheduler in schedulers(config):
        torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours.double(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("num_timesteps,steps", [(1000, 4), (1000, 16), (1000, 7), (100, 4), (100, 100), (50, 3)])
def test_exported_grid_is_the_trailing_grid(num_timesteps, steps):
    """At every step count the exported schedulers visit samplers.spaced_timesteps' trailing grid (T = 1000 at 4
    steps: 999, 749, 499, 249, where a 4-step progressive student learnt its steps), not diffusers' leading one."""
    for scheduler in schedulers(diffusion_config("linear", num_timesteps)):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == spaced_timesteps(num_timesteps, steps)
    if (num_timesteps, steps) == (1000, 4):
        assert spaced_timesteps(1000, 4) == [999, 749, 499, 249]


def test_the_default_network_exports(tmp_path):
    """train.py's default network (groups of at least 4 channels: one count, 8 groups for 32 and 64 channels)
    exports, and diffusers' UNet2DModel computes its eps."""
    r = run_script("train.py", *TRAIN_TINY, "--steps", "1", "--sample-every", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "run" / "ckpt.pt")["model_config"]["norm_groups"] == 8
    export.main([str(tmp_path / "run"), "--to-diffusers", str(tmp_path / "d")])
    ours = load_pretrained(tmp_path / "d")
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d").eval()
    assert theirs.config.norm_num_groups == 8
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 20, 49])
    with torch.no_grad():
        assert (theirs(x, t).sample - ours(x, t)).abs().max() <= 1e-4


def test_a_narrow_network_exports_and_reads_back(tmp_path):
    """A U-Net narrower than 32 channels (16, in 4 groups of 4 at every width: network_groups) leaves as diffusers'
    layout and load_pretrained reads it back to the same network and eps."""
    net = randomized(UNet(**dict(TINY_NET, ch=16), group_channels=4, norm_groups=network_groups(16, (1, 2), 4)))
    save(tmp_path / "n.pt", net, TINY_DIFFUSION)
    export.main([str(tmp_path / "n.pt"), "--to-diffusers", str(tmp_path / "d")])
    back, x, t = load_pretrained(tmp_path / "d"), torch.randn(2, 3, 8, 8), torch.tensor([3, 90])
    assert {m.num_groups for m in back.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), net(x, t), atol=0, rtol=0)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_export_to_diffusers(tmp_path, capsys, num_classes):
    """export.py writes a folder that load_pretrained reads back to the same network; where diffusers is installed,
    UNet2DModel.from_pretrained computes the same eps (with class labels for a class-conditional net), and for an
    unconditional one DDPMPipeline draws the images sample.py draws with the same seed (to one level of 255)."""
    write_checkpoint(str(tmp_path / "ckpt.pt"), num_classes=num_classes)
    export.main([str(tmp_path / "ckpt.pt"), "--to-diffusers", str(tmp_path / "d")])
    ours = randomized(UNet(**dict(TINY_NET, num_classes=num_classes)), seed=1)  # the checkpoint's EMA
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 90])
    y = None if num_classes is None else torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "d")(x, t, y), ours(x, t, y), atol=0, rtol=0)
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, ours(x, t, y), atol=1e-5, rtol=1e-5)
    if num_classes is not None:  # DDPMPipeline passes no labels: the export says so
        assert "cannot sample it" in capsys.readouterr().out
        return
    ours, theirs = both_draw(tmp_path / "ckpt.pt", tmp_path / "d", 2, 100, tmp_path)
    assert (ours - theirs).abs().max() <= 1


@pytest.mark.parametrize("name", ["linear T=100, eps", "shifted cosine T=100, v"])
def test_a_progressive_student_exports_at_its_own_steps(tmp_path, capsys, name):
    """A 4-step progressive student (a v-network on a shifted schedule too): diffusers' DDPMPipeline from the export,
    at the student's 4 steps, draws what sample.py draws with its own sampler (deterministic DDIM on the trailing
    grid, x0 clipped) from the same x_T, to one level of 255."""
    config = TINY_DIFFUSION if name.startswith("linear") else SCHEDULES[name]
    student = randomized(UNet(**TINY_NET), seed=2)
    with torch.no_grad():  # a tamer net than randomized's, so that the chain's x0 is not clipped everywhere
        student.conv_out.weight.mul_(0.1)
    save(tmp_path / "s.pt", student, config, kind="progressive", sampling={"sampler": "ddim", "steps": 4})
    export.main([str(tmp_path / "s.pt"), "--to-diffusers", str(tmp_path / "d")])
    assert "at its 4 steps" in capsys.readouterr().out
    ours, theirs = both_draw(tmp_path / "s.pt", tmp_path / "d", 4, 4, tmp_path)
    assert (ours - theirs).abs().max() <= 1
    assert ours.float().std() > 20  # images, not a constant both could agree on
    if name.startswith("linear"):  # an eps student's x0_hat leaves [-1, 1] here: the clip is in the export
        config = json.loads((tmp_path / "d" / "scheduler_config.json").read_text())
        (tmp_path / "d" / "scheduler_config.json").write_text(json.dumps(dict(config, thresholding=False)))
        assert (both_draw(tmp_path / "s.pt", tmp_path / "d", 4, 4, tmp_path)[1] - theirs).abs().max() > 1


def test_export_refuses_what_diffusers_cannot_hold(tmp_path, capsys):
    """A classifier and a network saved with one group count per layer (fewer groups in narrow layers) each get one
    line and no folder (a latent model: test_latent.py; a caption model: test_captions.py)."""
    classifier = NoisyClassifier(4, **TINY_NET)
    save(tmp_path / "clf.pt", classifier, TINY_DIFFUSION, kind="classifier")
    assert "is a classifier model" in one_line_error(export.main, [str(tmp_path / "clf.pt"), "--to-diffusers",
                                                                  str(tmp_path / "d")], capsys)
    # between 2026-12-02 and -07 train.py saved groups of 4 channels per layer: 8 at 32 channels, 16 at 64
    save(tmp_path / "g.pt", UNet(**TINY_NET, group_channels=4), TINY_DIFFUSION)
    assert "one count for all" in one_line_error(export.main, [str(tmp_path / "g.pt"), "--to-diffusers",
                                                              str(tmp_path / "d")], capsys)
    assert not (tmp_path / "d").exists()
