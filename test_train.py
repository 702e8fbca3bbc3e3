"""Tests for train.py and training.py: the training step (warmup, batches, clipping, label dropping, EMA, gradient
accumulation), then short CPU runs end to end (checkpoint, sample grid, exact resume, a user's grayscale .npz,
two-process torchrun with gloo, SIGTERM), and bad input ending in one clear line without touching an existing
checkpoint. Tiny configs throughout; run with `python -m pytest -q test_train.py`."""
import copy
import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import pytest
import torch

import data
import imagefiles
import runs
import train
import training
from checkpoint import build_diffusion, load_checkpoint
from conftest import (ENV, HERE, TINY_NET, TRAIN_TINY as TINY, assert_one_line_error, decode_png, in_process,
                      one_line_error, py2_cifar_batch, randomized, read_npz, run_script, torchrun)
from ddpm import GaussianDiffusion
from unet import UNet

TRAIN = os.path.join(HERE, "train.py")


def run(*args, timeout=120):
    return run_script("train.py", *args, timeout=timeout)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 4-step run on the built-in data: its folder (ckpt.pt, samples, log)."""
    out = tmp_path_factory.mktemp("good")
    r = run(*TINY, "--steps", "4", "--log-every", "2", "--ckpt-every", "4", "--sample-every", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------- the training step (training.py)

def test_warmup_is_linear_from_zero():
    """The original code's warmup: lr * min(step / warmup, 1) with step the updates done so far (so the first
    update has lr 0); no warmup: the constant lr."""
    args = SimpleNamespace(lr=2e-4, warmup=5000)
    assert [training.get_lr(s, args) for s in (0, 1, 2500, 5000, 10**6)] == [0.0, 2e-4 / 5000, 1e-4, 2e-4, 2e-4]
    assert training.get_lr(0, SimpleNamespace(lr=1e-3, warmup=0)) == 1e-3


def test_batches_scale_flip_and_cover_each_epoch():
    """Batches: pixels scaled by x / 127.5 - 1 exactly; with flips each image comes back as itself or mirrored
    left-right (the last axis), about half of each; without, never mirrored; each epoch visits every image once
    (the remainder of a batch dropped); the batch at a step does not depend on what was drawn before."""
    images = torch.randint(0, 256, (40, 4, 4, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40)
    for flip in (True, False):
        batches = training.Batches(images, labels, 8, seed=3, flip=flip)
        seen, flipped = [], 0
        for step in range(5):
            x, y = batches(step)
            seen += y.tolist()
            ref = images[y].permute(0, 3, 1, 2).float() / 127.5 - 1
            same, mirrored = (x == ref).flatten(1).all(1), (x == ref.flip(3)).flatten(1).all(1)
            assert (same | mirrored).all()
            flipped += int((mirrored & ~same).sum())
        assert sorted(seen) == list(range(40))
        assert (10 <= flipped <= 30) if flip else flipped == 0
    fresh = training.Batches(images, labels, 8, seed=3, flip=False)
    assert torch.equal(fresh(7)[1], batches(7)[1])


def test_timesteps_are_drawn_uniformly_over_all_T():
    """Algorithm 1 line 3: t ~ Uniform({1, ..., T}), i.e. indices 0..T-1, each about equally often."""
    diffusion = build_diffusion(dict(num_timesteps=10, beta_start=1e-3, beta_end=0.2))
    torch.manual_seed(0)
    loss_fn = training.DiffusionLoss(diffusion)
    x0 = torch.zeros(5000, 1, 1, 1)
    t, noise, _ = loss_fn.draw(x0, None)
    losses, _ = loss_fn(lambda x, t, y: torch.zeros_like(x), x0, None, t, noise, None)
    counts = torch.bincount(t, minlength=10)
    assert t.min() == 0 and t.max() == 9 and counts.min() > 400
    assert torch.allclose(losses, noise.flatten(1).square().mean(1))  # Eq. (14) with eps_theta = 0


def test_train_step_clips_drops_labels_and_updates_the_ema():
    """train_step: the update sees gradients of global norm <= grad_clip, and returns the norm before clipping;
    labels are replaced by the null class (num_classes) with probability p_uncond; the EMA moves by
    (1 - decay) of the way to the new weights."""
    net = randomized(UNet(**dict(TINY_NET, num_classes=3))).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    diffusion = build_diffusion(dict(num_timesteps=10, beta_start=1e-3, beta_end=0.2))
    seen = {}
    step = optimizer.step
    def spy():
        seen["norm"] = torch.norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
        step()
    optimizer.step = spy
    labels = []
    net.register_forward_pre_hook(lambda m, inputs: labels.append(inputs[2]))
    args = SimpleNamespace(grad_clip=0.01, ema_decay=0.75, grad_accum=1)
    before = [p.detach().clone() for p in net.parameters()]
    x0, y = torch.rand(400, 3, 8, 8) * 2 - 1, torch.randint(0, 3, (400,))
    loss_fn = training.DiffusionLoss(diffusion, num_classes=3, p_uncond=0.3)
    _, grad_norm = training.train_step(net, ema, optimizer, loss_fn, x0, y, args)
    assert grad_norm > 0.02 and seen["norm"] <= 0.01 * (1 + 1e-4)
    dropped = labels[0] == 3
    assert 0.2 < dropped.float().mean() < 0.4 and torch.equal(labels[0][~dropped], y[~dropped])
    for e, p, b in zip(ema.parameters(), net.parameters(), before):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p, atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_is_the_big_batch():
    """--grad-accum k: the batch runs as k micro-batches with the batch's own random draws (t, eps, dropped
    labels), each backward scaled by its share, so the loss, the gradient norm, the updated weights (plain SGD, so
    the update is the gradient itself; Adam would magnify float noise in near-zero gradients) and the EMA equal one
    step on the whole batch to float error (dropout 0: dropout masks are drawn per pass)."""
    diffusion = build_diffusion(dict(num_timesteps=50, beta_start=1e-3, beta_end=0.2))
    x0, y = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.arange(12) % 3
    results = []
    for k in (1, 4):
        net = randomized(UNet(**dict(TINY_NET, num_classes=3)), seed=5).train()
        ema = copy.deepcopy(net).requires_grad_(False)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss_fn = training.DiffusionLoss(diffusion, num_classes=3, p_uncond=0.25)
        torch.manual_seed(1)
        loss, norm = training.train_step(net, ema, optimizer, loss_fn, x0, y,
                                         SimpleNamespace(grad_clip=1.0, ema_decay=0.9, grad_accum=k))
        results.append((loss, norm, net, ema))
    (l1, n1, net1, ema1), (l4, n4, net4, ema4) = results
    torch.testing.assert_close(l4, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n4, n1, rtol=1e-4, atol=1e-6)
    for a, b in zip(list(net1.parameters()) + list(ema1.parameters()), list(net4.parameters()) + list(ema4.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- runs

def test_short_run_writes_checkpoint_samples_and_log(good_run):
    """A 4-step CPU run writes a loadable checkpoint in the shared format, a valid PNG grid and the log lines."""
    ckpt = load_checkpoint(str(good_run))
    assert ckpt["step"] == 4 and ckpt["format"] == "ddpm-checkpoint-v1"
    assert ckpt["model_config"]["image_size"] == 8 and ckpt["diffusion_config"]["num_timesteps"] == 50
    assert set(ckpt["model"]) == set(ckpt["ema"]) and ckpt["args"]["steps"] == 4
    assert ckpt["model_config"]["group_channels"] == 4  # normalisation groups of 4 channels (docs/training.md)
    img = decode_png(good_run / "samples_0000004.png")
    assert img.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    # the warmup reached the optimizer: lr at the last update (step index 3) = lr * 3 / warmup, capped
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * min(3 / 2, 1))
    # the EMA (decay 0.9) trails the weights: from the same initial weights, it has moved less
    torch.manual_seed(0)
    init = UNet(**ckpt["model_config"]).state_dict()
    moved = {k: sum((ckpt[k][n] - init[n]).norm() ** 2 for n in init) for k in ("model", "ema")}
    assert 0 < moved["ema"] < moved["model"]
    log = (good_run / "log.txt").read_text()
    assert "step 2/4 | loss " in log and "img/s | eta" in log and "loss by t quartile: q0" in log
    assert not [p for p in os.listdir(good_run) if ".tmp" in p]


@pytest.mark.parametrize("grids, accum", [(0, 1), (3, 2)])
def test_resume_is_exact(tmp_path, grids, accum):
    """Training 6 steps straight equals 3 steps, then --resume for 3 more: same step count and the same
    weights, EMA and Adam state bit for bit (LR schedule, data order, RNG streams all restored). With grids
    (Algorithm 2, all T steps) drawn at the checkpoint steps too: drawing a grid never moves the training RNG;
    and with gradient accumulation."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--log-every", "3", "--ckpt-every", "3", "--sample-every", str(grids), "--sample-steps", "0",
              "--dropout", "0.1", "--grad-accum", str(accum)]
    assert run(*common, "--steps", "6", "--out", str(a)).returncode == 0
    assert run(*common, "--steps", "3", "--out", str(b)).returncode == 0
    r = run("--resume", str(b), "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3" in r.stdout and "step 6/6" in r.stdout
    assert (b / "samples_0000003.png").exists() == bool(grids)
    ca, cb = load_checkpoint(str(a)), load_checkpoint(str(b))
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), (key, name)
    for i, s in ca["optimizer"]["state"].items():
        assert all(torch.equal(s[k], cb["optimizer"]["state"][i][k]) for k in s)


