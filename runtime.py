"""
What a long run needs, training or sampling: the device it runs on, its processes under torchrun (and how they
agree on a failure), the random state it resumes from, stopping cleanly on Ctrl-C or SIGTERM, and progress lines
with an ETA. Errors are raised (ValueError, OSError, RuntimeError); the command lines turn them into one line.
"""
import argparse
import datetime
import math
import os
import signal
import time

import torch
import torch.distributed as dist

# What the command lines report as one "error:" line (a library's bad input, a file, the environment).
USER_ERRORS = (ValueError, OSError, RuntimeError)


def error_line(e):
    """A USER_ERRORS exception as the command lines print it: 'error: ' and its first line."""
    text = str(e).strip()
    return "error: " + (text.splitlines()[0] if text else type(e).__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, its errors one line as every other bad input's: 'error: ...' and exit code 2 (not the usage)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def resolve_device(name):
    """'auto' | 'cpu' | 'cuda[:k]' | 'mps' -> torch.device; ValueError/RuntimeError if it is not there."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (use auto, cpu, cuda or mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device '{name}' (use auto, cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but no CUDA device is available to torch "
                           f"{torch.__version__} (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps:
        raise RuntimeError(f"--device {name} asked for, but MPS is not available (use --device cpu or auto)")
    return device


def set_tf32(device, on):
    """TF32 for matmuls and cuDNN convolutions on CUDA, on or off (cuDNN's default is on: fp32 means setting it)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    m = int(seconds) // 60
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{int(seconds) % 60:02d}s"

# -----------------------------------------------------------------------------
# processes under torchrun


class Processes:
    """This process's place under torchrun (RANK, LOCAL_RANK, WORLD_SIZE; one process alone without it) and its
    device: one GPU per process with NCCL, or CPU processes with gloo. Collectives that may wait on slow work of
    one rank (a download, a checkpoint write) go through `control`, a gloo group with a long timeout, so NCCL's
    10-minute watchdog never fires while one rank works; and every rank raises the error one rank met."""

    def __init__(self, device_name):
        self.rank, self.local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device, self.control = resolve_device(device_name), None
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        self.master = self.rank == 0

    def agree(self, error):
        """Every rank passes the USER_ERRORS exception it met, or None. If any rank met one, every rank raises the
        first one's message (by rank), so all exit together with the same line instead of waiting for a dead rank."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        lines = [None] * self.world
        dist.all_gather_object(lines, None if error is None else error_line(error), group=self.control)
        first = next((line for line in lines if line is not None), None)
        if first is not None:
            raise RuntimeError(first[len("error: "):])

    def on_master(self, fn):
        """fn() on rank 0 alone (writing a file); an error there is raised on every rank."""
        error = None
        if self.master:
            try:
                fn()
            except USER_ERRORS as e:
                error = e
        self.agree(error)

    def in_turns(self, fn):
        """fn() on every rank, rank 0 first, then each other node's first process, then the rest: a data set is
        downloaded and unpacked once (per file system), and the other processes load what is there. Errors are
        raised on every rank."""
        result, error = None, None
        turns = (self.rank == 0, self.local_rank == 0 and self.rank != 0, self.local_rank != 0)
        for mine in turns:
            if mine and error is None:
                try:
                    result = fn()
                except USER_ERRORS as e:
                    error = e
            self.agree(error)
        return result

    def barrier(self):
        if self.world > 1:
            dist.barrier(group=self.control)


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM (pre-emption) set .signum, so a loop can finish its step, save and exit; a
    second signal raises KeyboardInterrupt at once. The files on disk stay whole either way (atomic writes).
    As a context manager it puts the previous handlers back on exit."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self):
        return 130 if self.signum == signal.SIGINT else 0


class Progress:
    """Progress lines for long loops: due() says when `every` seconds have passed since the last line, and
    eta(done) the time left at the rate so far (the work counted in any unit)."""

    def __init__(self, total, every=30.0):
        self.total, self.every = total, every
        self.start = self.last = time.time()

    def due(self):
        return time.time() - self.last >= self.every

    def eta(self, done):
        self.last = time.time()
        rate = done / max(self.last - self.start, 1e-9)
        return format_eta((self.total - done) / rate) if done else "?"
