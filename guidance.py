"""
Guidance, from the papers that came after DDPM, and the model function the samplers call:
- classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233, Sec. 4): a classifier p(y | x_t, t) trained on
  noisy images steers any diffusion model, unconditional ones included, toward a class: Algorithm 1 shifts the
  mean of each ancestral step, Algorithm 2 the eps of DDIM (and of the other deterministic samplers);
- classifier-free guidance (Ho & Salimans 2021, arXiv:2207.12598): a class-conditional model that also learned
  the unconditional case guides itself, Eq. (6). With the classifier its own eps implies, the two are one formula.
  A caption model (latent diffusion's cross-attention) guides itself the same way, the empty caption as null.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from captions import caption_words
from ddpm import extract
from unet import Normalize, UNet, image_hw, regroup


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t, t): the U-Net's encoder half (its down path and middle, with the same timestep embedding;
    the up path dropped), then GroupNorm, swish, a global average pool and a linear layer to the classes (the
    "adaptive" pooling head of Dhariwal & Nichol's EncoderUNet; their ImageNet classifiers pool with attention).
    GroupNorm, not BatchNorm: each sample's output, and so its gradient, does not depend on the rest of the batch.
    Configured as the U-Net is (UNet's arguments)."""

    def __init__(self, num_classes, **unet_config):
        super().__init__()
        self.trunk = UNet(**dict(unet_config, num_classes=None))
        del self.trunk.up, self.trunk.norm_out, self.trunk.conv_out  # the encoder half only
        width = self.trunk.mid.block_2.conv2.out_channels
        self.norm, self.head = Normalize(width), nn.Linear(width, num_classes)
        regroup(self.norm, self.trunk.config["group_channels"], self.trunk.config.get("norm_groups"))
        self.num_classes = num_classes
        self.config = dict(self.trunk.config, num_classes=num_classes)

    def forward(self, x, t):
        """Logits (B, num_classes) for x_t at timestep indices t (B,)."""
        h, _ = self.trunk.encode(x, self.trunk.embed(t))
        return self.head(F.silu(self.norm(h)).mean((2, 3)))


class ClassifierLoss:
    """How the classifier learns (Dhariwal & Nichol, Sec. 4): on the diffusion's own noisy images, t uniform and
    x_t = q_sample(x_0, t), cross-entropy against the label. Returns the per-example losses and whether each was
    classified right (train.py logs both by timestep quartile)."""

    def __init__(self, diffusion, bf16=False):
        self.diffusion, self.bf16 = diffusion, bf16

    def draw(self, x0, y):
        return torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device), torch.randn_like(x0)

    def __call__(self, model, x0, y, t, noise):
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=self.bf16 and x0.device.type == "cuda"):
            logits = model(self.diffusion.q_sample(x0, t, noise), t).float()
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def check_classifier(name, classifier, classifier_diffusion, net, diffusion, classifier_stage=None, model_stage=None):
    """ValueError unless the classifier can guide this model: trained for the same diffusion (T and betas), on the
    model's image size and channels, with its classes where the model has classes; for a latent model, on the
    latents of the same first stage (autoencoder.FirstStage: the same weights and scale factor), and never a pixel
    classifier whose images happen to have the latents' shape (or the reverse)."""
    if not isinstance(classifier, NoisyClassifier):
        raise ValueError(f"--classifier {name} is not a classifier (train.py --classifier)")
    other = classifier_diffusion
    if other.num_timesteps != diffusion.num_timesteps or not torch.allclose(other.betas, diffusion.betas):
        raise ValueError(f"--classifier {name} was trained for another diffusion (T = {other.num_timesteps}); the "
                         f"model's is T = {diffusion.num_timesteps} with other betas or T: train it with the model's "
                         f"--timesteps and --schedule")
    if (classifier_stage is None) != (model_stage is None):
        seen, drawn = ("pixels", "latents") if classifier_stage is None else ("latents", "pixels")
        raise ValueError(f"--classifier {name} was trained on {seen} and the model draws {drawn}: train it with the "
                         f"model's --latent")
    if classifier_stage is not None and not same_weights(classifier_stage.autoencoder, model_stage.autoencoder):
        raise ValueError(f"--classifier {name} was trained on the latents of another autoencoder than the model's: "
                         f"train it with the model's --latent")
    if classifier_stage is not None and classifier_stage.scale != model_stage.scale:
        raise ValueError(f"--classifier {name} saw latents scaled by {classifier_stage.scale:.6g}, the model draws "
                         f"them scaled by {model_stage.scale:.6g} (each run measures its own scale factor): train it "
                         f"with the model's --latent, --data and --seed")
    a, b = classifier.config, net.config
    seen, drawn = (image_hw(c["image_size"]) + (c["in_channels"],) for c in (a, b))
    if seen != drawn:
        raise ValueError(f"--classifier {name} sees {'x'.join(map(str, seen))} images, the model draws "
                         f"{'x'.join(map(str, drawn))}")
    if b.get("num_classes") is not None and b["num_classes"] != a["num_classes"]:
        raise ValueError(f"--classifier {name} has {a['num_classes']} classes, the model {b['num_classes']}")


def same_weights(a, b):
    """Whether two networks are one: the same config and the same tensors."""
    x, y = a.state_dict(), b.state_dict()
    return a.config == b.config and x.keys() == y.keys() and all(torch.equal(x[k].cpu(), y[k].cpu()) for k in x)


