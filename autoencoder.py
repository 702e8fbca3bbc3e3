"""
The first stage of latent diffusion (Rombach, Blattmann, Lorenz, Esser, Ommer 2022, arXiv:2112.10752, Sec. 3.1 and
Appendix G): a convolutional autoencoder, encoder E and decoder D, whose latent is a diagonal Gaussian q_E(z | x)
kept close to N(0, I) by a small KL penalty ("KL-reg"): the paper's KL-f models, with a downsampling factor
f = 2^(levels - 1) and a few latent channels. The diffusion model then learns the latents z = E(x), scaled to unit
variance (runs.py's first stage), and samples are decoded, x = D(z) (Eq. 2, the LDM objective, is L_simple on z).
The loss here is the paper's Eq. (25) without its two learned parts: the reconstruction L_rec = |x - D(z)| (L1, as
the paper's code) plus the KL weighted 1e-6 against the per-image sums (the reference's kl_weight). LPIPS (a
pretrained VGG) and the patch discriminator, which the paper adds for sharper reconstructions, are not here: torch
is the only dependency, and no pretrained network is downloaded.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import AttnBlock, Downsample, Normalize, Upsample, regroup

KL_WEIGHT = 1e-6  # the reference configs' kl_weight, against per-image sums of the reconstruction and the KL


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)), the log-variance clamped to [-30, 20] as the reference does."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise):
        return self.mean + self.std * noise

    def kl(self):
        """KL(q(z | x) || N(0, I)) per image: 0.5 sum (mean^2 + var - 1 - log var) over the latent's C, H, W."""
        return 0.5 * (self.mean ** 2 + self.std ** 2 - 1.0 - self.logvar).flatten(1).sum(1)


class ResBlock(nn.Module):
    """The U-Net's residual block without a timestep: norm, swish, conv3x3, norm, swish, conv3x3, + shortcut."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class Autoencoder(nn.Module):
    """E: conv, per level num_res_blocks ResBlocks and a stride-2 downsample (none after the last level), the middle
    (ResBlock, attention, ResBlock), norm, swish, conv to 2 latent_channels (mean and log-variance). D mirrors it
    with num_res_blocks + 1 blocks per level and nearest upsampling. The reference's KL-f models (ch 128, two blocks
    a level, 256x256) made small for small images."""

    def __init__(self, image_size=32, in_channels=3, latent_channels=4, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1,
                 group_channels=1):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor or ch % 32 or latent_channels < 1 or num_res_blocks < 1:
            raise ValueError(f"an autoencoder needs image_size divisible by its downsampling factor {factor}, ch a "
                             f"multiple of 32, and positive latent channels and blocks (got {image_size}, {ch}, "
                             f"{latent_channels}, {num_res_blocks})")
        self.config = dict(image_size=int(image_size), in_channels=int(in_channels),
                           latent_channels=int(latent_channels), ch=int(ch), ch_mult=ch_mult,
                           num_res_blocks=int(num_res_blocks), group_channels=int(group_channels))
        self.latent_size, self.num_classes = image_size // factor, None
        chs = [ch * m for m in ch_mult]
        down, block_in = [nn.Conv2d(in_channels, ch, 3, padding=1)], ch
        for i, out in enumerate(chs):
            for _ in range(num_res_blocks):
                down.append(ResBlock(block_in, out))
                block_in = out
            if i < len(chs) - 1:
                down.append(Downsample(block_in))
        down += [ResBlock(block_in, block_in), AttnBlock(block_in), ResBlock(block_in, block_in), Normalize(block_in),
                 nn.SiLU(), nn.Conv2d(block_in, 2 * latent_channels, 3, padding=1)]
        up = [nn.Conv2d(latent_channels, block_in, 3, padding=1), ResBlock(block_in, block_in), AttnBlock(block_in),
              ResBlock(block_in, block_in)]
        for i, out in reversed(list(enumerate(chs))):
            for _ in range(num_res_blocks + 1):
                up.append(ResBlock(block_in, out))
                block_in = out
            if i > 0:
                up.append(Upsample(block_in))
        up += [Normalize(block_in), nn.SiLU(), nn.Conv2d(block_in, in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*down), nn.Sequential(*up)
        regroup(self, group_channels)  # 1: the reference's 32 groups, one channel each at ch 32 (instance norm)

    def encode(self, x):
        """q_E(z | x) for images x (B, C, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, t=None, noise=None):
        """With noise (training): D(z) for z = mean + std noise ~ q_E(z | x), and the KL per image, from one call (so
        DDP sees one forward); without: the reconstruction D(mean of q_E(z | x)) that grids show (t is ignored)."""
        q = self.encode(x)
        return self.decode(q.mean) if noise is None else (self.decode(q.sample(noise)), q.kl())


