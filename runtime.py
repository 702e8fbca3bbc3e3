"""
What a long run needs, training or sampling: the device it runs on, its processes under torchrun, the random
state it resumes from, stopping cleanly on Ctrl-C or SIGTERM, and progress lines with an ETA.
"""
import math
import os
import signal
import time

import torch
import torch.distributed as dist


def resolve_device(name):
    """'auto' | 'cpu' | 'cuda[:k]' | 'mps' -> torch.device; one clear line if it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown device '{name}' (use auto, cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but no CUDA device is available to torch "
                         f"{torch.__version__} (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit(f"error: --device {name} asked for, but MPS is not available (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unsupported device '{name}' (use auto, cpu, cuda or mps)")
    return device


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


def init_distributed(device_name):
    """(rank, local_rank, world, device). Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) one process per GPU,
    NCCL; or several CPU processes, gloo. On CUDA also let cuDNN pick its fastest kernels for the fixed shapes."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return rank, local_rank, world, device


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

    def agreed(self, world, device):
        """Whether any process was signalled (a collective under torchrun: every rank must call it)."""
        flag = torch.tensor(float(self.signum is not None), device=device if world > 1 else "cpu")
        if world > 1:
            dist.all_reduce(flag)
        return flag.item() > 0

    @property
    def exit_code(self):
        return 130 if self.signum == signal.SIGINT else 0


class Progress:
    """Progress lines for long loops: due() says when `every` seconds have passed since the last line, and
    line(done) gives done/total with the rate and an ETA (the work counted in any unit)."""

    def __init__(self, total, every=30.0):
        self.total, self.every = total, every
        self.start = self.last = time.time()

    def due(self):
        return time.time() - self.last >= self.every

    def eta(self, done):
        self.last = time.time()
        rate = done / max(self.last - self.start, 1e-9)
        return format_eta((self.total - done) / rate) if done else "?"
