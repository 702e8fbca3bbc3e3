"""
The figures in assets/ (README and docs/), drawn with matplotlib (an optional extra: pip install matplotlib;
nothing else needs it):
the forward process erasing a distribution (Eq. 4), the variance over t and the schedules, the posterior mean's
coefficients (Eq. 7), a trained model's loss and bound terms over t (Eqs. 5, 14), the rate-distortion curve of
progressive coding (Sec. 4.3, Figure 5) and quality against network evaluations for each sampler.
  python figures.py --model out-shapes --rd rd.csv --nfe samplers.csv --edits out-shapes --out assets
Figures whose inputs are not given are skipped. A command line: nothing imports this file.
"""
import csv
import math
import os

import torch

from checkpoint import build_diffusion, load_model
from data import make_shapes
from ddpm import GaussianDiffusion, make_beta_schedule
from guidance import model_fn
from imagefiles import from_uint8
from runtime import USER_ERRORS, ArgumentParser, error_line


def get_parser():
    p = ArgumentParser(description="Draw the figures in assets/ (needs matplotlib).")
    a = p.add_argument
    a("--out", default="assets", help="folder for the PNG files")
    a("--model", default="", help="a train.py checkpoint on the shapes (the CPU quick start): loss and bound over t")
    a("--rd", default="", help="the CSV of sample.py --nll ... --csv: the rate-distortion curve")
    a("--nfe", default="", help="the CSV of bench_samplers.py --csv: quality and RMSE against NFE")
    a("--n", type=int, default=64, help="held-out images for the loss and bound curves")
    a("--edits", default="", help="a train.py checkpoint on the shapes: the inpainting figure (input, mask, three "
      "completions) and SDEdit across strengths 0, 0.25, 0.5, 0.75, 1")
    a("--autoencoder", default="", help="a train.py --autoencoder checkpoint: held-out images and their "
      "reconstructions (of --recon-data: shapes, or a .npz of images)")
    a("--recon-data", default="shapes", help="with --autoencoder: the images to reconstruct")
    a("--log", default="", help="a run's metrics.csv (train.py writes it beside log.txt): the loss curves")
    a("--grids", default="", help="LABEL=FILE.npz,... (sample.py --npz files): one row of samples from each, titled "
      "with its label and the shapes quality number of the whole file, into --grids-name")
    a("--grids-name", default="grids.png", help="the file --grids draws")
    a("--per-row", type=int, default=8, help="samples shown from each --grids file")
    a("--grids-plain", action="store_true", help="--grids rows titled with their labels only, without the shapes "
      "quality number (for images that are not the built-in shapes: photographs, your own data)")
    return p


