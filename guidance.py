"""
Guidance, from the papers that came after DDPM: classifier-free guidance (Ho & Salimans 2021, arXiv:2207.12598),
and the model function the samplers call, which applies it to a class-conditional U-Net.
"""
import torch


def classifier_free_guidance(eps_cond, eps_uncond, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2021, Eq. 6):
    eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null). w = 0 is the plain conditional model."""
    return (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond


def model_fn(net, y=None, guidance=0.0, bf16=False):
    """model(x_t, t) as the samplers call it, from a U-Net and labels y (None: unconditional). With guidance
    w > 0 the conditional and unconditional predictions come from one forward pass over a batch of 2B,
    combined by classifier_free_guidance. bf16: autocast for the network only; the diffusion math stays fp32.
    The output is always a fresh fp32 tensor: a net compiled with CUDA graphs returns its static output buffer,
    which the next call overwrites, and a sampler may keep an output across calls."""
    def fn(x, t):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            if y is None or guidance == 0:
                return net(x, t, y).to(torch.float32, copy=True)
            null = torch.full_like(y, net.config["num_classes"])
            out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
        eps_cond, eps_uncond = out.chunk(2)
        return classifier_free_guidance(eps_cond, eps_uncond, guidance)
    return fn
