"""Tests for sample.py: PNG grid and FID .npz of the requested count and shape, same seed -> identical files,
DDIM with fewer steps, the trajectory strip, labels of class-conditional samples, bad input ending in one clear
line, two processes writing the one-process file, and an interrupted run that resumes. Tiny nets (8x8, T=100)."""
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import sample
from checkpoint import build_diffusion
from conftest import ENV, HERE, TINY_DIFFUSION as DIFFUSION, one_line_error, read_npz, run_script, write_checkpoint
from imagefiles import to_uint8, write_npz


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run") / "ckpt.pt")
    write_checkpoint(path)
    return path


def png_size(path):
    with open(path, "rb") as f:
        data = f.read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # width, height


def run(argv, capsys):
    sample.main([*argv, "--device", "cpu"])
    return capsys.readouterr().out


def test_grid_and_npz_count_and_shape(ckpt, tmp_path, capsys):
    """--n 5 in batches of 2 gives 5 uint8 samples N,H,W,C under arr_0 and a PNG grid of all of them."""
    out = run([ckpt, "--n", "5", "--batch-size", "2", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")],
              capsys)
    arrays = read_npz(tmp_path / "s.npz")
    assert list(arrays) == ["arr_0"] and arrays["arr_0"].shape == (5, 8, 8, 3) and arrays["arr_0"].dtype == torch.uint8
    assert png_size(tmp_path / "g.png") == (2 + 3 * 10, 2 + 2 * 10)  # 3 columns, 2 rows of 8x8 with 2-pixel padding
    assert out.count("img/s") == 3 and "Algorithm 2, 100 steps" in out


def test_npz_loads_in_numpy(ckpt, tmp_path, capsys):
    """FID tools read the file with numpy.load: same array, same dtype."""
    np = pytest.importorskip("numpy")
    run([ckpt, "--n", "3", "--steps", "5", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")], capsys)
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (3, 8, 8, 3)
        assert (torch.from_numpy(d["arr_0"]) == read_npz(tmp_path / "s.npz")["arr_0"]).all()
    labels = torch.tensor([3, 0, 2**40])
    write_npz(str(tmp_path / "l.npz"), {"arr_0": torch.zeros(2, 1, 1, 1, dtype=torch.uint8), "arr_1": labels})
    with np.load(tmp_path / "l.npz") as d:
        assert d["arr_1"].tolist() == labels.tolist() and d["arr_0"].shape == (2, 1, 1, 1)


def test_same_seed_identical_files(ckpt, tmp_path, capsys):
    """The same seed gives the same PNG and .npz byte for byte; another seed gives other samples."""
    def files(tag, seed):
        run([ckpt, "--n", "3", "--batch-size", "2", "--seed", str(seed), "--out", str(tmp_path / f"{tag}.png"),
             "--npz", str(tmp_path / f"{tag}.npz")], capsys)
        return (tmp_path / f"{tag}.png").read_bytes(), (tmp_path / f"{tag}.npz").read_bytes()
    assert files("a", 7) == files("b", 7)
    assert files("c", 8)[1] != files("a", 7)[1]
    run([ckpt, "--n", "2", "--batch-size", "1", "--seed", "7", "--out", str(tmp_path / "d.png"), "--npz",
         str(tmp_path / "d.npz")], capsys)
    images = read_npz(tmp_path / "d.npz")["arr_0"]  # batch 1 has a seed of its own, not batch 0's again
    assert not (images[1] == images[0]).all()


def test_ema_default_and_no_ema(ckpt, tmp_path, capsys):
    """The EMA weights are the default: the samples equal Algorithm 2 run here with the EMA net and the batch's
    seed; --no-ema samples the raw weights instead."""
    ema = write_checkpoint(str(tmp_path / "ckpt.pt"))
    run([str(tmp_path), "--n", "2", "--seed", "3", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "e.npz")],
        capsys)
    diffusion = build_diffusion(DIFFUSION)
    g = torch.Generator().manual_seed(3 * 1_000_003)
    expected = to_uint8(diffusion.p_sample_loop(lambda x, t: ema(x, t), (2, 3, 8, 8), generator=g))
    assert torch.equal(read_npz(tmp_path / "e.npz")["arr_0"], expected)
    run([str(tmp_path), "--n", "2", "--seed", "3", "--no-ema", "--out", str(tmp_path / "g.png"),
         "--npz", str(tmp_path / "r.npz")], capsys)
    assert not torch.equal(read_npz(tmp_path / "r.npz")["arr_0"], expected)


def test_ddim_fewer_steps(ckpt, tmp_path, capsys):
    """--steps 50 with T = 100 samples with DDIM (eta 0: deterministic), and --eta 1 adds noise."""
    out = run([ckpt, "--n", "2", "--steps", "50", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "d.npz")],
              capsys)
    assert "DDIM eta 0.0, 50 steps (trailing spacing)" in out and "| 50 steps |" in out
    assert read_npz(tmp_path / "d.npz")["arr_0"].shape == (2, 8, 8, 3)
    run([ckpt, "--n", "2", "--steps", "50", "--eta", "1", "--out", str(tmp_path / "g.png"),
         "--npz", str(tmp_path / "e.npz")], capsys)
    assert not torch.equal(read_npz(tmp_path / "e.npz")["arr_0"], read_npz(tmp_path / "d.npz")["arr_0"])


def test_trajectory_strip(ckpt, tmp_path, capsys):
    """--trajectory: x_t and predicted x0 rows for the first 3 samples at 10 steps -> a 10 x 6 strip."""
    run([ckpt, "--n", "3", "--trajectory", str(tmp_path / "t.png"), "--out", str(tmp_path / "g.png")], capsys)
    assert png_size(tmp_path / "t.png") == (2 + 10 * 10, 2 + 6 * 10)


def test_guided_npz_has_labels(tmp_path, capsys):
    """--class 0,2 on a class-conditional checkpoint: labels under arr_1, spread evenly, one grid row per class."""
    write_checkpoint(str(tmp_path / "c.pt"), num_classes=3)
    run([str(tmp_path / "c.pt"), "--n", "5", "--steps", "4", "--class", "0,2", "--guidance", "2",
         "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")], capsys)
    arrays = read_npz(tmp_path / "s.npz")
    assert arrays["arr_1"].tolist() == [0, 0, 0, 2, 2] and arrays["arr_0"].shape == (5, 8, 8, 3)
    assert png_size(tmp_path / "g.png") == (2 + 3 * 10, 2 + 2 * 10)  # rows of 3 (the second padded)

