"""diffusers pipelines run to their final latents, for our decoder to decode at the image's own shape: the 22
inpainting pipelines of our VAEs' families and four editing pipelines (table.py: PIPELINES, one entry each).

Which size: the input's aspect at the pipeline's pixel budget (its native side squared, or a given side's
square), each side the nearest multiple the pipeline accepts; the image, mask and control image are resized to it,
the pipeline runs there, our decoder decodes there conditioned on the image and mask, and the result is resized
back to the input's size. Qwen-Image-Edit's pipelines pick their own size (1024^2 px at the image's aspect): the
inputs are resized to it instead, and given as PIL images, as they read them.

Editing pipelines take the image and the prompt only; the mask (white: the region the edit may change) goes to our
decoder alone, which keeps the rest of the original.

Conventions (ldm/metrics.py): images (B,3,H,W) in [-1,1], masks (B,1,H,W) in {0,1} with 1 = hole; z (B,C,h,w)
is what the pipeline's VAE decodes (its own normalisation undone).
"""
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats.bases import describe
from ..latent_norm import LatentNorm, agree
from ..metrics import paste_back
from ..modules.tiling import auto_tile
from .inputs import BATCH_COLUMNS, Job, as_tensors, read_batch, read_images, read_pair  # noqa: F401  (the API)
from .table import (PIPELINES, Pipeline, PipelineError, class_of, edit_size, entry, read_index, select, stem,  # noqa: F401
                    supported, unpack_2x2)

# __call__ keywords final_latents sets itself: not for `extra`
OWN = ("prompt", "image", "mask_image", "control_image", "control_mask", "height", "width", "num_inference_steps",
       "output_type", "generator", "return_dict", "guidance_scale", "strength", "negative_prompt", "control_mode")


def vae_config(folder) -> dict:
    """A pipeline folder's vae/config.json (nothing loaded)."""
    path = Path(folder) / "vae" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: not readable ({type(err).__name__}: {err})") from None
    return latent_config(config, path)


def latent_config(config, name) -> dict:
    """A VAE config with its latent width as latent_channels (AutoencoderKLQwenImage calls it z_dim)."""
    if isinstance(config, dict) and "latent_channels" not in config and isinstance(config.get("z_dim"), int):
        config = {**config, "latent_channels": config["z_dim"]}
    if not isinstance(config, dict) or not isinstance(config.get("latent_channels"), int):
        raise PipelineError(f"{name}: no latent_channels")
    return config


def check_decoder(decoder, vae: dict, name="the decoder") -> None:
    """Our decoder must be of the pipeline VAE's family (`vae`: its config): the same latent width and, where the
    VAE's config states one, the same latent normalisation (sd3 and flux are both 16 channels wide)."""
    norm = LatentNorm.from_diffusers_config(vae)
    theirs = {"z_channels": vae["latent_channels"], "use_quant_conv": vae.get("use_quant_conv", True),
              "latent_norm": norm and norm.as_config()}
    ours = {k: decoder.config.get(k) for k in ("z_channels", "use_quant_conv", "latent_norm")}
    if ours["z_channels"] != theirs["z_channels"] or (theirs["latent_norm"] and ours["latent_norm"]
                                                      and not agree(ours["latent_norm"], theirs["latent_norm"])):
        raise PipelineError(f"{name}: a decoder for {describe(ours)} (base {decoder.config.get('base')}); the "
                            f"pipeline's VAE has {describe(theirs)}: train on that pipeline's VAE")


def load_pipeline(folder, device="cpu", edit=False):
    """The folder's pipeline (PIPELINES; `edit`: its editing one), with its own VAE; nothing is downloaded."""
    import diffusers
    cls = getattr(diffusers, select(folder, edit).cls)
    # components saved as [null, null] (SD3 without T5): passed as None, else diffusers asks for them
    absent = {k: None for k, v in read_index(folder).items() if isinstance(v, list) and v and v[0] is None}
    return cls.from_pretrained(folder, local_files_only=True, **absent).to(device)


def native_size(pipe) -> int:
    """The pipeline's native side in px."""
    net = getattr(pipe, "unet", None) or pipe.transformer
    latent = getattr(pipe, "default_sample_size", None) or getattr(net.config, "sample_size", None)
    return entry(pipe).native or latent * pipe.vae_scale_factor


