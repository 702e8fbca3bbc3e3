"""
train.py's checkpoints: the format (written atomically, read back on the CPU), the diffusion a checkpoint
describes, the one table from a run's kind to its network, and load_model, which turns whatever a user hands
sample.py (a checkpoint, a run folder, the paper's released weights) into a network and its diffusion.
"""
import hashlib
import os

import torch

from autoencoder import Autoencoder, FirstStage
from captions import CaptionUNet
from cascade import SuperResolution
from data import CAPTIONS, CIFAR10_CLASSES, SHAPES_CLASSES
from ddpm import GaussianDiffusion, make_beta_schedule
from guidance import NoisyClassifier
from highres import shifted_cosine_betas
from imagefiles import atomic_write, first_line, tensor_bytes
from pretrained import identify, load_pretrained
from unet import UNet

FORMAT = "ddpm-checkpoint-v1"

PAPER_KIND = "diffusion"  # the paper's own kind of run, and what the released weights are
# What each kind of run trains (train.py decides the kind once; a checkpoint records it).
MODELS = {
    PAPER_KIND: UNet,               # DDPM, Algorithm 1 (and its class-conditional and caption extensions)
    "classifier": NoisyClassifier,  # p(y | x_t, t) for classifier guidance (guidance.py)
    "sr": SuperResolution,          # a super-resolution stage of a cascade (cascade.py)
    "progressive": UNet,            # a progressively distilled v-student (distill.py)
    "consistency": UNet,            # a consistency-distilled v-student (distill.py)
    "autoencoder": Autoencoder,     # latent diffusion's first stage (autoencoder.py)
}


def diffusion_config(schedule="linear", num_timesteps=1000, mean_type="eps", var_type="fixedlarge"):
    """A checkpoint's "diffusion_config". For T != 1000 the paper's linear betas 1e-4..0.02 are scaled by 1000 / T
    (Nichol & Dhariwal 2021), so that abar_T stays near the paper's."""
    scale = 1000 / num_timesteps
    return dict(schedule=schedule, num_timesteps=num_timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale,
                mean_type=mean_type, var_type=var_type)


# The diffusion of the paper's CIFAR-10 run (Sec. 4, scripts/run_cifar.py), which the released weights imply.
PAPER_DIFFUSION = diffusion_config()


def diffusion_betas(config):
    """The betas (float64) of a checkpoint's "diffusion_config" (missing entries: the paper's); a logsnr_shift is
    simple diffusion's shifted cosine schedule (highres.py)."""
    c = {**PAPER_DIFFUSION, **config}
    if c.get("logsnr_shift"):
        return shifted_cosine_betas(c["num_timesteps"], c["logsnr_shift"])
    return make_beta_schedule(c["schedule"], c["num_timesteps"], c["beta_start"], c["beta_end"])


def build_diffusion(config):
    """GaussianDiffusion from a checkpoint's "diffusion_config" (missing entries: the paper's)."""
    c = {**PAPER_DIFFUSION, **config}
    return GaussianDiffusion(diffusion_betas(c), mean_type=c["mean_type"], var_type=c["var_type"])


def build_model(kind, config):
    """The network of a run of this kind, from its checkpoint's "model_config"; a U-Net with captions in its config
    is a caption model (captions.CaptionUNet: the U-Net and latent diffusion's text side)."""
    network = MODELS[kind]
    return (CaptionUNet if network is UNet and config.get("captions") else network)(**config)


class NotACheckpoint(ValueError):
    """A readable torch file that train.py did not write (load_model then tries it as released weights)."""


def load_checkpoint(path):
    """A checkpoint written by train.py (the file, or the run folder holding ckpt.pt), loaded on the CPU."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint holds tensors and plain python values only, so nothing in it can run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} (corrupt or truncated?): {first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise NotACheckpoint(f"{path} is not a train.py checkpoint (format {FORMAT})")
    return ckpt


def save_checkpoint(path, ckpt):
    """torch.save through atomic_write: a crash or a full disk leaves the previous checkpoint whole."""
    atomic_write(path, lambda f: torch.save(dict(ckpt, format=FORMAT), f))


def load_model(path, use_ema=True):
    """-> (net in eval mode, diffusion config, meta, a description). path: a train.py checkpoint or run folder, or
    released weights (TF-scope state dict, or the diffusers google/ddpm-cifar10-32 layout). meta: train.py's args
    ({} for released weights), the class names (None where there are none), the kind (a key of MODELS) and what
    else the checkpoint records for sampling (a student's own sampler)."""
    diffusers_layout = path.endswith((".safetensors", ".bin")) or (
        os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt")) and
        any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "unet")))
    released = dict(args={}, class_names=None, kind=PAPER_KIND, sampling=None, first_stage=None)
    if diffusers_layout:
        try:
            net = load_pretrained(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot load {path} as released weights: {str(e).splitlines()[0]}") from None
        return net, PAPER_DIFFUSION, released, f"released weights {path} (diffusers layout, {identify(path, net)})"
    try:
        ckpt = load_checkpoint(path)
    except NotACheckpoint:
        # not ours; the one other .pt/.ckpt we read is a bare TF-scope state dict (model-790000.ckpt)
        try:
            net = load_pretrained(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path} is neither a train.py checkpoint nor released DDPM weights "
                             f"({str(e).splitlines()[0]})") from None
        return net, PAPER_DIFFUSION, released, f"released weights {path} (TF-scope state dict, {identify(path, net)})"
    weights = "ema" if use_ema and ckpt.get("ema") else "model"
    kind = ckpt.get("kind", PAPER_KIND)  # checkpoints from before the later papers' kinds
    try:
        net = build_model(kind, ckpt["model_config"])
        net.load_state_dict(ckpt[weights])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the weights do not fit its model_config ({str(e).splitlines()[0][:200]})") from None
    args = ckpt.get("args") or {}
    # checkpoints from before class names were stored: the built-in data sets' names
    names = ckpt.get("class_names") or {"cifar10": CIFAR10_CLASSES, "shapes": SHAPES_CLASSES,
                                        "captions": CAPTIONS}.get(args.get("data"))
    desc = f"{path} ({kind} step {ckpt.get('step', '?')}, {weights} weights)"
    meta = dict(args=args, class_names=names, kind=kind, sampling=ckpt.get("sampling"), first_stage=None)
    if "first_stage_config" in ckpt:  # a latent diffusion model: its autoencoder and scale factor are in the file
        if "first_stage" not in ckpt:
            raise ValueError(f"{path}: a latent diffusion model whose autoencoder weights are missing from the file")
        meta["first_stage"] = stage = FirstStage.from_state(ckpt)
        desc += f", latents of a {stage.autoencoder.config['image_size'] // stage.autoencoder.latent_size}x autoencoder"
    return net.eval(), ckpt["diffusion_config"], meta, desc


def fingerprint(obj):
    """What identifies a network's weights (or a tensor) in a sampling run's record: a hash of its bytes."""
    h = hashlib.sha1()
    for name, value in obj.state_dict().items() if isinstance(obj, torch.nn.Module) else [("", obj)]:
        h.update(name.encode())
        for chunk in tensor_bytes(value):
            h.update(chunk)
    return h.hexdigest()