def test_sample_grid_never_touches_the_training_random_state(monkeypatch):
    """Even a sampler that drew from the global RNG could not move a training run: training.sample_images restores
    the global random state (fork_rng) around the grid."""
    diffusion = build_diffusion(dict(num_timesteps=10, beta_start=1e-3, beta_end=0.2))
    ema = UNet(**dict(TINY_NET, image_size=8)).eval()
    monkeypatch.setattr(GaussianDiffusion, "p_sample", lambda self, model, x, t, *a, **k: (x + torch.randn_like(x),
                                                                                          x))
    before = torch.get_rng_state()
    draw = lambda model, shape, g: diffusion.p_sample_loop(model, shape, generator=g)
    training.sample_images(ema, draw, 2, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_flips_default_follows_the_data_and_is_announced(tmp_path, good_run):
    """Flips are the paper's augmentation for CIFAR-10; on a user's data (digits, letters) a mirror image can be
    another class, so there they are off unless --flip. Every run says which, and why, in its first lines."""
    np = pytest.importorskip("numpy")
    x, y = data.make_shapes(32, 8, 1, seed=3)
    np.savez(tmp_path / "mine.npz", x.numpy(), y.numpy())
    tiny = [a for a in TINY if a not in ("shapes",)]
    tiny[tiny.index("--data") + 1:tiny.index("--data") + 1] = [str(tmp_path / "mine.npz")]
    for extra, expect in (([], "horizontal flips off (the default for your own data, where a mirror image can "
                               "change the class"), (["--flip"], "horizontal flips on (--flip)")):
        r = run(*tiny, "--steps", "1", "--sample-every", "0", "--out", str(tmp_path / f"run{len(extra)}"), *extra)
        assert r.returncode == 0 and expect in r.stdout.splitlines()[1], r.stdout + r.stderr
        assert load_checkpoint(str(tmp_path / f"run{len(extra)}"))["args"]["flip"] == bool(extra)
    assert "horizontal flips on (the built-in shapes are mirror-symmetric)" in (good_run / "log.txt").read_text()


def test_user_npz_grayscale_16x16_class_conditional(tmp_path):
    """A user's .npz of grayscale 16x16 uint8 images (arr_0) with labels (arr_1) trains a small 1-channel,
    class-conditional net; the checkpoint's net follows the data."""
    np = pytest.importorskip("numpy")
    x, y = data.make_shapes(64, 16, 1, seed=3)
    np.savez(tmp_path / "gray.npz", x[..., 0].numpy(), y.numpy())  # N,H,W: channel dim left out
    r = run("--data", str(tmp_path / "gray.npz"), "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1",
            "--attn", "8", "--timesteps", "50", "--batch-size", "16", "--steps", "3", "--warmup", "1",
            "--class-cond", "--num-samples", "4", "--sample-steps", "2", "--device", "cpu",
            "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(tmp_path / "run"))
    cfg = ckpt["model_config"]
    assert (cfg["image_size"], cfg["in_channels"], cfg["num_classes"]) == (16, 1, 4)
    assert decode_png(tmp_path / "run" / "samples_0000003.png").shape[2] == 1


def test_images_that_are_not_square(tmp_path, capsys):
    """--image-size H,W: a file of 8x16 images trains an 8x16 network (image_size [8, 16] in the checkpoint), and
    sample.py draws 8x16 samples into the .npz and the grid; without it, a file that is not square is refused."""
    x = torch.cat([data.make_shapes(16, 8, 3, seed=3)[0]] * 2, dim=2)  # two shapes side by side: 8 x 16
    imagefiles.write_npz(str(tmp_path / "wide.npz"), {"arr_0": x})
    r = run(*TINY, "--data", tmp_path / "wide.npz", "--image-size", "8,16", "--steps", "2", "--sample-every", "2",
            "--sample-steps", "2", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(tmp_path / "run"))["model_config"]["image_size"] == [8, 16]
    assert decode_png(tmp_path / "run" / "samples_0000002.png").shape == (2 + 2 * 10, 2 + 2 * 18, 3)
    r = run_script("sample.py", tmp_path / "run", "-n", "3", "--steps", "2", "--device", "cpu", "--npz",
                   tmp_path / "s.npz", "--out", tmp_path / "s.png")
    assert r.returncode == 0 and read_npz(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 16, 3), r.stderr
    r = run(*TINY, "--data", tmp_path / "wide.npz", "--steps", "1", "--out", tmp_path / "square")
    assert "H = W and C = 1 or 3" in assert_one_line_error(r)


def test_metrics_csv_has_a_row_per_log_line(good_run):
    """Each log line's numbers are a row of metrics.csv beside log.txt: step, loss, lr, grad norm, img/s and the
    loss by timestep quartile, the same numbers the log prints."""
    rows = (good_run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,img_per_s,loss_q0,loss_q1,loss_q2,loss_q3" and len(rows) == 3
    step, loss = rows[2].split(",")[:2]
    line = next(l for l in (good_run / "log.txt").read_text().splitlines() if l.startswith("step 4/4"))
    assert step == "4" and f"loss {float(loss):.4f}" in line


def test_torchrun_two_cpu_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): trains with the global batch split, one writer: one
    checkpoint holding both ranks' RNG states, one log line per interval."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", TRAIN,
                        *TINY, "--steps", "4", "--log-every", "2", "--sample-every", "0", "--sample-steps", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=HERE, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.txt", "metrics.csv"]
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 4 and len(ckpt["rng"]["ranks"]) == 2
    assert not torch.equal(ckpt["rng"]["ranks"][0]["cpu"], ckpt["rng"]["ranks"][1]["cpu"])
    log = (out / "log.txt").read_text()
    assert "on 2 x cpu" in log and log.count("step 2/4 |") == 1 and log.count("step 4/4 |") == 1
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", TRAIN,
                        *TINY, "--batch-size", "7", "--steps", "1", "--out", str(tmp_path / "odd")],
                       capture_output=True, text=True, timeout=180, cwd=HERE, env=ENV)
    assert r.returncode != 0 and "not divisible by the 2 processes" in r.stdout + r.stderr


