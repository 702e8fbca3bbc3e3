"""Caption conditioning (latent diffusion's cross-attention, Rombach et al. 2022, Sec. 3.3) on the built-in captioned
shapes (train.py --data captions: 4 kinds in any of 4 colours, "red disk"): does a sample show the colour and the
kind its caption asks for, for the captions the model was trained on and for the combinations it never saw?
  python docs/measure/captions.py folder DIR --hold-out 'red cross' ...   # the training set, less some captions,
                                                                          # as a folder: one subfolder per caption
  python docs/measure/captions.py score RUN [--guidance W] [-n 16]        # every caption's samples, scored
  python docs/measure/captions.py score RUN --guidance 3 --figure assets/captions_32.png   # and 8 of each drawn
Scores come from metrics.py's small classifier trained on captioned shapes (16 classes, colour x kind); its own
accuracy on held-out real shapes is printed beside them, as the reference.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from data import CAPTIONS, SHAPES_N, load_file, make_shapes  # noqa: E402
from imagefiles import atomic_write, from_uint8, png_bytes, save_grid  # noqa: E402
from metrics import classify  # noqa: E402


def folder(args):
    """The built-in captioned shapes (the images train.py --data captions trains on) less the held-out captions."""
    unknown = set(args.hold_out) - set(CAPTIONS)
    if unknown:
        raise SystemExit(f"error: --hold-out {sorted(unknown)}: not among {', '.join(CAPTIONS)}")
    images, labels = make_shapes(SHAPES_N, args.image_size, 3, seed=0, captions=True)
    kept = 0
    for k, (image, label) in enumerate(zip(images, labels)):
        caption = CAPTIONS[label]
        if caption in args.hold_out:
            continue
        os.makedirs(os.path.join(args.dir, caption), exist_ok=True)
        atomic_write(os.path.join(args.dir, caption, f"{k:05d}.png"), lambda f: f.write(png_bytes(image)))
        kept += 1
    print(f"wrote {kept} images of {len(CAPTIONS) - len(args.hold_out)} captions to {args.dir} "
          f"(held out: {', '.join(args.hold_out) or 'none'})")


def score(args):
    ckpt = torch.load(os.path.join(args.run, "ckpt.pt") if os.path.isdir(args.run) else args.run, map_location="cpu",
                      weights_only=False)
    if not ckpt.get("model_config", {}).get("captions"):
        raise SystemExit(f"error: {args.run} is not a caption model (train.py --caption-cond)")
    seen = set(ckpt["model_config"]["captions"])
    npz = args.npz or os.path.join(args.run if os.path.isdir(args.run) else ".", f"captions_w{args.guidance:g}.npz")
    command = [sys.executable, os.path.join(ROOT, "sample.py"), args.run, "-n", str(args.n * len(CAPTIONS)),
               "--seed", "0", "--sampler", "ddpm", "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--npz", npz, "--out", npz[:-4] + ".png", *[a for c in CAPTIONS for a in ("--caption", c)]]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    images, asked = load_file(npz)  # sample.py's arr_1: the caption's index in the --caption list, CAPTIONS' order
    if args.figure:  # one row per caption, its first 8 samples
        save_grid(args.figure, from_uint8(torch.cat([images[asked == k][:8] for k in range(len(CAPTIONS))])), nrow=8)
        print(f"wrote {args.figure}")
    real, real_labels = make_shapes(1000, images.shape[1], 3, seed=1, captions=True)
    rows = [("real held-out shapes", classify(real, captions=True), real_labels)]
    got = classify(images, captions=True)
    for name, keep in (("captions it was trained on", [CAPTIONS[a] in seen for a in asked.tolist()]),
                       ("captions it never saw", [CAPTIONS[a] not in seen for a in asked.tolist()])):
        keep = torch.tensor(keep)
        if keep.any():
            rows.append((name, got[keep], asked[keep]))
    print(f"| {args.run}, guidance {args.guidance:g} | n | colour right | kind right | both |\n|---|---|---|---|---|")
    for name, pred, truth in rows:
        print(f"| {name} | {len(pred)} | {(pred // 4 == truth // 4).float().mean():.1%} | "
              f"{(pred % 4 == truth % 4).float().mean():.1%} | {(pred == truth).float().mean():.1%} |")
    for c in sorted(set(CAPTIONS) - seen):
        k = CAPTIONS.index(c)
        pred = got[asked == k]
        print(f"  never seen, {c!r}: drawn as " + ", ".join(
            f"{CAPTIONS[v]} {(pred == v).sum().item()}" for v in pred.unique(sorted=True).tolist()))


def main():
    torch.set_num_threads(2)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("folder")
    f.add_argument("dir")
    f.add_argument("--hold-out", nargs="*", default=[], help="captions left out of the folder")
    f.add_argument("--image-size", type=int, default=32)
    s = sub.add_parser("score")
    s.add_argument("run", help="a train.py --caption-cond run (folder or checkpoint)")
    s.add_argument("-n", type=int, default=16, help="samples per caption")
    s.add_argument("--guidance", type=float, default=0.0)
    s.add_argument("--steps", type=int, default=100, help="ancestral steps")
    s.add_argument("--npz", default="", help="where the samples go (default: in the run, by guidance)")
    s.add_argument("--figure", default="", help="also a PNG of 8 samples a caption, one row each")
    args = p.parse_args()
    folder(args) if args.what == "folder" else score(args)


if __name__ == "__main__":
    main()