def forward_process(plt, out):
    """Eq. (4) applied to a bimodal x_0 (and to the shapes' pixel values): the histograms of x_t at several t
    spread and merge into N(0, 1)."""
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    g = torch.Generator().manual_seed(0)
    mixture = torch.where(torch.rand(200_000, generator=g) < 0.3, -0.8, 0.6) + 0.05 * torch.randn(200_000, generator=g)
    pixels = from_uint8(make_shapes(2000, 16, 3, seed=1)[0]).flatten()
    fig, axes = plt.subplots(2, 5, figsize=(13, 4.6), sharey="row")
    grid = torch.linspace(-4, 4, 400)
    for row, (x0, name) in enumerate(((mixture, "bimodal mixture"), (pixels[:200_000], "shapes' pixels"))):
        for ax, t in zip(axes[row], (0, 50, 200, 400, 999)):
            x_t = d.q_sample(x0[:, None], torch.full((len(x0),), t), torch.randn(len(x0), 1, generator=g))
            ax.hist(x_t.flatten().numpy(), bins=120, range=(-4, 4), density=True, color="C0")
            ax.plot(grid, torch.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k--", lw=1)
            ax.set_title(f"{name}, t = {t + 1}" if t == 0 else f"t = {t + 1}", fontsize=9)
    fig.suptitle("q(x_t | x_0) (Eq. 4) erases any x_0: histograms of x_t, N(0, 1) dashed")
    save(fig, out, "forward_process.png")


def schedules(plt, out):
    """Var(x_t) for data of variance 0.1 under a constant beta and the paper's linear schedule (the geometric series
    (1 - beta)^t v + 1 - (1 - beta)^t of the tests), and abar_t and SNR_t = abar / (1 - abar) for linear and cosine."""
    T = 1000
    linear, cosine = make_beta_schedule("linear", T), make_beta_schedule("cosine", T)
    const = make_beta_schedule("const", T, beta_end=float(linear.mean()))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    t = torch.arange(1, T + 1)
    for betas, name in ((linear, "linear 1e-4..0.02 (the paper's)"), (const, "constant, the same mean beta")):
        abar = torch.cumprod(1 - betas, 0)
        axes[0].plot(t, abar * 0.1 + 1 - abar, label=name)
    axes[0].set(title="Var(x_t), data variance 0.1", xlabel="t")
    for betas, name in ((linear, "linear"), (cosine, "cosine (Nichol & Dhariwal)")):
        abar = torch.cumprod(1 - betas, 0)
        axes[1].plot(t, abar, label=name)
        axes[2].semilogy(t, abar / (1 - abar), label=name)
    axes[1].set(title="abar_t", xlabel="t")
    axes[2].set(title="SNR_t = abar_t / (1 - abar_t)", xlabel="t")
    for ax in axes:
        ax.legend(fontsize=8)
    save(fig, out, "schedules.png")


def shifted_schedules(plt, out):
    """simple diffusion's Eq. (5): the cosine schedule's log-SNR against t, unshifted and shifted by 2 log(base / d)
    for images 2x, 4x and 8x the base; and abar_t, which a shifted schedule brings down earlier."""
    from highres import logsnr, shift_for, shifted_cosine_betas
    T, t = 1000, torch.arange(1, 1001)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for d in (16, 32, 64, 128):
        betas = shifted_cosine_betas(T, shift_for(16, d))
        label = "cosine (d = base = 16)" if d == 16 else f"shifted for d = {d}: 2 log(16/{d}) = {shift_for(16, d):.2f}"
        axes[0].plot(t, logsnr(betas), label=label)
        axes[1].plot(t, torch.cumprod(1 - betas, 0), label=label)
    axes[0].set(title="log SNR_t (Hoogeboom et al. Eq. 5)", xlabel="t")
    axes[1].set(title="abar_t", xlabel="t")
    axes[0].legend(fontsize=7)
    save(fig, out, "shifted_schedules.png")


@torch.no_grad()
def reconstructions(plt, out, ckpt, data, n=8):
    """Latent diffusion's first stage: n held-out images (a file, or the built-in shapes) above their
    reconstructions D(mean of q_E(z | x)), with the PSNR."""
    from data import load_file
    ae, _, _, desc = load_model(ckpt)
    s, c = ae.config["image_size"], ae.config["in_channels"]
    images = make_shapes(n, s, c, seed=1)[0] if data == "shapes" else load_file(data)[0][:n]
    x = from_uint8(images)
    rec = ae(x).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / ((rec - x) ** 2).mean()).item()
    fig, axes = plt.subplots(2, n, figsize=(n * 1.1, 2.5), squeeze=False)
    for row, batch in enumerate((x, rec)):
        for k in range(n):
            axes[row, k].imshow(((batch[k] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).squeeze(-1).numpy(),
                                interpolation="nearest", cmap="gray" if c == 1 else None)
            axes[row, k].axis("off")
    fig.suptitle(f"images (top) and their reconstructions (bottom), PSNR {psnr:.1f} dB: {desc}", fontsize=8)
    save(fig, out, "reconstructions.png")


def posterior_coefficients(plt, out):
    """Eq. (7): mu~_t = coef1 x_0 + coef2 x_t, on linear and log scales: the weight on x_0 is tiny for most of the
    chain and only grows near the data."""
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), dtype=torch.float64)
    t = torch.arange(1, 1001)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, log in zip(axes, (False, True)):
        for values, name in ((d.posterior_mean_coef1, "coef1, on x_0"), (d.posterior_mean_coef2, "coef2, on x_t")):
            (ax.semilogy if log else ax.plot)(t[1:], values[1:], label=name)
        ax.set(title="Eq. (7) coefficients" + (", log scale" if log else ""), xlabel="t")
        ax.legend(fontsize=8)
    save(fig, out, "posterior_coefficients.png")