def decode_size(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """(w, h): the input's aspect at a budget of side^2 px, each the nearest multiple of `multiple` (at least one)."""
    scale = side / math.sqrt(width * height)
    return tuple(max(multiple, round(v * scale / multiple) * multiple) for v in (width, height))


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> (B,3,*size): bicubic with antialiasing (area-like when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(B,1,H,W) -> (B,1,*size) in {0,1}: bilinear, thresholded at one half."""
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return (mask > 0.5).float()


def _keywords(pipe, **optional) -> dict:
    """The optional __call__ keywords that were given; one the pipeline does not take is refused, by name."""
    given = {k: v for k, v in optional.items() if v is not None}
    takes = inspect.signature(class_of(pipe).__call__).parameters
    for name in given:
        if name not in takes:
            raise PipelineError(f"{class_of(pipe).__name__} takes no {name}")
    return given


def check_inputs(pipe, control=None, extra=None, **keywords) -> dict:
    """A control image where the pipeline takes one and only there; the optional `keywords` that were given (e.g.
    strength, control_mode) and the `extra` ones taken by the pipeline's __call__, `extra` none that final_latents
    sets itself. Refused by name, before any work (`pipe`: the pipeline or its class); -> the keywords given."""
    spec, name = entry(pipe), class_of(pipe).__name__
    if ("control" in spec.inputs) != (control is not None):
        raise PipelineError(f"{name} takes a control image: give one (--control)" if control is None
                            else f"{name} takes no control image (--control)")
    for key in extra or {}:
        if key in OWN:
            raise PipelineError(f"--extra {key}: set by inpainting itself (its own flag or argument)")
    return _keywords(pipe, **keywords, **(extra or {}))


def to_z(pipe, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The pipeline's output_type="latent" -> z (B, C, h, w) that its VAE decodes."""
    spec = entry(pipe)
    if spec.unpack is not None:
        latents = spec.unpack(latents, h, w)
    return latents if spec.denormalised else latent_norm(pipe).from_diffusion(latents)


def latent_norm(pipe) -> LatentNorm:
    """The pipeline VAE's own latent normalisation, as its config states it (factors, or per-channel statistics;
    none stated: the identity)."""
    return LatentNorm.from_diffusers_config(pipe.vae.config) or LatentNorm()


def run_size(pipe, spec: Pipeline, width: int, height: int, size=None) -> tuple[int, int]:
    """(w, h) the pipeline runs at for an input of width x height (`size`: the pixel budget's side)."""
    if spec.size is not None and size is not None:
        raise PipelineError(f"{spec.cls} picks its own size from the image's aspect: a size does not apply")
    if spec.size is not None:
        return spec.size(pipe, width, height)
    return decode_size(width, height, size or native_size(pipe), spec.multiple(pipe))


@torch.no_grad()
def final_latents(pipe, image, mask, prompt, steps=50, seed=0, size=None, guidance=None, strength=None,
                  negative_prompt=None, control=None, control_mode=None, extra=None):
    """Run the pipeline at the input's aspect (`size`: the pixel budget's side, default native) to its final
    latents: (z (B,C,h,w) as its VAE decodes them, the image (B,3,8h,8w) and mask (B,1,8h,8w) it was given).
    `control`: the control image (same size as the image) of a pipeline that takes one; `extra`: further __call__
    keywords. An editing pipeline is given the image alone; the mask is returned at the decode size, for ours."""
    image, mask, control = as_tensors(image, mask, control)
    negative = [negative_prompt] * len(image) if isinstance(negative_prompt, str) else negative_prompt
    optional = dict(guidance_scale=guidance, strength=strength, negative_prompt=negative, control_mode=control_mode)
    kwargs = check_inputs(pipe, control, extra, **optional)
    b, _, height, width = image.shape
    spec = entry(pipe)
    w, h = run_size(pipe, spec, width, height, size)
    x, m = resize(image, (h, w)), resize_mask(mask, (h, w))
    c = None if control is None else resize(control, (h, w))
    if spec.pil:  # the images as the pipeline reads them, 8 bits, so that our decoder sees the same pixels
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    given = {k: v for k, v in (("image", x), ("mask", m), ("control", c)) if k in spec.inputs}
    given = {spec.inputs[k]: (pil_images(v) if spec.pil else (v + 1) / 2 if k != "mask" else v)
             for k, v in given.items()}
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    latents = pipe(prompt=prompts, **given, height=h, width=w,  # keywords: Kontext's and Qwen-Image-Edit's
                   num_inference_steps=steps, output_type="latent", **(spec.call(w, h) if spec.call else {}),
                   **kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images  # CPU: the same noise
    f = pipe.vae_scale_factor
    return to_z(pipe, latents, h // f, w // f), x, m


def pil_images(v: torch.Tensor):
    """(B,3,H,W) in [-1,1] or a mask (B,1,H,W) in {0,1} -> a PIL image (a list of them for B > 1), 8 bits."""
    from PIL import Image
    if v.shape[1] == 1:
        images = [Image.fromarray((u[0] * 255).byte().cpu().numpy(), mode="L") for u in v]
    else:
        images = [Image.fromarray(((u + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for u in v]
    return images if len(images) > 1 else images[0]


@torch.no_grad()
def plain_decode(pipe, z: torch.Tensor) -> torch.Tensor:
    """The pipeline VAE's own decode of z: (B,3,8h,8w), float32 on the CPU (a video VAE's: of one frame)."""
    return vae_decode(pipe.vae, z, frames=entry(pipe).frames)


@torch.no_grad()
def vae_decode(vae, z: torch.Tensor, frames: bool = False) -> torch.Tensor:
    """A diffusers VAE's own decode of z: (B,3,8h,8w), float32 on the CPU; `frames`: a video VAE, of one frame."""
    z = z.to(vae.device, vae.dtype)
    if frames:
        return vae.decode(z[:, :, None]).sample[:, :, 0].float().cpu()
    return vae.decode(z).sample.float().cpu()


def load_vae(folder, device="cpu"):
    """A pipeline folder's own VAE alone (the class its model_index.json names), without the rest of the pipeline."""
    import diffusers
    named = read_index(folder).get("vae")
    cls = getattr(diffusers, named[1], None) if isinstance(named, list) and len(named) == 2 else None
    if cls is None:
        raise PipelineError(f"{folder}: model_index.json names no diffusers VAE class ({named!r})")
    return cls.from_pretrained(Path(folder) / "vae", local_files_only=True).to(device).eval()


def at_input_size(decoded: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, paste=False) -> torch.Tensor:
    """A decode resized to the input's size; `paste`: the input itself in its known region (mask 0)."""
    out = resize(decoded.float().cpu(), image.shape[-2:])
    return paste_back(out, image, mask) if paste else out


@torch.no_grad()
def inpaint(pipe, decoder, image, mask, prompt, compare=False, paste=False, tile=None, **run):
    """(our decode, the pipeline VAE's decode or None) of the pipeline's final latents at the input's size,
    (B,3,H,W) in [-1,1]; our decoder is conditioned on the image and mask (white: the hole, or the region an edit
    may change) at the decode size. Any pipeline of PIPELINES, inpainting or editing; a decoder of another family
    than the pipeline's VAE is refused first. `run`: as final_latents; `tile`: as the scripts' --tile."""
    check_decoder(decoder, latent_config(dict(pipe.vae.config), f"the {type(pipe).__name__}'s VAE"),
                  f"a decoder for a {type(pipe).__name__}")
    image, mask = as_tensors(image, mask)[:2]
    z, x, m = final_latents(pipe, image, mask, prompt, **run)
    device = next(decoder.parameters()).device
    ours = decoder.decode(z.to(device, torch.float32), x.to(device), m.to(device),
                          tile=auto_tile(tile, max(x.shape[-2:])))
    theirs = plain_decode(pipe, z) if compare else None
    return tuple(None if y is None else at_input_size(y, image, mask, paste) for y in (ours, theirs))


def load_decoder(path, device="cpu"):
    """Our autoencoder from any checkpoint scripts/export.py reads (a run checkpoint, a diffusers or decoder export)."""
    from ..formats.convert import CheckpointError, load_autoencoder
    if not Path(path).exists():
        raise PipelineError(f"{path}: no such file or folder")
    try:
        return load_autoencoder(path, device=device)
    except CheckpointError as err:
        raise PipelineError(str(err)) from None
