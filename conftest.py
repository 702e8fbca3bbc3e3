"""Settings and helpers shared by the test files (no test file imports another)."""
import contextlib
import importlib
import io
import math
import os
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import settings, strategies as st

from ddpm import make_beta_schedule
from imagefiles import read_npy
from unet import UNet

# Hypothesis settings: in CI (CI=true) every run draws the same examples, so a red build is reproducible.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=12, deadline=None)  # Monte Carlo tests

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny nets gain nothing from a second thread, and on a busy machine OpenMP threads spin-wait for each
# other and make a step 100x slower: the subprocesses get one thread each.
ENV = dict(os.environ, OMP_NUM_THREADS="1")

# train.py on a tiny net on 8x8 built-in shapes with T = 50: each step takes milliseconds
TRAIN_TINY = ["--data", "shapes", "--image-size", "8", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1",
              "--attn", "", "--timesteps", "50", "--batch-size", "8", "--warmup", "2", "--ema-decay", "0.9",
              "--num-samples", "4", "--device", "cpu"]

# a tiny net (8x8) and train.py's schedule for T = 100 (the paper's linear betas scaled by 1000 / T)
TINY_NET = dict(image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
TINY_DIFFUSION = dict(schedule="linear", num_timesteps=100, beta_start=1e-3, beta_end=0.2, mean_type="eps",
                      var_type="fixedlarge")


def run_script(script, *args, timeout=120, real=False):
    """python SCRIPT ARGS, as the command line runs: its main(argv) in this process, one thread, stdout and stderr
    captured and an exit's message on stderr, as a CompletedProcess (a fresh interpreter would spend most of a
    tiny run importing torch); real=True, or a script without a main: in a subprocess from the repository."""
    name = script[:-3]
    if real or name not in ("train", "sample", "evaluate", "metrics", "bench_samplers"):
        return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, cwd=HERE, env=ENV)
    main = importlib.import_module(name).main
    handlers, threads = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def torchrun(tmp_path, script, *args, timeout=180, procs=2):
    """python -m torch.distributed.run --nproc_per_node=2 (gloo, CPU) on a script: a file of python to run in each
    process (from the repository, so it can patch a module and call train.main or sample.main), or train.py or
    sample.py themselves."""
    if not script.endswith(".py"):
        path = tmp_path / "script.py"
        path.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\n" + script)
        script = str(path)
    else:
        script = os.path.join(HERE, script)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone",
                           script, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=ENV)


def in_process(argv, stop_after=None):
    """train.main(argv) in this process, on one thread, restoring the signal handlers it installs. stop_after=k:
    SIGTERM arrives during update k (raised from the EMA update, training.update_ema), as a pre-emption would: the
    run finishes the step, checkpoints and stops."""
    import train
    import training
    handlers, threads = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV does for the subprocesses; restored below
    update, calls = training.update_ema, [0]
    def counted(*a, **k):
        update(*a, **k)
        calls[0] += 1
        if calls[0] == stop_after:
            signal.raise_signal(signal.SIGTERM)
    training.update_ema = counted
    try:
        train.main(argv)
    finally:
        training.update_ema = update
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def one_line_error(main, argv, capsys):
    """main(argv) in this process on bad input: it exits non-zero with one 'error:' line (an argparse error on
    stderr, or the SystemExit message). Returns the line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(message.splitlines()) == 1 and message.startswith("error:"), message
    return message


def assert_one_line_error(r):
    """Bad input: non-zero exit, one line on stderr, no traceback. Returns the line."""
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def randomized(net, seed=0):
    """The original init makes every residual branch and the output ~0 (so every sample would be alike, and
    differences inside the branches would not show): re-draw conv/linear/embedding weights with PyTorch's
    default init and jitter the norms. Returns the net in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                m.reset_parameters()
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return net.eval()


def write_checkpoint(path, num_classes=None, args=None):
    """A train.py checkpoint of a randomized TINY_NET (EMA and raw weights different). Returns the EMA net."""
    model = randomized(UNet(**TINY_NET, num_classes=num_classes), seed=0)
    ema = randomized(UNet(**TINY_NET, num_classes=num_classes), seed=1)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "step": 3,
                "model_config": model.config, "diffusion_config": TINY_DIFFUSION, "args": args or {}, "rng": {},
                "format": "ddpm-checkpoint-v1"}, path)
    return ema