@torch.no_grad()
def loss_and_bound(plt, out, ckpt, n):
    """A trained model on n held-out images: L_simple (Eq. 14) at every t (each t its own draw of eps), and the
    bound's terms L_{t-1} (Eq. 5) over t from calc_bpd_loop, in bits/dim."""
    net, config, _, desc = load_model(ckpt)
    d = build_diffusion(config)
    c, s = net.config["in_channels"], net.config["image_size"]
    x0 = from_uint8(make_shapes(n, s, c, seed=1)[0])
    fn, g = model_fn(net), torch.Generator().manual_seed(0)
    losses = torch.stack([d.training_losses(fn, x0, torch.full((n,), i), torch.randn(x0.shape, generator=g)).mean()
                          for i in range(d.num_timesteps)])
    bpd = d.calc_bpd_loop(fn, x0, generator=g)
    t = torch.arange(1, d.num_timesteps + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].semilogy(t, losses)
    axes[0].set(title="L_simple by t (Eq. 14)", xlabel="t")
    axes[1].semilogy(t[1:], bpd["terms_bpd"].mean(0)[1:], label="L_{t-1}")
    axes[1].axhline(bpd["decoder_bpd"].mean(), color="C1", ls="--", label=f"L_0 = {bpd['decoder_bpd'].mean():.2f}")
    axes[1].set(title=f"the bound's terms (Eq. 5), total {bpd['total_bpd'].mean():.2f} bits/dim", xlabel="t")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{desc}, {n} held-out shapes", fontsize=9)
    save(fig, out, "loss_and_bound.png")


