"""The fast paths change no result beyond float tolerance (issue 5): one training step of train.py and one
sampling step of Algorithm 2, with each fast path that applies on a CPU on and off (SDPA vs explicit attention,
channels_last vs contiguous, foreach EMA vs a per-parameter loop, foreach/fused Adam vs a per-parameter Adam,
torch.compile of the network, of the step's loss and of sampling on request); resuming across memory layouts;
smoke tests of bench.py. Tiny nets, CPU, a few seconds (compile: minutes, opt-in)."""
import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import bench
import training
from checkpoint import build_diffusion, load_checkpoint
from conftest import TRAIN_TINY, randomized, read_npz, run_script, write_checkpoint
from training import train_step
from unet import AttnBlock, UNet

HERE = Path(__file__).resolve().parent
# ch 64: two channels per GroupNorm group (with one, a per-channel bias has an exactly zero gradient, and Adam
# turns its float noise into a step of up to lr). dropout 0: masks are drawn in memory order, so channels_last
# would drop different units.
TINY = dict(image_size=16, ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
STEP_ARGS = SimpleNamespace(grad_clip=1.0, ema_decay=0.9, grad_accum=1)  # a fast EMA, so it moves


def randomized_net(seed=0):
    return randomized(UNet(**TINY), seed).train()


def plain_update_ema(ema, model, decay):
    """The EMA written out per parameter: ema <- decay * ema + (1 - decay) * model."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.copy_(decay * e + (1 - decay) * p)


def adam(params, fast):
    """fast: fused Adam where this torch has a CPU kernel, else foreach; slow: the per-parameter loop. eps 1e-3, not
    the paper's 1e-8: Adam's first step is lr * g / (|g| + eps), i.e. +-lr for any |g| >> eps, so with 1e-8 a gradient
    within float noise of zero (1e-9 here, 1e-9 there) moves its weight by up to 2 lr either way; that is Adam, not
    a fast path, and a larger eps makes the step smooth in g so the comparison below can be tight."""
    kw = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-3)
    if not fast:
        return torch.optim.Adam(params, foreach=False, **kw)
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except RuntimeError:  # torch < 2.4: no fused Adam on the CPU
        return torch.optim.Adam(params, foreach=True, **kw)


def run_train_step(fast, monkeypatch, compile=False):
    """One train.py step from the same weights, batch and seed, with the CPU fast paths all on or all off."""
    monkeypatch.setattr(AttnBlock, "use_sdpa", fast)
    monkeypatch.setattr(training, "update_ema", training.update_ema if fast else plain_update_ema)
    model = randomized_net().to(memory_format=torch.channels_last if fast else torch.contiguous_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = adam(model.parameters(), fast)
    diffusion = build_diffusion(dict(num_timesteps=100, beta_start=1e-3, beta_end=0.2))
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # NCHW either way: same noise
    torch.manual_seed(2)
    loss_fn = training.DiffusionLoss(diffusion, bf16=True)
    losses = torch.compile(loss_fn.__call__) if compile else loss_fn
    loss, grad_norm = train_step(model, ema, optimizer, loss_fn, x0, None, STEP_ARGS, None, losses)
    monkeypatch.undo()
    return loss, grad_norm, model, ema


def test_train_step_same_with_fast_paths_on_and_off(monkeypatch):
    """train_step with SDPA, channels_last, foreach EMA and fused/foreach Adam gives the loss, gradient norm,
    weights and EMA weights of the same step with explicit attention, NCHW, and per-parameter loops."""
    slow = run_train_step(False, monkeypatch)
    fast = run_train_step(True, monkeypatch)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-4, atol=1e-6)
    before = dict(randomized_net().named_parameters())
    moved = 0
    for (name, p_fast), p_slow, e_fast, e_slow in zip(fast[2].named_parameters(), slow[2].parameters(),
                                                      fast[3].parameters(), slow[3].parameters()):
        torch.testing.assert_close(p_fast, p_slow, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(e_fast, e_slow, rtol=1e-5, atol=1e-7, msg=name)
        moved += int((p_slow - before[name]).abs().max() > 2e-5)  # the step did something to compare
    assert moved > len(before) // 2


def test_sampling_step_same_with_fast_paths_on_and_off(monkeypatch):
    """One step of Algorithm 2 (diffusion.p_sample, same x_t, t and z) from the same network gives the same
    x_{t-1} with SDPA + channels_last as with explicit attention + NCHW."""
    diffusion = build_diffusion(dict(num_timesteps=100, beta_start=1e-3, beta_end=0.2))
    g = torch.Generator().manual_seed(3)
    x_t, z = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([99, 50, 1, 0])  # the last step (index 0) adds no noise
    out = {}
    for fast in (False, True):
        monkeypatch.setattr(AttnBlock, "use_sdpa", fast)
        net = randomized_net().eval().to(memory_format=torch.channels_last if fast else torch.contiguous_format)
        with torch.no_grad():
            out[fast] = diffusion.p_sample(lambda x, t: net(x, t), x_t, t, z)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out[False], x_t)


def test_foreach_ema_matches_loop():
    """training.update_ema (one foreach lerp) equals the per-parameter formula."""
    a, b = randomized_net(0), randomized_net(1)
    ema_fast, ema_slow = copy.deepcopy(a), copy.deepcopy(a)
    training.update_ema(ema_fast, b, 0.9999)
    plain_update_ema(ema_slow, b, 0.9999)
    for e_fast, e_slow in zip(ema_fast.parameters(), ema_slow.parameters()):
        torch.testing.assert_close(e_fast, e_slow, rtol=1e-6, atol=1e-7)


def test_resumed_adam_follows_the_parameter_layout():
    """A checkpoint saved in one layout (NCHW) and resumed in the other (--channels-last): after
    training.match_layout, the fused Adam step equals the step taken without the switch. (Without it, fused Adam
    pairs moments and weights by memory order and the step is wrong, silently.)"""
    g = torch.Generator().manual_seed(4)
    w0, g1, g2 = (torch.randn(8, 4, 3, 3, generator=g) for _ in range(3))
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-3)
    ref = nn.Parameter(w0.clone())
    opt = adam([ref], fast=True)
    opt.param_groups[0].update(kw)
    ref.grad = g1.clone()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # NCHW moments, as a checkpoint holds them
    resumed = nn.Parameter(ref.detach().clone().contiguous(memory_format=torch.channels_last))
    opt2 = adam([resumed], fast=True)
    opt2.load_state_dict(saved)
    training.match_layout(opt2)
    assert all(v.stride() == resumed.stride() for v in opt2.state[resumed].values() if v.shape == resumed.shape)
    ref.grad, resumed.grad = g2.clone(), g2.contiguous(memory_format=torch.channels_last)
    opt.step()
    opt2.step()
    torch.testing.assert_close(resumed.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert (ref.detach() - w0).abs().min() > 0.01  # both steps moved every weight


def test_channels_last_run_resumes_without_it(tmp_path):
    """train.py --channels-last trains, checkpoints and resumes with --no-channels-last (and the saved weights
    load into a plain NCHW net)."""
    run = lambda *args: run_script("train.py", *args)
    r = run(*TRAIN_TINY, "--attn", "4", "--sample-every", "0", "--log-every", "2", "--steps", "2", "--channels-last",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run("--resume", str(tmp_path), "--steps", "4", "--no-channels-last")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 4 and "step 4/4" in r.stdout
    UNet(**ckpt["model_config"]).load_state_dict(ckpt["ema"])


COMPILE = pytest.mark.skipif(not os.environ.get("DDPM_TEST_COMPILE"), reason="torch.compile of even a one-level "
                             "U-Net takes ~100 s on a 2-core CPU (measured), over the test budget; DDPM_TEST_COMPILE=1")


@COMPILE
def test_compiled_network_matches():
    """torch.compile changes no result: forward and gradients of the compiled net match eager."""
    net = randomized_net()
    compiled = torch.compile(copy.deepcopy(net))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    out_eager, out_compiled = net(x, t), compiled(x, t)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in net.parameters())  # float noise scales with the gradients
    for p, q in zip(net.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6 * scale)


@COMPILE
def test_compiled_train_step_matches(monkeypatch):
    """train.py --compile (the loss compiled whole: q_sample, network, L_simple) gives the loss, gradient norm and
    weights of the eager step (the random draws happen before, in eager mode, the same either way)."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    eager = run_train_step(False, monkeypatch)
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    compiled = run_train_step(False, monkeypatch, compile=True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-3, atol=1e-6)
    for p_c, p_e in zip(compiled[2].parameters(), eager[2].parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)


@COMPILE
def test_sample_compile_same_samples(tmp_path, capsys):
    """sample.py --compile draws the samples sample.py draws (uint8, off by at most one level where a float
    lands next to a rounding boundary)."""
    import sample
    write_checkpoint(str(tmp_path / "ckpt.pt"))
    files = {}
    for extra in ([], ["--compile"]):
        npz = str(tmp_path / f"s{len(extra)}.npz")
        sample.main([str(tmp_path / "ckpt.pt"), "--n", "3", "--steps", "10", "--device", "cpu", "--npz", npz,
                     "--out", str(tmp_path / "g.png"), *extra])
        files[bool(extra)] = read_npz(npz)["arr_0"].int()
    assert (files[True] - files[False]).abs().max() <= 1
    assert "wrote" in capsys.readouterr().out


@COMPILE
def test_compiler_fuses_groupnorm_and_silu():
    """The fusion of GroupNorm with the SiLU after it is left to the compiler, since it does it: in a compiled
    residual block (norm1 -> SiLU -> conv1, norm2 -> SiLU -> conv2), every kernel that normalizes also applies
    the SiLU, and no kernel applies a SiLU alone."""
    import re
    from torch._inductor.utils import run_and_get_code
    from unet import ResnetBlock
    block = ResnetBlock(64, 64, 256, dropout=0.0).eval()
    x, temb = torch.randn(2, 64, 8, 8), torch.randn(2, 256)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(block), x, temb)
        torch.testing.assert_close(out, block(x, temb), rtol=1e-4, atol=1e-5)
    kernels = set(re.findall(r"cpp_fused_\w+|triton_\w+_fused_\w+", "\n".join(codes)))
    norms = [k for k in kernels if "group_norm" in k]
    assert norms and all("silu" in k for k in norms), kernels
    assert not any("silu" in k and "group_norm" not in k for k in kernels), kernels