# ---- bad input: one line, non-zero exit, no traceback


def test_bad_files_one_line_subprocess(ckpt, tmp_path):
    """From the command line: a missing, a truncated and a foreign checkpoint each end with one 'error:' line."""
    data = open(ckpt, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pt")
    for path, expect in ((tmp_path / "missing.pt", "no checkpoint"), (tmp_path / "trunc.pt", "truncated"),
                         (tmp_path / "foreign.pt", "neither a train.py checkpoint nor released")):
        r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), str(path), "--device", "cpu"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr


@pytest.mark.parametrize("case", ["text_file", "truncated_safetensors", "state_dict_of_other_net", "empty_folder",
                                  "steps_above_T", "class_on_unconditional", "class_out_of_range", "guidance_no_class",
                                  "zero_n", "out_folder_missing", "consistency_level_zero", "seed_negative",
                                  "eta_negative", "sampler_unknown", "steps_not_a_number", "resume_without_npz",
                                  "restart_too_few_steps", "restart_with_eta", "sde_eta_above_one"])
def test_bad_input_one_line(case, ckpt, tmp_path, capsys):
    """Each mistake ends in SystemExit with one 'error:' line (the __main__ guard only adds Ctrl-C handling)."""
    cond = str(tmp_path / "cond.pt")
    write_checkpoint(cond, num_classes=4)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    (tmp_path / "empty").mkdir()
    argv = {"text_file": [str(tmp_path / "notes.txt")], "truncated_safetensors": [str(tmp_path / "w.safetensors")],
            "state_dict_of_other_net": [str(tmp_path / "other.pt")], "empty_folder": [str(tmp_path / "empty")],
            "steps_above_T": [ckpt, "--steps", "101"], "class_on_unconditional": [ckpt, "--class", "1"],
            "class_out_of_range": [cond, "--class", "1,4"], "guidance_no_class": [cond, "--guidance", "2"],
            "zero_n": [ckpt, "--n", "0"], "out_folder_missing": [ckpt, "--npz", str(tmp_path / "no" / "s.npz")],
            "consistency_level_zero": [ckpt, "--consistency-last", "0"], "seed_negative": [ckpt, "--seed", "-3"],
            "eta_negative": [ckpt, "--eta", "-1"], "sampler_unknown": [ckpt, "--sampler", "euler"],
            "steps_not_a_number": [ckpt, "--steps", "ten"], "resume_without_npz": [ckpt, "--resume"],
            "restart_too_few_steps": [ckpt, "--sampler", "restart", "--steps", "3"],
            "restart_with_eta": [ckpt, "--sampler", "restart", "--steps", "10", "--eta", "1"],
            "sde_eta_above_one": [ckpt, "--sampler", "dpm++", "--eta", "2"]}[case]
    one_line_error(sample.main, [*argv, "--device", "cpu", "--out", str(tmp_path / "g.png")], capsys)
    assert not (tmp_path / "g.png").exists()

# ---- many processes, interruption, resume


def test_two_processes_write_the_one_process_file(ckpt, tmp_path):
    """torchrun --nproc_per_node=2 sample.py (gloo, CPU): the batches are shared out by index and gathered, so the
    .npz (labels too) is byte for byte the one a single process writes with the same seed."""
    common = [str(ckpt), "-n", "7", "--batch-size", "2", "--steps", "5", "--device", "cpu", "--seed", "3"]
    one = run_script("sample.py", *common, "--npz", tmp_path / "one.npz", "--out", tmp_path / "one.png")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          os.path.join(HERE, "sample.py"), *common, "--npz", str(tmp_path / "two.npz"),
                          "--out", str(tmp_path / "two.png")], capture_output=True, text=True, timeout=300,
                         cwd=HERE, env=ENV)
    assert two.returncode == 0, two.stdout + two.stderr
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    assert "2 x cpu" in two.stdout and two.stdout.count("wrote") == 2  # rank 0 alone reports and writes