class AutoencoderLoss:
    """Eq. (25) without LPIPS and the discriminator, per image: the mean absolute reconstruction error of
    D(z), z ~ q_E(z | x) (reparameterised: z = mean + std eps), plus KL_WEIGHT times the KL, both scaled as the
    reference's per-image sums are (here divided by the image's C H W, so the loss reads as a mean L1). The second
    metric is the PSNR of the reconstruction, in dB on [0, 255]. draw() takes the batch's eps at once, so a batch
    split into micro-batches sees the same ones."""
    metric = "PSNR"
    diffusion = None

    def __init__(self, latent_channels, factor, kl_weight=KL_WEIGHT):
        self.latent_channels, self.factor, self.kl_weight = latent_channels, factor, kl_weight

    def draw(self, x0, y):
        """(t, eps): no timesteps (every image in the log's first quartile), and the latent's eps."""
        b, _, h, w = x0.shape
        return (torch.zeros(b, dtype=torch.long, device=x0.device),
                torch.randn(b, self.latent_channels, h // self.factor, w // self.factor, device=x0.device))

    def __call__(self, model, x0, y, t, noise):
        x_rec, kl = model(x0, None, noise)
        l1 = (x_rec.float() - x0).abs().flatten(1).sum(1)
        loss = (l1 + self.kl_weight * kl.float()) / x0[0].numel()
        mse = ((x_rec.float().clamp(-1, 1) - x0) ** 2).flatten(1).mean(1)
        return loss, 10 * torch.log10(4.0 / mse.clamp(min=1e-10))  # PSNR with the peak 2 of [-1, 1]


def latent_scale(autoencoder, images, generator, batch_size=256):
    """The LDM's scale factor (Sec. 4.3.2 and Appendix D.1, z = E(x) / sigma_hat; the reference's scale_by_std):
    1 / the standard
    deviation of the latents z ~ q_E(z | x) of the given images (B, C, H, W), so the diffusion model sees latents of
    unit variance, as its schedule assumes of data."""
    with torch.no_grad():
        z = torch.cat([(lambda q: q.sample(torch.randn(q.mean.shape, generator=generator, device=q.mean.device)))(
            autoencoder.encode(x)) for x in images.split(batch_size)])
    return 1.0 / z.float().std().item()


class FirstStage:
    """Latent diffusion's first stage as a diffusion model uses it (Rombach et al. 2022, Sec. 3.2, Sec. 4.3.2 and
    Appendix D.1): a trained autoencoder, frozen, and the scale factor that gives its latents unit variance.
    encode: images in [-1, 1] to z = scale z~, z~ ~ q_E(z | x) (a fresh draw each time, from the global random
    state, so resume stays exact); decode: z to D(z / scale)."""

    def __init__(self, autoencoder, scale):
        self.autoencoder, self.scale = autoencoder.eval().requires_grad_(False), scale

    def to(self, device):
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, x):
        mean, std = self.moments(x)
        return mean + std * torch.randn(mean.shape, device=mean.device)  # not randn_like: its draws follow the layout

    @torch.no_grad()
    def moments(self, x):
        """The mean and standard deviation of the scaled latent z = scale z~, z~ ~ q_E(z | x): all that a draw needs
        of the encoder, so a training run computes them once per image (training.Batches)."""
        q = self.autoencoder.encode(x)
        return q.mean * self.scale, q.std * self.scale

    @torch.no_grad()
    def decode(self, z):
        return self.autoencoder.decode(z / self.scale)

    def state(self):
        ae = self.autoencoder
        return dict(first_stage=ae.state_dict(), first_stage_config=ae.config, scale_factor=self.scale)

    @classmethod
    def from_state(cls, state):
        """From what state() wrote into a checkpoint."""
        ae = Autoencoder(**state["first_stage_config"])
        ae.load_state_dict(state["first_stage"])
        return cls(ae, state["scale_factor"])