def test_bench_command_runs():
    """`python bench.py --device cpu --batch-size 2 --iters 1 --warmup 1` (with the tiny net) prints img/s."""
    r = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--small", "--batch-size", "2", "--iters", "1",
                        "--warmup", "1", "--rounds", "1"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout and "TFLOP/s" in r.stdout and "peak memory" in r.stdout


def test_bench_compare_runs(capsys, monkeypatch):
    """--compare (tiny net, fast paths off where they can be) prints both implementations and the ratio; the
    diffusers net built from our config has the same parameter count and computes the same eps."""
    pytest.importorskip("diffusers")
    monkeypatch.setattr(AttnBlock, "use_sdpa", AttnBlock.use_sdpa)  # main() sets it; restored afterwards
    bench.main(["--device", "cpu", "--small", "--batch-size", "2", "--iters", "1", "--warmup", "0", "--rounds", "2",
                "--compare", "--no-sdpa", "--channels-last"])
    out = capsys.readouterr().out
    assert "| ours |" in out and "| diffusers |" in out and "| ratio ours/diffusers" in out
    eps_diff = float(out.split("max |eps_ours - eps_diffusers| = ")[1].split()[0])
    assert eps_diff < 1e-4


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "--batch-size must be positive"),
                                           (["--device", "tpu"], "device")])
def test_bench_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(["--small"] + argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpu_check_dry_run(tmp_path):
    """gpu_check.py, the one command that runs every CUDA path on a GPU, runs its rows on a CPU with a tiny net
    (--dry-run): every kind of run, resume and sampling pass, and the checks that need CUDA say so."""
    r = run_script("gpu_check.py", "--dry-run", "--device", "cpu", "--out", tmp_path / "runs", "--table",
                   tmp_path / "table.md", timeout=600)
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout + r.stderr
    rows = (tmp_path / "table.md").read_text().splitlines()[2:]
    assert len(rows) == 11 and all(row.count(" | ") == 2 for row in rows)
    assert "sync audit: host syncs (CUDA only) | skipped" in r.stdout
    message = run_script("gpu_check.py", "--device", "cpu")  # a real check needs CUDA: one line
    assert message.returncode != 0 and message.stderr.strip().startswith("error: the GPU check runs on CUDA")

