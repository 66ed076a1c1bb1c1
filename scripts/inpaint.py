"""Inpaint with Stable Diffusion and our decoder: diffusers' StableDiffusionInpaintPipeline, our VAE as pipe.vae.

    python scripts/inpaint.py --vae EXPORTED_DIFFUSERS_FOLDER --pipeline SD_INPAINT_FOLDER \\
        --image IMG --mask MASK --prompt "..." --out OUT.png [--steps 50] [--seed 0] [--device auto]

--vae is a folder written by `scripts/export.py --format diffusers`; --pipeline a local SD inpainting pipeline
folder (model_index.json, unet/, text_encoder/, ...). Nothing is downloaded. The image and the mask (white =
hole) are centre-cropped to the largest square and resized to --size (default: the pipeline's native size).
The pipeline hands the original image and the mask to our decoder's masked-image branch.
Exit code 2: a missing folder or file.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from data import load_crop  # noqa: E402
from ldm.cli import at_least, existing, multiple_of_8, non_negative  # noqa: E402


class InpaintError(ValueError):
    """A missing or foreign input; the message names it."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="exported diffusers AsymmetricAutoencoderKL folder")
    p.add_argument("--pipeline", required=True, help="local Stable Diffusion inpainting pipeline folder")
    p.add_argument("--image", type=existing, required=True)
    p.add_argument("--mask", type=existing, required=True, help="white = hole (to be generated)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--steps", type=at_least(1), default=50)
    p.add_argument("--guidance", type=non_negative, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=multiple_of_8, default=None, help="square side in pixels, a multiple of 8 "
                                                          "(default: the UNet's sample size x 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    return p.parse_args(argv)


def check_folders(vae: Path, pipeline: Path) -> None:
    """Refuse, naming the folder, anything that is not a local VAE export and a local pipeline folder."""
    config = vae / "config.json"
    if not config.is_file():
        raise InpaintError(f"--vae {vae}: no such folder with config.json (export one with "
                           "scripts/export.py CHECKPOINT --out DIR --format diffusers)")
    cls = json.loads(config.read_text()).get("_class_name")
    if cls != "AsymmetricAutoencoderKL":
        raise InpaintError(f"--vae {vae}: config.json describes {cls!r}, not an AsymmetricAutoencoderKL")
    if not (pipeline / "model_index.json").is_file():
        raise InpaintError(f"--pipeline {pipeline}: no such folder with model_index.json (a local Stable "
                           "Diffusion inpainting pipeline, e.g. a download of stable-diffusion-inpainting)")


def load_pipeline(vae_dir, pipeline_dir, device="cpu"):
    """StableDiffusionInpaintPipeline from local folders, with our exported decoder as its VAE."""
    from diffusers import AsymmetricAutoencoderKL, StableDiffusionInpaintPipeline
    vae_dir, pipeline_dir = Path(vae_dir), Path(pipeline_dir)
    check_folders(vae_dir, pipeline_dir)
    vae = AsymmetricAutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(pipeline_dir, vae=vae, local_files_only=True)
    return pipe.to(device)


def load_inputs(image_path, mask_path, size):
    """(RGB image, L mask with 255 = hole) PIL images, both the same centred square crop at size x size."""
    for name, path in (("--image", image_path), ("--mask", mask_path)):
        if not Path(path).is_file():
            raise InpaintError(f"{name} {path}: no such file")
    with Image.open(image_path) as a, Image.open(mask_path) as b:
        if a.size != b.size:
            raise InpaintError(f"--image is {a.size[0]}x{a.size[1]} but --mask {b.size[0]}x{b.size[1]}")
    image = Image.fromarray(load_crop(image_path, size))
    hole = load_crop(mask_path, size).mean(axis=2) > 127  # (size, size) bool; resizing blurs edges: threshold
    return image, Image.fromarray(hole.astype(np.uint8) * 255, mode="L")


def inpaint(pipe, image_path, mask_path, prompt, size=None, steps=50, seed=0, guidance=7.5, negative_prompt=None):
    """One inpainted PIL image."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % 8:
        raise InpaintError(f"--size {size}: must be a multiple of 8")
    image, mask = load_inputs(image_path, mask_path, size)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU generator: the same noise on every device
    return pipe(prompt, image=image, mask_image=mask, height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance, negative_prompt=negative_prompt, generator=generator).images[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        pipe = load_pipeline(args.vae, args.pipeline, device)
        result = inpaint(pipe, args.image, args.mask, args.prompt, args.size, args.steps, args.seed,
                         args.guidance, args.negative_prompt)
    except InpaintError as err:
        print(f"inpaint: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