def classifier_grad(classifier, y, scale):
    """cond_fn(x_t, t) = s grad_{x_t} log p_phi(y | x_t, t), taken at x_t (Dhariwal & Nichol, Algorithms 1 and 2).
    Each sample's log-probability depends on its own x_t alone, so the gradient of their sum is every sample's
    own gradient."""
    def cond_fn(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t), dim=-1)
            chosen = log_p[torch.arange(len(y), device=y.device), y].sum()
            return scale * torch.autograd.grad(chosen, x)[0]
    return cond_fn


def classifier_guided_eps(diffusion, model, cond_fn):
    """Dhariwal & Nichol, Algorithm 2 (Sec. 4.2): eps^(x_t) = eps_theta(x_t) - sqrt(1 - abar_t) s grad log p(y | x_t)
    (the paper's line omits s; its Sec. 4.3 and code scale the gradient), so x0_hat follows from eps^: what DDIM and
    DPM-Solver++ see. The shift is on eps whatever the network predicts: an x0- or v-network's eps is the one its
    x0_hat implies (Eq. 15), and eps^ goes back to the network's own parameterisation. The sampler then clips the
    x0_hat of eps^; guided-diffusion's condition_score instead shifts the eps of the network's clipped x0_hat and
    does not clip again (a deviation named in the README; docs/guidance.md compares the two)."""
    def fn(x, t):
        out, shift = model(x, t), extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x) * cond_fn(x, t)
        if diffusion.mean_type == "eps":
            return out - shift
        eps = diffusion.predict_noise_from_start(x, t, diffusion.predict_start(x, t, out)) - shift
        return diffusion.output_from_start(x, t, diffusion.predict_start_from_noise(x, t, eps))
    return fn


def classifier_guidance(diffusion, model, cond_fn, full_chain):
    """How a sampler takes classifier guidance: DDPM's full ancestral chain (Algorithm 2) takes cond_fn on its mean,
    their Algorithm 1; every other sampler the guided eps as its model, their Algorithm 2. -> (model, cond_fn)."""
    if cond_fn is None or full_chain:
        return model, cond_fn
    return classifier_guided_eps(diffusion, model, cond_fn), None


def classifier_free_guidance(eps_cond, eps_uncond, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2021, Eq. 6):
    eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null). w = 0 is the plain conditional model."""
    return (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond


def null_condition(config, n, device):
    """What "no condition" is for n samples of a network with this config: the null label num_classes of a
    class-conditional model, the empty caption (all padding tokens) of a caption model, None for an unconditional
    one."""
    if config.get("captions"):
        return torch.zeros(n, caption_words(config["captions"])[1], dtype=torch.long, device=device)
    if config.get("num_classes") is not None:
        return torch.full((n,), config["num_classes"], dtype=torch.long, device=device)
    return None


def check_condition(config, classes, captions, guidance=0.0, classifier=False):
    """ValueError unless a network of this config can be asked for these samples (sample.py's flags): classes (given,
    or None) of a class-conditional model or toward a classifier's classes, captions (texts, or None) of a caption
    model, guidance w > 0 toward either."""
    if config.get("captions") and (classes is not None or classifier):
        raise ValueError(f"a caption model is told what to draw by --caption, in its words "
                         f"({', '.join(caption_words(config['captions'])[0][1:])}), not by --class or --classifier")
    if captions and not all(text.split() for text in captions):
        raise ValueError("--caption '': the empty caption is the null condition; leave --caption out to sample "
                         "unconditionally")
    if captions and not config.get("captions"):
        raise ValueError("--caption needs a caption model (train.py --caption-cond); this model takes "
                         + ("--class" if config.get("num_classes") is not None else "no condition"))
    if classifier and classes is None:
        raise ValueError("--classifier needs --class K[,K...]: the classes to guide toward")
    if not classifier and classes is not None and config.get("num_classes") is None:
        raise ValueError("--class needs a class-conditional model (train.py --class-cond) or a --classifier; this "
                         "model is unconditional")
    if guidance and not (classes is not None and config.get("num_classes") is not None or captions):
        raise ValueError("--guidance needs --class and a class-conditional model, or --caption and a caption model")


def model_fn(net, y=None, guidance=0.0, bf16=False, **condition):
    """model(x_t, t) as the samplers call it, from a network, labels y (None: unconditional) and any other
    conditioning it takes by keyword (a super-resolution stage's image), given here or at the call. With guidance
    w > 0 the conditional and unconditional predictions come from one forward pass over a batch of 2B, combined by
    classifier_free_guidance. bf16: autocast for the network only; the diffusion math stays fp32. The output is
    always a fresh fp32 tensor: a net compiled with CUDA graphs returns its static output buffer, which the next
    call overwrites, and a sampler may keep an output across calls."""
    def fn(x, t, **extra):
        kw = dict(condition, **extra)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            if y is None or guidance == 0:
                return net(*((x, t) if y is None else (x, t, y)), **kw).to(torch.float32, copy=True)
            null = null_condition(net.config, y.shape[0], y.device)
            doubled = {k: torch.cat([v, v]) for k, v in kw.items()}
            out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled).float()
        eps_cond, eps_uncond = out.chunk(2)
        return classifier_free_guidance(eps_cond, eps_uncond, guidance)
    return fn