def read_npz(path):
    """The arrays of an .npz read back with the standard library (imagefiles.read_npy), checked to be what numpy.savez
    writes (uncompressed); a record.json beside them is not an array."""
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        return {n[:-4]: read_npy(io.BytesIO(z.read(n))) for n in z.namelist() if n.endswith(".npy")}


def decode_png(path):
    """Minimal PNG reader for what imagefiles.save_grid writes (8-bit grey or RGB, filter 0): -> uint8 (H, W, C)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour in (0, 2) and b"IEND" in chunks
    c = 1 if colour == 0 else 3
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + w * c)
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, 1 + w * c)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, c)


# ---- the math tests' strategies and independent references (computed in float64 from the betas) ----

@st.composite
def schedules(draw, min_t=2, max_t=300):
    """Betas (float64) from the paper's linear schedule, cosine, constant, or random increasing.
    Betas stay <= 0.2 so that abar_T (>= 0.8^300) is a normal float32 number."""
    kind = draw(st.sampled_from(["linear", "cosine", "const", "random"]))
    T = draw(st.integers(min_t, max_t))
    if kind == "linear":
        start = draw(st.floats(1e-5, 1e-2))
        end = draw(st.floats(start, 0.2))
        return make_beta_schedule("linear", T, start, end)
    if kind == "cosine":
        return make_beta_schedule("cosine", T)
    if kind == "const":
        return make_beta_schedule("const", T, beta_end=draw(st.floats(1e-4, 0.2)))
    betas = draw(st.lists(st.floats(1e-5, 0.2), min_size=T, max_size=T))
    return torch.tensor(sorted(betas), dtype=torch.float64)


def destroying_schedules():
    """Schedules whose abar_T is tiny: the paper's, cosine, and strong constant ones."""
    return st.one_of(st.just(make_beta_schedule("linear", 1000)),
                     st.integers(50, 1000).map(lambda T: make_beta_schedule("cosine", T)),
                     st.integers(200, 1000).map(lambda T: make_beta_schedule("const", T, beta_end=0.05)))


def chain_moments(betas, mean0, var0):
    """Iterate Eq. (2), q(x_t|x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t I), on the first two
    moments: m_t = sqrt(1-beta_t) m_{t-1}, v_t = (1-beta_t) v_{t-1} + beta_t. Returns lists."""
    means, variances, m, v = [], [], mean0, var0
    for beta in betas.tolist():
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
        means.append(m)
        variances.append(v)
    return means, variances


def full(n, i):
    return torch.full((n,), i, dtype=torch.long)


def gaussian_logpdf(x, mean, var):
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


def oracle(betas, x0, mean_type):
    """A network that knows x_0: returns the exact noise (x_t - sqrt(abar_t) x_0)/sqrt(1-abar_t), x_0 itself, or
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (computed in float64 from the betas)."""
    abar = torch.cumprod(1 - betas, 0)

    def model(x_t, t):
        if mean_type == "x0":
            return x0.to(x_t.dtype)
        a = abar[t].view(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if mean_type == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0).to(x_t.dtype)
    return model


# what test_unet.py and test_pretrained.py share: the released checkpoint's key list (committed here, so that a
# clone alone runs the whole suite), a small network, inputs, and the paper's network with randomized weights
KEYS_FILE = Path(__file__).resolve().parent / "assets" / "ddpm_cifar10_keys.txt"
TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def inputs(batch, channels=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.fixture(scope="module")
def cifar_net():
    """The default UNet() (the paper's CIFAR-10 net) with randomized weights, built once for the module."""
    return randomized(UNet())


def py2_cifar_batch(raw, labels):
    """Bytes as Python 2's cPickle (protocol 2) wrote the CIFAR-10 batches: a dict holding a numpy uint8
    array (n, 3072) rebuilt by numpy.core.multiarray._reconstruct, its bytes a BINSTRING, and a label list."""
    def s(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01K" + bytes([len(labels)]) + b"M\x00\x0c\x86"  # version 1, shape (n, 3072)
             + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
             + b"\x89" + s(raw) + b"tb")  # fortran False, raw bytes
    return (b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels)
            + b"e" + s(b"batch_label") + s(b"training batch") + b"u.")