def test_torchrun_prepares_cifar10_once_and_fails_together(tmp_path):
    """CIFAR-10 on first use under torchrun: one process downloads and unpacks it, the others wait, then load it (a
    fake archive stands in for the download). A checkpoint that rank 0 cannot write (disk full) ends every rank at
    once with rank 0's line, instead of the others waiting in a collective for a rank that is gone."""
    buf, folder = io.BytesIO(), tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            f.write(py2_cifar_batch(bytes(8 * 3072), list(range(8))))  # as CIFAR-10 ships them, without numpy
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    (tmp_path / "fake.tar.gz").write_bytes(buf.getvalue())
    script = f"""
import hashlib, io, os, tarfile
import checkpoint, data, train
archive = open({str(tmp_path / "fake.tar.gz")!r}, "rb").read()
data.CIFAR10_MD5 = hashlib.md5(archive).hexdigest()
def fetch(url, timeout):
    open({str(tmp_path / "log")!r}, "a").write("download rank " + os.environ["RANK"] + "\\n")
    return io.BytesIO(archive)
data.urllib.request.urlopen = fetch
unpack = tarfile.open
def counted(*a, **k):
    open({str(tmp_path / "log")!r}, "a").write("unpack rank " + os.environ["RANK"] + "\\n")
    return unpack(*a, **k)
data.tarfile.open = counted
if os.environ["RANK"] == "0" and os.environ.get("FULL"):
    def full(path, write):
        raise OSError("could not write " + path + ": No space left on device (any previous ckpt.pt is intact)")
    checkpoint.atomic_write = full
train.main(sys.argv[1:])
"""
    import shutil
    shutil.rmtree(folder)
    common = [*TINY, "--data", "cifar10", "--data-dir", tmp_path / "data", "--steps", "2", "--sample-every", "0"]
    r = torchrun(tmp_path, script, *common, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "log").read_text().splitlines() == ["download rank 0", "unpack rank 0"]
    ENV["FULL"] = "1"
    try:
        r = torchrun(tmp_path, script, *common, "--out", tmp_path / "full", timeout=120)
    finally:
        del ENV["FULL"]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1 and "No space left" in lines[0], r.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_continues(tmp_path, sig, code):
    """SIGTERM (pre-emption) or Ctrl-C mid-run: the step finishes, a checkpoint is written, exit 0 or 130;
    --resume continues from that step."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, TRAIN, *TINY, "--steps", "100000", "--log-every", "1",
                          "--ckpt-every", "100000", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, env=ENV)
    deadline = time.time() + 60
    log = out / "log.txt"
    while time.time() < deadline and " 2/100000 |" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == code, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    step = load_checkpoint(str(out))["step"]
    assert 2 <= step < 100000
    if sig == signal.SIGINT:
        return  # the same resume as after SIGTERM
    r = run("--resume", str(out), "--steps", str(step + 2), "--log-every", "1")
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {step}" in r.stdout and f"step {step + 2}/{step + 2} |" in r.stdout
    assert load_checkpoint(str(out))["step"] == step + 2


# ---------------------------------------------------------------------------- bad input

def bad_files(tmp_path):
    np = pytest.importorskip("numpy")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    np.save(tmp_path / "float.npy", np.zeros((4, 8, 8, 3), np.float32))
    np.save(tmp_path / "nonsquare.npy", np.zeros((4, 8, 6, 3), np.uint8))
    np.save(tmp_path / "five.npy", np.zeros((4, 8, 8, 5), np.uint8))
    (tmp_path / "images.txt").write_text("hello")


@pytest.mark.parametrize("case,argv,expect", [
    ("unknown dataset", ["--data", "imagenet64"], "not cifar10, shapes, captions, a folder of images, or an existing"),
    ("unreadable file", ["--data", "{tmp}/junk.npz"], "cannot read"),
    ("wrong dtype", ["--data", "{tmp}/float.npy"], "must be uint8"),
    ("not square", ["--data", "{tmp}/nonsquare.npy"], "H = W and C = 1 or 3"),
    ("5 channels", ["--data", "{tmp}/five.npy"], "H = W and C = 1 or 3"),
    ("file type", ["--data", "{tmp}/images.txt"], "unsupported file type"),
    ("cuda without one", ["--device", "cuda"], "no CUDA device"),
    ("model flag conflicts", ["--ch", "64"], "conflicts with the checkpoint"),
    ("data don't fit the model", ["--data", "shapes", "--image-size", "16"], "conflicts with the checkpoint"),
    ("another data set", ["--data", "cifar10"], "--data cifar10 conflicts with the checkpoint"),
    ("a flag out of range", ["--ema-decay", "2"], "--ema-decay must be in [0, 1]"),
])
def test_bad_input_one_line_checkpoint_untouched(good_run, tmp_path, case, argv, expect):
    """Each bad input, given while resuming a good run, ends with one 'error:' line on stderr, a non-zero
    exit and no traceback, and the run's checkpoint is byte-for-byte unchanged."""
    if case == "cuda without one" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bad_files(tmp_path)
    before = sha(good_run / "ckpt.pt")
    r = run("--resume", str(good_run), "--steps", "6", *[a.format(tmp=tmp_path) for a in argv])
    assert expect in assert_one_line_error(r), case
    assert sha(good_run / "ckpt.pt") == before


