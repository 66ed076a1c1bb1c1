"""diffusers inpainting pipelines run to their final latents, for our decoder to decode at the image's own shape.

Which pipeline: a folder's model_index.json `_class_name` with its suffix ("InpaintPipeline", "Img2ImgPipeline" or
"Pipeline") taken off is the family's stem, and the entry of PIPELINES that lists that stem runs it. So a
text-to-image download runs as its family's inpainting pipeline, as diffusers' AutoPipelineForInpainting maps
them where it does (StableDiffusion*, StableDiffusionXL*, StableDiffusion3*, Flux* -> FluxInpaintPipeline,
ZImage* -> ZImageInpaintPipeline, QwenImage* -> QwenImageInpaintPipeline, QwenImageEdit* ->
QwenImageEditInpaintPipeline); it maps no FLUX.1 Fill, Kontext, Chroma or FLUX.2 Klein folder, which the same
rule sends to FluxFillPipeline, FluxKontextInpaintPipeline, ChromaInpaintPipeline and Flux2KleinInpaintPipeline
(FLUX.2 dev, Flux2Pipeline, has another text encoder than Klein's: not selected). Adding a pipeline is one entry.

Which size: the input's aspect at the pipeline's pixel budget (its native side squared, or a given side's
square), each side the nearest multiple the pipeline accepts; the image and mask are resized to it, the pipeline
runs there, our decoder decodes there conditioned on them, and the result is resized back to the input's size.
QwenImageEditInpaintPipeline picks its own size (1024^2 px at the image's aspect, ignoring height and width): the
image and mask are resized to it instead, and given as PIL images, as it reads them.

Conventions (ldm/metrics.py): images (B,3,H,W) in [-1,1], masks (B,1,H,W) in {0,1} with 1 = hole; z (B,C,h,w)
is what the pipeline's VAE decodes (its own normalisation undone).
"""
import csv
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.bases import describe
from ..latent_norm import LatentNorm, agree
from ..metrics import paste_back
from ..modules.tiling import auto_tile

SUFFIXES = ("InpaintPipeline", "Img2ImgPipeline", "Pipeline")  # longest first
BATCH_COLUMNS = ("image", "mask", "prompt", "out")  # a --batch file's


class PipelineError(ValueError):
    """A missing or foreign pipeline folder, decoder or input; the message names it."""


