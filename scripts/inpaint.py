"""Inpaint (or edit) with a diffusers pipeline and decode with our decoder, at the image's own shape: SD 1.x, SDXL,
SD3, FLUX.1 Fill/dev/Kontext, Chroma, Z-Image, FLUX.2 Klein, Qwen-Image, Qwen-Image-Edit, and their ControlNet,
Control and PAG variants; with --edit, FLUX.1 Kontext, Qwen-Image-Edit (Plus) and FLUX.2 Klein editing.

    python scripts/inpaint.py --vae OUR_CHECKPOINT --pipeline PIPELINE_FOLDER --image IMG --mask MASK \\
        --prompt "..." --out OUT.png [--compare] [--paste] [--size N] [--steps 50] [--seed 0] [--device auto] \\
        [--control CONTROL.png] [--control-mode N] [--extra KEY=VALUE ...] [--edit]
    python scripts/inpaint.py --vae OUR_CHECKPOINT --pipeline PIPELINE_FOLDER --batch LIST.csv [...]

--pipeline is a local pipeline folder (model_index.json, ...); its class picks the pipeline
(ldm/decoding/table.py PIPELINES). --vae is any checkpoint of ours that scripts/export.py reads (a run checkpoint, a
diffusers or decoder export) trained on that pipeline's VAE. The image and mask (white = hole) keep their aspect:
they are resized to the pipeline's pixel budget (its native side squared, or --size N squared) with sides a
multiple it accepts (Qwen-Image-Edit picks its own size, about 1024^2 px: no --size); the pipeline runs there with
its own VAE to its final latents, which we decode with our decoder conditioned on the resized image and mask, and
OUT is that decode resized back to the input's size.
--edit runs the folder's editing pipeline on the image and prompt; the mask (white) is the region the edit may
change, and our decoder keeps the rest of the original. --control: the control image of a ControlNet or Control
pipeline (the image's size); --control-mode: ControlNet-Union's mode; --extra: any further keyword the pipeline's
__call__ takes (the value read as YAML: 0.5, true, [1, 2], text).
--paste puts the input's own pixels back in the known region (mask black) at full resolution. --compare also
writes OUT_pipeline.EXT: the pipeline VAE's plain decode of the same latents, resized (and pasted) the same way.
--batch runs every row of a CSV file (image, mask, prompt, out[, control[, control_mode]]; paths relative to the
file) with one pipeline load. Nothing is downloaded. Exit code 2: a missing or foreign folder, file or value.
"""
import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ldm.cli import at_least, existing, fraction, non_negative, script_main, tile_side  # noqa: E402
from ldm.decoding.pipelines import (Job, PipelineError, check_decoder, check_inputs, inpaint,  # noqa: E402
                                    load_decoder, load_pipeline, read_batch, read_images, select, vae_config)
from ldm.evaluation.loop import to_uint8  # noqa: E402
from ldm.metrics import save_grid  # noqa: E402
from ldm.modules.tiling import DEFAULT_TILE, TILE_ABOVE  # noqa: E402

SINGLE = ("image", "mask", "prompt", "out")  # the flags one pair needs, and --batch replaces


def key_value(text: str):
    """'KEY=VALUE' -> (KEY, VALUE read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: want KEY=VALUE, KEY a keyword of the pipeline")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="our checkpoint: run checkpoint, diffusers or decoder export")
    p.add_argument("--pipeline", required=True, help="local inpainting (or base model) pipeline folder")
    p.add_argument("--edit", action="store_true", help="run the folder's editing pipeline; --mask: what it may change")
    p.add_argument("--image", type=existing)
    p.add_argument("--mask", type=existing, help="white = hole (to be generated), or the region an edit may change")
    p.add_argument("--prompt")
    p.add_argument("--out", help="output image (its extension names the format)")
    p.add_argument("--batch", type=existing, help="CSV file of image, mask, prompt, out[, control[, control_mode]] "
                                                  "rows (instead of those flags)")
    p.add_argument("--control", type=existing, help="control image of a ControlNet or Control pipeline")
    p.add_argument("--control-mode", type=at_least(0), default=None, help="ControlNet-Union's control mode")
    p.add_argument("--extra", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a further keyword of the pipeline's __call__ (repeatable)")
    p.add_argument("--negative-prompt", default=None, help="(pipelines that take one)")
    p.add_argument("--compare", action="store_true", help="also write OUT_pipeline.EXT: the pipeline VAE's decode")
    p.add_argument("--paste", action="store_true", help="the input's own pixels in the known region, at full size")
    p.add_argument("--steps", type=at_least(1), default=50)
    p.add_argument("--guidance", type=non_negative, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--strength", type=fraction, default=None, help="how far the hole is re-noised, in [0, 1] "
                                                                      "(default: the pipeline's; FLUX.1 dev 0.6)")
    p.add_argument("--size", type=at_least(8), default=None, help="pixel budget: about N x N px at the input's "
                                                                  "aspect (default: the pipeline's native side)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=tile_side, default=None,
                   help=f"decode in latent tiles of N px (default: {DEFAULT_TILE} above {TILE_ABOVE} px; 0: never)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    args = p.parse_args(argv)
    given = [f"--{k}" for k in SINGLE + ("control",) if getattr(args, k) is not None]
    if args.batch and given:
        p.error(f"--batch replaces {', '.join(given)}")
    if not args.batch and len([g for g in given if g != "--control"]) < len(SINGLE):
        p.error(f"give --batch or all of {', '.join('--' + k for k in SINGLE)}")
    return args


def jobs_of(args) -> list[Job]:
    if args.batch:
        return [job if job.control_mode is not None else job._replace(control_mode=args.control_mode)
                for job in read_batch(args.batch)]
    return [Job(args.image, args.mask, args.prompt, Path(args.out), args.control, args.control_mode)]


@script_main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    run = dict(steps=args.steps, seed=args.seed, size=args.size, guidance=args.guidance, strength=args.strength,
               negative_prompt=args.negative_prompt, extra=dict(args.extra))
    try:  # every check before the pipeline loads
        jobs = jobs_of(args)
        import diffusers
        cls = getattr(diffusers, select(args.pipeline, args.edit).cls)
        for job in jobs:
            check_inputs(cls, job.control, run["extra"], control_mode=job.control_mode, guidance_scale=args.guidance,
                         strength=args.strength, negative_prompt=args.negative_prompt)
        decoder = load_decoder(args.vae, device)
        check_decoder(decoder, vae_config(args.pipeline), f"--vae {args.vae}")
        pipe = load_pipeline(args.pipeline, device, args.edit)
        for job in jobs:
            image, mask, control = read_images(job.image, job.mask, job.control)
            ours, theirs = inpaint(pipe, decoder, image, mask, job.prompt, args.compare, args.paste, args.tile,
                                   control=control, control_mode=job.control_mode, **run)
            for y, path in ((ours, job.out), (theirs, job.out.with_name(f"{job.out.stem}_pipeline{job.out.suffix}"))):
                if y is not None:
                    save_grid(to_uint8(y[0]), path)
                    print(path)
    except PipelineError as err:
        print(f"inpaint: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