def test_a_checkpoint_from_before_group_channels_resumes_with_its_32_groups(good_run, tmp_path):
    """A checkpoint written before --group-channels has no such key: its network has the paper's 32 groups, it
    resumes with them, and --group-channels 4 (the default for new runs) given now is a model flag that
    conflicts with it."""
    ckpt = load_checkpoint(str(good_run))
    del ckpt["model_config"]["group_channels"], ckpt["args"]["group_channels"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    r = run("--resume", str(tmp_path), "--steps", "5", "--group-channels", "4")
    assert "--group-channels 4 conflicts with the checkpoint (1)" in assert_one_line_error(r)
    r = run("--resume", str(tmp_path), "--steps", "5", "--sample-every", "0")
    assert r.returncode == 0, r.stderr
    resumed = load_checkpoint(str(tmp_path))
    assert resumed["args"]["group_channels"] == 1 and "group_channels" not in resumed["model_config"]


@pytest.mark.parametrize("argv, expect", [
    (["--lr", "-1"], "--lr must be positive"), (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
    (["--p-uncond", "2"], "--p-uncond must be in [0, 1]"), (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--class-cond", "--classifier"], "a --classifier always learns the labels"),
    (["--classifier", "--distill", "progressive"], "give one of them"),
    (["--low-res", "4", "--cond-aug-max", "5000"], "--cond-aug-max 5000 must be in 0..T = 50"),
    (["--low-res", "3"], "--low-res 3 must be below the data's size 8 and divide it"),
    (["--steps", "abc"], "argument --steps: invalid int value"), (["--seed", "-1"], "--seed must be in"),
    (["--cd-n", "1"], "--cd-n must be at least 2"), (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--sample-steps", "51"], "--sample-steps 51 is more than T = 50"),
    (["--ch", "48", "--group-channels", "1"], "multiple of 32"),
    (["--attn", "3"], "attn_resolutions"), (["--grad-accum", "3"], "not divisible by --grad-accum 3"),
    (["--batch-size", "20000"], "fewer than the batch of 20000"), (["--ch-mult", "1,0"], "positive integers"),
    (["--schedule", "sigmoid"], "invalid choice"), (["--timesteps", "0"], "--timesteps must be positive"),
    (["--student-dropout", "1"], "--student-dropout must be in [0, 1)"),
])
def test_bad_flags_are_one_line(argv, expect, tmp_path, capsys):
    """Every flag's range is checked where it is parsed (or where the data or the network first need it): one
    'error:' line, a non-zero exit, and no run folder left behind."""
    message = one_line_error(train.main, [*TINY, *argv, "--out", str(tmp_path / "x")], capsys)
    assert expect in message and not (tmp_path / "x").exists()


def test_a_super_resolution_stage_defaults_to_v_and_a_quarter_of_t_for_augmentation(tmp_path):
    """--low-res with T = 50 (the old fixed default 250 of --cond-aug-max was >= T): the augmentation levels default
    to T / 4, and the stage predicts v, the parameterisation measured to keep its colours (docs/resolution.md)."""
    r = run(*[a if a != "8" else "16" for a in TINY], "--low-res", "8", "--steps", "1", "--sample-every", "0",
            "--out", str(tmp_path / "sr"))
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(tmp_path / "sr"))
    assert ckpt["cond_aug_max"] == 12 and ckpt["diffusion_config"]["mean_type"] == "v"


def test_fresh_run_refuses_to_overwrite_and_corrupt_resume(good_run, tmp_path):
    """A new run into a folder with a checkpoint, and --resume from a truncated or foreign file, each end
    with one line; nothing is written."""
    before = sha(good_run / "ckpt.pt")
    assert "--resume" in assert_one_line_error(run(*TINY, "--steps", "2", "--out", str(good_run)))
    blob = (good_run / "ckpt.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    assert "corrupt or truncated" in assert_one_line_error(run("--resume", str(tmp_path / "truncated.pt")))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert "not a train.py checkpoint" in assert_one_line_error(run("--resume", str(tmp_path / "foreign.pt")))
    assert "no checkpoint at" in assert_one_line_error(run("--resume", str(tmp_path / "missing")))
    assert sha(good_run / "ckpt.pt") == before


@pytest.mark.parametrize("where", ["write", "rename"])
def test_full_disk_keeps_previous_checkpoint(good_run, tmp_path, monkeypatch, where):
    """ENOSPC while writing the checkpoint (mid-write, or at the rename): one line, the previous checkpoint
    is intact and loadable, no temporary file is left behind."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((good_run / "ckpt.pt").read_bytes())
    before = sha(run_dir / "ckpt.pt")
    if where == "write":
        def full_save(obj, f):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(torch, "save", full_save)
    else:
        def full_replace(src, dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "replace", full_replace)
    with pytest.raises(SystemExit, match="No space left on device.*intact"):
        in_process(["--resume", str(run_dir), "--steps", "5", "--ckpt-every", "1", "--sample-every", "0"])
    monkeypatch.undo()
    assert sha(run_dir / "ckpt.pt") == before and load_checkpoint(str(run_dir))["step"] == 4
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "log.txt", "metrics.csv"]


def test_nan_loss_stops_without_saving(good_run, tmp_path, monkeypatch):
    """If the loss turns NaN the run stops with a clear message and never writes the NaN model."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((good_run / "ckpt.pt").read_bytes())
    before = sha(run_dir / "ckpt.pt")
    losses = GaussianDiffusion.training_losses
    monkeypatch.setattr(GaussianDiffusion, "training_losses",
                        lambda self, *a, **k: losses(self, *a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="diverged.*intact"):
        in_process(["--resume", str(run_dir), "--steps", "8", "--ckpt-every", "1", "--log-every", "1"])
    assert sha(run_dir / "ckpt.pt") == before


@pytest.mark.parametrize("flags,p", [(["--class-cond"], 0.1), (["--class-cond", "--p-uncond", "0.3"], 0.3), ([], 0.0)])
def test_class_conditional_runs_drop_labels_at_p_uncond(flags, p):
    """The run train.py builds drops labels to the null class at --p-uncond (classifier-free guidance's training)
    when --class-cond is on, and never otherwise."""
    args, _, kind, _ = train.parse(["--data", "shapes", "--ch", "32", "--ch-mult", "1", "--num-res-blocks", "1",
                                    "--attn", "", "--timesteps", "100", "--out", "", *flags])
    images = data.make_shapes(8, 8, 3)[0]
    run = runs.build_run(kind, args, None, images, 4, torch.device("cpu"))
    assert run.objective.p_uncond == p


def test_mean_type_v_trains_and_samples(tmp_path):
    """--mean-type v: the checkpoint's diffusion predicts v (Salimans & Ho), and sample.py reads it as such."""
    r = run_script("train.py", *TINY, "--mean-type", "v", "--steps", "2", "--log-every", "1", "--sample-every",
                   "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(tmp_path / "run"))["diffusion_config"]["mean_type"] == "v"
    r = run_script("sample.py", tmp_path / "run", "-n", "2", "--steps", "3", "--device", "cpu", "--out",
                   tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
