"""Inpaint with a diffusers pipeline of any base (SD 1.x, SDXL, SD3, FLUX.1 Fill) and decode with our decoder.

    python scripts/inpaint.py --vae OUR_CHECKPOINT --pipeline PIPELINE_FOLDER --image IMG --mask MASK \\
        --prompt "..." --out OUT.png [--compare] [--steps 50] [--guidance G] [--size N] [--seed 0] [--device auto]

--pipeline is a local pipeline folder (model_index.json, ...); its class picks the inpainting pipeline
(StableDiffusion*: StableDiffusionInpaintPipeline, StableDiffusionXL*: StableDiffusionXLInpaintPipeline,
StableDiffusion3*: StableDiffusion3InpaintPipeline, FluxFillPipeline). --vae is any checkpoint of ours that
scripts/export.py reads (a run checkpoint, a diffusers or decoder export) trained on that pipeline's VAE.
The pipeline runs with its own VAE and returns its final latents (output_type="latent"); we undo its VAE's
factors (z = latents / scaling_factor + shift_factor; FLUX's packed latents are unpacked first) and decode z
with our decoder conditioned on the original image and the mask. --compare also writes OUT_pipeline.png, the
pipeline VAE's plain decode of the same z. The image and mask (white = hole) are centre-cropped to the largest
square and resized to --size (default: the pipeline's native size). Nothing is downloaded.
Exit code 2: a missing or foreign folder or file.
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
from ldm.cli import at_least, existing, multiple_of_8, non_negative, tile_side  # noqa: E402
from ldm import CheckpointError, load_autoencoder  # noqa: E402
from ldm.tiling import DEFAULT_TILE, TILE_ABOVE, auto_tile  # noqa: E402

# model_index.json _class_name prefix -> the inpainting pipeline of that family (longest prefix first)
PIPELINES = (("StableDiffusionXL", "StableDiffusionXLInpaintPipeline"),
             ("StableDiffusion3", "StableDiffusion3InpaintPipeline"),
             ("StableDiffusion", "StableDiffusionInpaintPipeline"),
             ("FluxFill", "FluxFillPipeline"))


class InpaintError(ValueError):
    """A missing or foreign input; the message names it."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="our checkpoint: run checkpoint, diffusers or decoder export")
    p.add_argument("--pipeline", required=True, help="local inpainting (or base model) pipeline folder")
    p.add_argument("--image", type=existing, required=True)
    p.add_argument("--mask", type=existing, required=True, help="white = hole (to be generated)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="(not FLUX)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--compare", action="store_true", help="also write OUT_pipeline.png: the pipeline VAE's decode")
    p.add_argument("--steps", type=at_least(1), default=50)
    p.add_argument("--guidance", type=non_negative, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--size", type=multiple_of_8, default=None, help="square side in pixels, a multiple of 8 "
                                                          "(default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=tile_side, default=None,
                   help=f"decode in latent tiles of N px (default: {DEFAULT_TILE} above {TILE_ABOVE} px; 0: never)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    return p.parse_args(argv)


def pipeline_class(pipeline: Path) -> str:
    """The inpainting pipeline class for a pipeline folder, from its model_index.json."""
    index = pipeline / "model_index.json"
    if not index.is_file():
        raise InpaintError(f"--pipeline {pipeline}: no such folder with model_index.json (a local pipeline "
                           "folder, e.g. a download of stable-diffusion-xl-base-1.0 or FLUX.1-Fill-dev)")
    name = json.loads(index.read_text()).get("_class_name") or ""
    found = next((cls for prefix, cls in PIPELINES if name.startswith(prefix)), None)
    if found is None:
        raise InpaintError(f"--pipeline {pipeline}: model_index.json names {name!r}; supported: "
                           f"{', '.join(p + '*' for p, _ in PIPELINES)}")
    return found


def load_pipeline(pipeline_dir, device="cpu"):
    """The family's inpainting pipeline from a local folder, with its own VAE."""
    import diffusers
    pipeline_dir = Path(pipeline_dir)
    cls = getattr(diffusers, pipeline_class(pipeline_dir))
    # components saved as [null, null] (SD3 without T5): passed as None, else diffusers asks for them
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    absent = {name: None for name, v in index.items() if isinstance(v, list) and v and v[0] is None}
    return cls.from_pretrained(pipeline_dir, local_files_only=True, **absent).to(device)


def load_vae(vae_path, pipe, device="cpu"):
    """Our autoencoder; its latent width must be the pipeline VAE's."""
    if not Path(vae_path).exists():
        raise InpaintError(f"--vae {vae_path}: no such file or folder")
    try:
        vae = load_autoencoder(vae_path, device=device)
    except CheckpointError as err:
        raise InpaintError(f"--vae {err}") from None
    theirs = pipe.vae.config.latent_channels
    if vae.config["embed_dim"] != theirs:
        raise InpaintError(f"--vae {vae_path}: {vae.config['embed_dim']} latent channels (base "
                           f"{vae.config.get('base')}), the pipeline's VAE {theirs}: train on that pipeline's VAE")
    return vae


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


def to_tensors(image, mask):
    """PIL image and mask -> (1,3,S,S) in [-1, 1] and (1,1,S,S) in {0, 1} (1 = hole)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    m = torch.from_numpy(np.asarray(mask) > 127).float()[None, None]
    return x, m


def final_latents(pipe, image, mask, prompt, size, steps, seed, guidance=None, negative_prompt=None):
    """The pipeline's final latents as its VAE decodes them: z = latents / scaling_factor + shift_factor,
    (1, C, size/8, size/8)."""
    kwargs = dict(image=image, mask_image=mask, height=size, width=size, num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")  # CPU: the same noise
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    latents = pipe(prompt, **kwargs).images
    if hasattr(pipe, "_unpack_latents"):  # FLUX: (B, seq, 4C) patches -> (B, C, h, w)
        latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    config = pipe.vae.config
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def to_image(x: torch.Tensor) -> Image.Image:
    """(1,3,H,W) in [-1, 1] -> RGB PIL image."""
    pixels = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def native_size(pipe) -> int:
    net = getattr(pipe, "unet", None) or pipe.transformer
    return (getattr(pipe, "default_sample_size", None) or net.config.sample_size) * pipe.vae_scale_factor


@torch.no_grad()
def inpaint(pipe, vae, image_path, mask_path, prompt, size=None, steps=50, seed=0, guidance=None,
            negative_prompt=None, compare=False, tile=None):
    """(our decode, the pipeline VAE's decode or None) of the pipeline's final latents, as PIL images."""
    size = size or native_size(pipe)
    multiple = pipe.vae_scale_factor * (2 if hasattr(pipe, "_unpack_latents") else 1)  # FLUX packs 2x2 patches
    if size % multiple:
        raise InpaintError(f"--size {size}: must be a multiple of {multiple} for this pipeline")
    image, mask = load_inputs(image_path, mask_path, size)
    z = final_latents(pipe, image, mask, prompt, size, steps, seed, guidance, negative_prompt)
    x, m = to_tensors(image, mask)
    device = next(vae.parameters()).device
    ours = to_image(vae.decode(z.to(device, torch.float32), x.to(device), m.to(device), tile=auto_tile(tile, size)))
    theirs = None
    if compare:
        theirs = to_image(pipe.vae.decode(z.to(pipe.vae.device, pipe.vae.dtype)).sample)
    return ours, theirs


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        pipeline_class(Path(args.pipeline))  # before loading anything
        pipe = load_pipeline(args.pipeline, device)
        vae = load_vae(args.vae, pipe, device)
        ours, theirs = inpaint(pipe, vae, args.image, args.mask, args.prompt, args.size, args.steps, args.seed,
                               args.guidance, args.negative_prompt, args.compare, args.tile)
    except InpaintError as err:
        print(f"inpaint: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ours.save(out)
    print(out)
    if theirs is not None:
        theirs.save(out.with_name(f"{out.stem}_pipeline.png"))
        print(out.with_name(f"{out.stem}_pipeline.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