def unpack_2x2(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FLUX.1's packed tokens (B, (h/2)(w/2), 4C), each a 2x2 latent patch (C, 2, 2) -> (B, C, h, w)."""
    b, _, c4 = latents.shape
    return latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def vae_multiple(pipe) -> int:
    return pipe.vae_scale_factor


def edit_size(pipe, width: int, height: int) -> tuple[int, int]:
    """QwenImageEditInpaintPipeline's own size, whatever height and width it is given: the image's aspect at its
    area of 1024^2 px, sides multiples of 32 (its calculate_dimensions). A size that function maps onto itself, so
    that the pipeline keeps the image it is given, and our decoder is conditioned on what it denoised."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as edit
    w, h = width, height
    for _ in range(8):  # a fixed point within a step or two: the rounded sides' aspect rounds back to them
        (w, h), (w0, h0) = edit.calculate_dimensions(1024 * 1024, w / h)[:2], (w, h)
        if (w, h) == (w0, h0):
            break
    return w, h


def patch_multiple(pipe) -> int:
    """2x2 latent patches: the sides a multiple of twice the VAE's scale factor."""
    return 2 * pipe.vae_scale_factor


@dataclass(frozen=True)
class Pipeline:
    """How one diffusers inpainting pipeline is driven."""
    cls: str  # the diffusers class
    stems: tuple  # model_index.json class-name stems that select it
    unpack: Optional[Callable] = None  # output_type="latent" comes back packed: (latents, h, w) -> (B, C, h, w)
    denormalised: bool = False  # output_type="latent" comes back as its VAE decodes it (else normalised)
    multiple: Callable = vae_multiple  # pipe -> the pixel multiple its height and width must be
    native: int = 0  # native side in px where the pipeline states none (default_sample_size, sample_size)
    call: dict = field(default_factory=dict)  # further __call__ keywords
    size: Optional[Callable] = None  # (pipe, width, height) -> (w, h): a pipeline that picks its own size
    pil: bool = False  # takes the image and mask as PIL images (its own resize reads image.size)
    frames: bool = False  # its VAE decodes one frame of video latents, (B, C, 1, h, w)


PIPELINES = (
    Pipeline("StableDiffusionInpaintPipeline", ("StableDiffusion",)),
    Pipeline("StableDiffusionXLInpaintPipeline", ("StableDiffusionXL",)),
    Pipeline("StableDiffusion3InpaintPipeline", ("StableDiffusion3",),
             multiple=lambda pipe: pipe.vae_scale_factor * pipe.patch_size),  # the transformer's patches
    Pipeline("FluxFillPipeline", ("FluxFill",), unpack=unpack_2x2, multiple=patch_multiple),
    Pipeline("FluxInpaintPipeline", ("Flux",), unpack=unpack_2x2, multiple=patch_multiple),
    # _auto_resize=False: generate at the size given, not at the nearest of Kontext's preferred resolutions
    Pipeline("FluxKontextInpaintPipeline", ("FluxKontext",), unpack=unpack_2x2, multiple=patch_multiple,
             call={"_auto_resize": False}),
    Pipeline("ChromaInpaintPipeline", ("Chroma",), unpack=unpack_2x2, multiple=patch_multiple),
    Pipeline("ZImageInpaintPipeline", ("ZImage",), multiple=patch_multiple, native=1024),  # patches, not packed
    # FLUX.2's VAE: the pipeline unpacks, undoes its VAE's batch norm and unpatchifies before returning the latents
    Pipeline("Flux2KleinInpaintPipeline", ("Flux2Klein",), denormalised=True, multiple=patch_multiple),
    # Qwen-Image's VAE (one frame): packed as FLUX.1's (its _unpack_latents adds the frame axis), per-channel statistics
    Pipeline("QwenImageInpaintPipeline", ("QwenImage",), unpack=unpack_2x2, multiple=patch_multiple, frames=True),
    Pipeline("QwenImageEditInpaintPipeline", ("QwenImageEdit",), unpack=unpack_2x2, multiple=patch_multiple,
             size=edit_size, pil=True, frames=True),
)


def stem(class_name: str) -> str:
    """'FluxKontextInpaintPipeline' -> 'FluxKontext'."""
    return next((class_name[:-len(s)] for s in SUFFIXES if class_name.endswith(s)), class_name)


def supported() -> str:
    return ", ".join(f"{s}Pipeline" for p in PIPELINES for s in p.stems) + " (and their Inpaint/Img2Img variants)"


def read_index(folder) -> dict:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise PipelineError(f"{folder}: no such folder with model_index.json (a local pipeline folder, e.g. a "
                            "download of stable-diffusion-xl-base-1.0 or FLUX.1-dev)")
    try:
        return json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{index}: not JSON ({err})") from None


def select(folder) -> Pipeline:
    """The PIPELINES entry that runs a pipeline folder, from its model_index.json."""
    name = read_index(folder).get("_class_name") or ""
    found = next((p for p in PIPELINES if stem(name) in p.stems), None)
    if found is None:
        raise PipelineError(f"{folder}: model_index.json names {name!r}; supported: {supported()}")
    return found


def entry(pipe) -> Pipeline:
    """The PIPELINES entry of a loaded pipeline."""
    found = next((p for p in PIPELINES if p.cls == type(pipe).__name__), None)
    if found is None:
        raise PipelineError(f"a {type(pipe).__name__}: not one of {', '.join(p.cls for p in PIPELINES)}")
    return found


def vae_config(folder) -> dict:
    """A pipeline folder's vae/config.json (nothing loaded)."""
    path = Path(folder) / "vae" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: not readable ({type(err).__name__}: {err})") from None
    if isinstance(config, dict) and "latent_channels" not in config and isinstance(config.get("z_dim"), int):
        config = {**config, "latent_channels": config["z_dim"]}  # AutoencoderKLQwenImage's name for it
    if not isinstance(config, dict) or not isinstance(config.get("latent_channels"), int):
        raise PipelineError(f"{path}: no latent_channels")
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


def load_pipeline(folder, device="cpu"):
    """The folder's inpainting pipeline (PIPELINES), with its own VAE; nothing is downloaded."""
    import diffusers
    cls = getattr(diffusers, select(folder).cls)
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


def as_tensors(image, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and mask as tensors or PIL images (mask white = hole) -> (B,3,H,W) in [-1,1], (B,1,H,W) in {0,1}."""
    if not isinstance(image, torch.Tensor):
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        image = image / 127.5 - 1
    if not isinstance(mask, torch.Tensor):
        mask = torch.from_numpy(np.asarray(mask.convert("L")) > 127)[None, None]
    if (image.dim() != 4 or image.shape[1] != 3 or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] not in (1, image.shape[0])):
        raise PipelineError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)}: want (B,3,H,W) and "
                            "(B or 1,1,H,W) of the same size")
    return image.float(), (mask > 0.5).float().expand(image.shape[0], -1, -1, -1)


def read_pair(image_path, mask_path):
    """(RGB image, L mask) PIL images of the same size from files (mask: white = hole)."""
    from data.images import open_image, to_rgb
    pair = []
    for name, path in (("image", image_path), ("mask", mask_path)):
        try:
            with open_image(path) as img:
                img.load()
                pair.append(to_rgb(img))
        except (OSError, ValueError) as err:  # missing, unreadable, truncated
            raise PipelineError(f"{name} {path}: not a readable image ({err})") from None
    image, mask = pair
    if image.size != mask.size:
        raise PipelineError(f"image {image_path} is {image.size[0]}x{image.size[1]} but mask {mask_path} "
                            f"{mask.size[0]}x{mask.size[1]}")
    return image, mask.convert("L")


def _keywords(pipe, **optional) -> dict:
    """The optional __call__ keywords that were given; one the pipeline does not take is refused, by name."""
    given = {k: v for k, v in optional.items() if v is not None}
    takes = inspect.signature(type(pipe).__call__).parameters
    for name in given:
        if name not in takes:
            raise PipelineError(f"{type(pipe).__name__} takes no {name}")
    return given


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


@torch.no_grad()
def final_latents(pipe, image, mask, prompt, steps=50, seed=0, size=None, guidance=None, strength=None,
                  negative_prompt=None):
    """Run the pipeline at the input's aspect (`size`: the pixel budget's side, default native) to its final
    latents: (z (B,C,h,w) as its VAE decodes them, the image (B,3,8h,8w) and mask (B,1,8h,8w) it was given)."""
    image, mask = as_tensors(image, mask)
    b, _, height, width = image.shape
    spec = entry(pipe)
    if spec.size is not None and size is not None:
        raise PipelineError(f"{spec.cls} picks its own size from the image's aspect: a size does not apply")
    w, h = spec.size(pipe, width, height) if spec.size else decode_size(width, height, size or native_size(pipe),
                                                                          spec.multiple(pipe))
    x, m = resize(image, (h, w)), resize_mask(mask, (h, w))
    if spec.pil:  # the image as the pipeline reads it, 8 bits, so that our decoder sees the same pixels
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    given = pil_pair(x, m) if spec.pil else dict(image=(x + 1) / 2, mask_image=m)
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    negative = [negative_prompt] * b if isinstance(negative_prompt, str) else negative_prompt
    kwargs = _keywords(pipe, guidance_scale=guidance, strength=strength, negative_prompt=negative)
    latents = pipe(prompt=prompts, **given, height=h, width=w,  # keywords: Kontext's and Qwen-Image-Edit's
                   num_inference_steps=steps, output_type="latent", **spec.call, **kwargs,  # come in their order
                   generator=torch.Generator("cpu").manual_seed(seed)).images  # CPU: the same noise on any device
    f = pipe.vae_scale_factor
    return to_z(pipe, latents, h // f, w // f), x, m


def pil_pair(x: torch.Tensor, m: torch.Tensor) -> dict:
    """Image (B,3,H,W) in [-1,1] and mask (B,1,H,W) as a pipeline's PIL `image` and `mask_image` (lists for B > 1)."""
    from PIL import Image
    images = [Image.fromarray(((v + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for v in x]
    masks = [Image.fromarray((v[0] * 255).byte().cpu().numpy(), mode="L") for v in m]
    return dict(image=images if len(images) > 1 else images[0], mask_image=masks if len(masks) > 1 else masks[0])


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
    (B,3,H,W) in [-1,1]; our decoder is conditioned on the image and mask at the decode size. `run`: as
    final_latents; `tile`: as the scripts' --tile."""
    image, mask = as_tensors(image, mask)
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


def read_batch(path) -> list[tuple[Path, Path, str, Path]]:
    """[(image, mask, prompt, out)] from a CSV file of those four columns (an optional header row of those names;
    blank lines skipped; quote a prompt that holds commas); relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PipelineError(f"{path}: not a readable CSV file ({err})") from None
    if rows and [c.strip().lower() for c in rows[0][1]] == list(BATCH_COLUMNS):
        rows = rows[1:]
    if not rows:
        raise PipelineError(f"{path}: no rows (want {', '.join(BATCH_COLUMNS)} per line)")
    jobs = []
    for n, row in rows:
        if len(row) != len(BATCH_COLUMNS):
            raise PipelineError(f"{path}:{n}: {len(row)} columns, want {len(BATCH_COLUMNS)}: "
                                f"{', '.join(BATCH_COLUMNS)}")
        image, mask, prompt, out = (c.strip() for c in row)
        image, mask, out = (path.parent / p for p in (image, mask, out))
        for name, p in (("image", image), ("mask", mask)):
            if not p.is_file():
                raise PipelineError(f"{path}:{n}: {name} {p}: no such file")
        jobs.append((image, mask, prompt, out))
    return jobs