def rate_distortion_curve(plt, out, path):
    """Sec. 4.3, Figure 5: rate (bits/dim received) and distortion (RMSE, [0, 255]) against the reverse step."""
    rows = list(csv.DictReader(open(path)))
    step = [int(r["reverse_step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(step, [float(r["distortion_rmse"]) for r in rows])
    axes[0].set(title="distortion (RMSE, 0..255)", xlabel="reverse steps (T - t + 1)")
    axes[1].plot(step, [float(r["rate_bpd"]) for r in rows])
    axes[1].set(title="rate (bits/dim)", xlabel="reverse steps (T - t + 1)")
    axes[2].plot([float(r["rate_bpd"]) for r in rows], [float(r["distortion_rmse"]) for r in rows])
    axes[2].set(title="rate-distortion", xlabel="rate (bits/dim)", ylabel="RMSE")
    save(fig, out, "rate_distortion.png")


def nfe_curves(plt, out, path):
    """Quality (metrics.py) and the RMSE to the nearest real shape against network evaluations, with their spread over
    seeds as error bars where the CSV has it (bench_samplers.py --seeds), one line per sampler (diffusers' dashed);
    the RMSE to the T-step ODE too where the CSV has it; the T-step references as horizontal lines."""
    table = list(csv.DictReader(open(path)))
    rows = [r for r in table if "all T steps" not in r["sampler"]]
    references = [r for r in table if "all T steps" in r["sampler"]]
    panels = [("quality", "quality (Frechet distance, lower is better)")]
    if "nearest" in table[0]:  # bench_samplers.py's CSVs since 2026-12-02
        panels.append(("nearest", "RMSE to the nearest real shape (0..255)"))
    if any(math.isfinite(float(r.get("rmse", "nan"))) for r in rows):
        panels.append(("rmse", "RMSE to the T-step ODE (0..255)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2.5, 3.8), squeeze=False)
    axes = axes[0]
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = [r for r in rows if r["sampler"] == name]
        for ax, (key, _) in zip(axes, panels):
            mean, sd = [float(r[key]) for r in pts], [float(r.get(key + "_sd") or 0) for r in pts]
            low = [min(s, 0.9 * m) for m, s in zip(mean, sd)]  # the log axes have no room below 0
            ax.errorbar([int(r["nfe"]) for r in pts], mean, yerr=[low, sd], capsize=2, marker="o",
                        ls="--" if name.startswith("diffusers") else "-", label=name)
            ax.set(xscale="log", yscale="linear" if key == "nearest" else "log")  # the RMSE moves by a few levels
    for r, style in zip(references, ("--", ":")):
        for ax, (key, _) in zip(axes, panels):
            if key != "rmse":  # the ODE reference is the RMSE's zero
                ax.axhline(float(r[key]), color="k", ls=style, lw=1, label=r["sampler"])
    for ax, (_, title) in zip(axes, panels):
        ax.set(title=title, xlabel="network evaluations")
    handles = axes[0].get_legend_handles_labels()  # the first panel has every line, the references too
    axes[-1].legend(*handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the curves
    save(fig, out, "samplers.png")


@torch.no_grad()
def edits(plt, out, ckpt, rows=4, steps=100):
    """Inpainting (RePaint, resampling r = j = 5) and SDEdit on held-out shapes with a trained model: for each image,
    the image, the mask (white = keep), the input (the hole grey), three completions of its left half from three seeds; then the same images
    edited at strengths 0, 0.25, 0.5, 0.75 and 1 (ancestral, `steps` steps of the whole chain)."""
    from editing import edit_loop, edit_start
    from data import load_mask
    from imagefiles import to_uint8
    net, config, _, desc = load_model(ckpt)
    d, fn, s = build_diffusion(config), model_fn(net), net.config["image_size"]
    x0 = from_uint8(make_shapes(rows, s, net.config["in_channels"], seed=1)[0])
    mask = load_mask("left-half", s, s)
    fill = lambda seed, start, m, r=1: edit_loop(d, fn, x0, m, start, round(steps * (start + 1) / d.num_timesteps),
                                                 resample=r, jump=r, generator=torch.Generator().manual_seed(seed))
    panels = [("image", x0), ("mask (white: keep)", mask.expand_as(x0) * 2 - 1), ("input", x0 * mask)] + [
        (f"completion {k + 1}", fill(k, d.num_timesteps - 1, mask, 5)) for k in range(3)]
    strengths = (0.0, 0.25, 0.5, 0.75, 1.0)
    panels += [(f"SDEdit {S}", fill(0, edit_start(d.num_timesteps, S), None)) for S in strengths]
    fig, axes = plt.subplots(rows, len(panels), figsize=(len(panels) * 1.1, rows * 1.2), squeeze=False)
    for col, (title, x) in enumerate(panels):
        for row in range(rows):
            axes[row, col].imshow(to_uint8(x[row:row + 1])[0].squeeze(-1).numpy(), interpolation="nearest",
                                  cmap="gray" if x.shape[1] == 1 else None)
            axes[row, col].set(xticks=[], yticks=[])  # a frame, so the mask's white shows
        axes[0, col].set_title(title, fontsize=7)
    fig.suptitle(f"inpainting the left half (RePaint, r = j = 5) and SDEdit, {desc}", fontsize=8)
    save(fig, out, "edits.png")


def loss_curves(plt, out, path):
    """A run's metrics.csv: the loss (and each timestep quartile's, q0 nearest the data), the gradient norm and the
    learning rate against the step."""
    rows = list(csv.DictReader(open(path)))
    step = [int(float(r["step"])) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].semilogy(step, [float(r["loss"]) for r in rows], "k", label="loss")
    for q in range(4):
        axes[0].semilogy(step, [float(r[f"loss_q{q}"]) for r in rows], lw=0.8, label=f"q{q}")
    axes[0].set(title="loss (by timestep quartile)", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].plot(step, [float(r["grad_norm"]) for r in rows])
    axes[1].set(title="gradient norm (before clipping)", xlabel="step")
    axes[2].plot(step, [float(r["lr"]) for r in rows])
    axes[2].set(title="learning rate", xlabel="step")
    save(fig, out, "loss_curves.png")


def save(fig, out, name):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def sample_rows(plt, out, spec, name, per_row, quality=True):
    """Rows of samples from several sample.py --npz files, one row a file, each titled with its label and (with
    quality) its quality number (metrics.py: lower is better) over all the file's samples: side-by-side
    comparisons."""
    from data import load_file
    from metrics import shapes_distance
    rows = [item.split("=", 1) for item in spec.split(",")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.9, len(rows) * 1.15), squeeze=False)
    for ax, (label, path) in zip(axes[:, 0], rows):
        images, _ = load_file(path)
        strip = torch.cat(list(images[:per_row]), dim=1)   # H x (per_row W) x C
        ax.imshow(strip.squeeze(-1).numpy(), cmap="gray" if images.shape[-1] == 1 else None, interpolation="nearest")
        score = f": quality {shapes_distance(images):.1f}" if quality else ""
        ax.set_title(f"{label}{score} ({len(images)} {'samples' if quality else 'images'})", fontsize=8, loc="left")
        ax.axis("off")
    save(fig, out, name)


def draw(args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("figures.py draws with matplotlib, an optional extra: pip install matplotlib") from None
    os.makedirs(args.out, exist_ok=True)
    forward_process(plt, args.out)
    schedules(plt, args.out)
    posterior_coefficients(plt, args.out)
    shifted_schedules(plt, args.out)
    if args.model:
        loss_and_bound(plt, args.out, args.model, args.n)
    if args.rd:
        rate_distortion_curve(plt, args.out, args.rd)
    if args.nfe:
        nfe_curves(plt, args.out, args.nfe)
    if args.grids:
        sample_rows(plt, args.out, args.grids, args.grids_name, args.per_row, not args.grids_plain)
    if args.log:
        loss_curves(plt, args.out, args.log)
    if args.edits:
        edits(plt, args.out, args.edits)
    if args.autoencoder:
        reconstructions(plt, args.out, args.autoencoder, args.recon_data)


def main(argv=None):
    try:
        draw(get_parser().parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
