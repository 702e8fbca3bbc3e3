"""
Export a trained model to diffusers: a folder that UNet2DModel.from_pretrained and DDPMPipeline.from_pretrained load
(config.json, diffusion_pytorch_model.safetensors written without the safetensors package, scheduler_config.json,
model_index.json), the network's EMA weights and a DDPMScheduler with the model's own diffusion.
  python export.py out --to-diffusers ddpm-out          # then: DDPMPipeline.from_pretrained("ddpm-out")
A command line: nothing imports this file.
"""
from checkpoint import PAPER_KIND, load_model
from pretrained import write_diffusers
from runtime import USER_ERRORS, ArgumentParser, error_line

# DDPMScheduler's names for this project's schedules, predictions and variances
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


def scheduler_config(diffusion_config):
    """DDPMScheduler's scheduler_config.json for a diffusion config of this project: the same betas (linear, or
    Nichol & Dhariwal's cosine, which diffusers calls squaredcos_cap_v2), prediction, variance and x0 clipping."""
    c = diffusion_config
    if c.get("schedule", "linear") not in SCHEDULES:
        raise ValueError(f"the {c['schedule']} schedule has no DDPMScheduler equivalent")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": c["num_timesteps"], "beta_start": c["beta_start"],
            "beta_end": c["beta_end"], "beta_schedule": SCHEDULES[c.get("schedule", "linear")],
            "prediction_type": PREDICTIONS[c.get("mean_type", "eps")],
            "variance_type": VARIANCES[c.get("var_type", "fixedlarge")], "clip_sample": True,
            "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0}


def export(args):
    net, diffusion_config, meta, desc = load_model(args.ckpt, use_ema=not args.no_ema)
    if meta["kind"] not in (PAPER_KIND, "progressive"):
        raise ValueError(f"{args.ckpt} is a {meta['kind']} model: diffusers' UNet2DModel and DDPM scheduler hold a "
                         f"diffusion model (or a progressive student), not this")
    write_diffusers(args.to_diffusers, net, scheduler_config(diffusion_config))
    print(f"wrote {args.to_diffusers}: {desc} as a diffusers UNet2DModel with its DDPMScheduler "
          f"(DDPMPipeline.from_pretrained({args.to_diffusers!r}) samples it)")


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
