"""
What a long run needs, training or sampling: the device it runs on, the random state it resumes from, and
progress lines with an ETA.
"""
import math

import torch


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
