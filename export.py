"""
Export a trained model to diffusers: a folder that UNet2DModel.from_pretrained and DDPMPipeline.from_pretrained load
(config.json, diffusion_pytorch_model.safetensors written without the safetensors package, scheduler_config.json,
model_index.json), the network's EMA weights and a scheduler with the model's own diffusion and timestep grid, or a
one-line refusal where diffusers cannot hold the model (a latent model, a caption model, a consistency student).
  python export.py out --to-diffusers ddpm-out          # then: DDPMPipeline.from_pretrained("ddpm-out")
A command line: nothing imports this file.
"""
from checkpoint import PAPER_DIFFUSION, PAPER_KIND, diffusion_betas, load_model
from pretrained import DIFFUSERS_PREDICTIONS, write_diffusers
from runtime import USER_ERRORS, ArgumentParser, error_line

# diffusers' names for this project's schedules and variances (its predictions: pretrained.DIFFUSERS_PREDICTIONS)
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


def betas_config(diffusion_config):
    """The scheduler's betas: by name for the linear and cosine schedules (Nichol & Dhariwal's cosine is diffusers'
    squaredcos_cap_v2), the model's own betas for any other (simple diffusion's shifted cosine), so that the export's
    alphas_cumprod are the model's."""
    c = {**PAPER_DIFFUSION, **diffusion_config}
    if c.get("logsnr_shift") or c["schedule"] not in SCHEDULES:
        return {"trained_betas": diffusion_betas(c).tolist()}
    return {"beta_schedule": SCHEDULES[c["schedule"]], "beta_start": c["beta_start"], "beta_end": c["beta_end"]}


def scheduler_config(diffusion_config, student=False):
    """The scheduler_config.json of a diffusion config of this project, on the trailing timestep grid every sampler
    here uses (samplers.spaced_timesteps; K steps of T = 1000: 999, 999 - 1000 / K, ...). A diffusion model: a
    DDPMScheduler, Algorithm 2 with the model's variance and x0 clipping over all T steps (at K < T steps diffusers
    respaces the chain with its own variance, 1 - abar_t / abar_prev for fixed_large, which no sampler here uses:
    sample.py's --sampler ddpm at K steps takes the posterior's). A progressive student: the deterministic DDIM step
    it was distilled to, which diffusers writes as DPM-Solver++ of order 1 (the same update: the data-prediction
    solver's first-order step is DDIM's), with x0 clipped as its thresholding at 1 (DDIMScheduler would step by
    T // K, off the trailing grid where K does not divide T)."""
    c = {**PAPER_DIFFUSION, **diffusion_config}
    common = dict(num_train_timesteps=c["num_timesteps"], **betas_config(c),
                  prediction_type=DIFFUSERS_PREDICTIONS[c["mean_type"]], timestep_spacing="trailing", steps_offset=0)
    if student:
        return dict(_class_name="DPMSolverMultistepScheduler", **common, algorithm_type="dpmsolver++", solver_order=1,
                    final_sigmas_type="zero", thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=0.0)
    return dict(_class_name="DDPMScheduler", **common, variance_type=VARIANCES[c["var_type"]], clip_sample=True,
                clip_sample_range=1.0)


def export(args):
    net, diffusion_config, meta, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    if meta["kind"] not in (PAPER_KIND, "progressive"):
        raise ValueError(f"{args.ckpt} is a {meta['kind']} model: diffusers' UNet2DModel and DDPM scheduler hold a "
                         f"diffusion model (or a progressive student), not this")
    if meta["first_stage"] is not None:
        raise ValueError(f"{args.ckpt} is a latent diffusion model: a diffusers DDPMPipeline has no decoder for its "
                         f"latents (nor their scale factor) and would hand out latents as images")
    write_diffusers(args.to_diffusers, net, scheduler_config(diffusion_config, student=meta["kind"] == "progressive"))
    steps = f" at its {meta['sampling']['steps']} steps" if meta["sampling"] else ""
    how = (f"DDPMPipeline.from_pretrained({args.to_diffusers!r})(num_inference_steps=...) samples it{steps}"
           if net.config.get("num_classes") is None else "a class-conditional UNet2DModel: call it with class_labels "
           f"(label {net.config['num_classes']} is no label); DDPMPipeline passes none and cannot sample it")
    print(f"wrote {args.to_diffusers}: {desc} as a diffusers UNet2DModel with its scheduler ({how})")


def main(argv=None):
    p = ArgumentParser(description="Export a train.py checkpoint as a diffusers folder (UNet2DModel + DDPMScheduler).")
    p.add_argument("ckpt", help="a train.py checkpoint or run folder (a diffusion model or a progressive student)")
    p.add_argument("--to-diffusers", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of their EMA")
    try:
        export(p.parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(error_line(e)) from None


if __name__ == "__main__":
    main()