def test_torchrun_sampling_killed_keeps_its_finished_batches(ckpt, tmp_path):
    """Under torchrun each finished batch reaches the disk as it finishes: a run killed outright (SIGKILL, as after a
    pre-emption's grace period) keeps what its processes finished, --resume (here with one process) draws the rest,
    and the file equals an uninterrupted one-process run's."""
    common = [ckpt, "-n", "48", "--batch-size", "2", "--steps", "25", "--device", "cpu", "--seed", "5"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          os.path.join(HERE, "sample.py"), *common, "--npz", str(tmp_path / "s.npz"),
                          "--out", str(tmp_path / "s.png")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=HERE, env=ENV)
    parts = tmp_path / "s.npz.parts"
    finished = lambda: len([f for f in os.listdir(parts) if f.startswith("batch") and f.endswith(".npz")])  # no .tmp
    while not parts.exists() or finished() < 4:
        assert p.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    for pid in os.listdir("/proc"):  # the agent and its workers (which torchrun starts in sessions of their own)
        try:
            if pid.isdigit() and str(parts)[:-6].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    p.wait()
    kept = finished()
    assert 4 <= kept < 24 and not (tmp_path / "s.npz").exists()
    r = run_script("sample.py", *common, "--npz", tmp_path / "s.npz", "--out", tmp_path / "s.png", "--resume",
                   timeout=600)
    assert r.returncode == 0 and "resuming: " in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.split("resuming: ")[1].split()[0]) >= 8
    full = run_script("sample.py", *common, "--npz", tmp_path / "full.npz", "--out", tmp_path / "full.png",
                      timeout=600)
    assert full.returncode == 0
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "full.npz").read_bytes()


def test_interrupted_sampling_keeps_its_batches_and_resumes(ckpt, tmp_path):
    """Ctrl-C during a long run: the batch in flight finishes, the finished batches go to --npz (a valid file of
    whole batches), the count is said, exit 130; --resume then draws the rest, and the file equals an
    uninterrupted run's. Progress lines carry an ETA."""
    common = [ckpt, "--n", "48", "--batch-size", "4", "--steps", "20", "--device", "cpu"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py"), *common, "--npz", str(tmp_path / "s.npz"),
                          "--out", str(tmp_path / "s.png")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=HERE, env=ENV)
    lines = []
    while not any(l.startswith("batch") and l.split()[1].startswith("3/") for l in lines):
        lines.append(p.stdout.readline())
        assert lines[-1], p.stderr.read()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "eta" in lines[-1]
    kept = read_npz(tmp_path / "s.npz")["arr_0"]
    assert len(kept) % 4 == 0 and 12 <= len(kept) < 48
    assert f"stopped: {len(kept)} of 48 samples are in" in out and "--resume" in out
    r = run_script("sample.py", *common, "--npz", tmp_path / "s.npz", "--out", tmp_path / "s.png", "--resume",
                   timeout=600)
    assert r.returncode == 0 and f"resuming: {len(kept)} samples of 48" in r.stdout, r.stdout + r.stderr
    full = run_script("sample.py", *common, "--npz", tmp_path / "full.npz", "--out", tmp_path / "full.png",
                      timeout=600)
    assert full.returncode == 0
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "full.npz").read_bytes()


def test_resume_refuses_samples_of_another_run(ckpt, tmp_path, capsys):
    """An .npz records what made it (the weights' fingerprint, sampler, steps, seed, ...): --resume on a file from
    another seed, sampler or checkpoint is one line naming what differs, and the file is left as it was."""
    npz = tmp_path / "s.npz"
    run([ckpt, "-n", "4", "--batch-size", "2", "--steps", "3", "--npz", str(npz), "--out", str(tmp_path / "g.png")],
        capsys)
    before = npz.read_bytes()
    other = str(tmp_path / "other.pt")
    write_checkpoint(other, num_classes=None).train()  # the same architecture, other weights
    torch.save(dict(torch.load(other), ema=torch.load(other)["model"]), other)
    for argv, differs in ((["--seed", "1"], "seed"), (["--sampler", "dpm++"], "sampler"), ([], "model")):
        path = other if differs == "model" else ckpt
        message = one_line_error(sample.main, [path, "-n", "4", "--batch-size", "2", "--steps", "3", "--npz", str(npz),
                                               "--resume", "--device", "cpu", "--out", str(tmp_path / "g.png"), *argv],
                                 capsys)
        assert "holds samples of another run" in message and differs in message, message
    assert npz.read_bytes() == before


def test_few_samples_for_fid_are_warned_about(ckpt, tmp_path, capsys):
    """--npz with fewer than 10,000 samples: a warning that such an FID is not comparable with published ones."""
    out = run([ckpt, "--n", "2", "--steps", "2", "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.png")],
              capsys)
    assert "warning: 2 samples; an FID from fewer than 10,000" in out
