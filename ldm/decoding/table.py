"""Which diffusers pipelines we drive, and how: one `Pipeline` entry each in PIPELINES, no branch per class in the flow
(ldm/decoding/pipelines.py runs any entry the same way).

Which entry runs a folder: its model_index.json `_class_name` with its suffix ("InpaintPipeline", "Img2ImgPipeline",
"Pipeline") taken off is the family's stem, and the entry that lists that stem runs it: a text-to-image download
runs as its family's inpainting pipeline, as diffusers' AutoPipelineForInpainting maps them where it does. With
`edit` the editing entries are searched instead (an image and a prompt, no mask of theirs: the mask is our decoder's
alone, the region the edit may change).

An entry says which __call__ keywords take our inputs (`inputs`: the image, the mask, a control image), how the
latents come back (packed, normalised) and at which size it runs.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

SUFFIXES = ("InpaintPipeline", "Img2ImgPipeline", "Pipeline")  # longest first
INPAINT = {"image": "image", "mask": "mask_image"}  # our input -> the __call__ keyword it goes to
CONTROLNET = {**INPAINT, "control": "control_image"}  # a control image beside the image and mask
MASKED_CONTROL = {"image": "control_image", "mask": "control_mask"}  # inpainting ControlNets: the image is the control
EDIT = {"image": "image"}  # editing: the image alone


class PipelineError(ValueError):
    """A missing or foreign pipeline folder, decoder or input; the message names it."""


def unpack_2x2(latents, h: int, w: int):
    """FLUX.1's packed tokens (B, (h/2)(w/2), 4C), each a 2x2 latent patch (C, 2, 2) -> (B, C, h, w)."""
    b, _, c4 = latents.shape
    return latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def vae_multiple(pipe) -> int:
    return pipe.vae_scale_factor


def patch_multiple(pipe) -> int:
    """2x2 latent patches: the sides a multiple of twice the VAE's scale factor."""
    return 2 * pipe.vae_scale_factor


def transformer_patches(pipe) -> int:
    return pipe.vae_scale_factor * pipe.patch_size  # SD3's transformer patches


def edit_size(pipe, width: int, height: int) -> tuple[int, int]:
    """Qwen-Image-Edit's own size (its module's calculate_dimensions: the image's aspect at 1024^2 px, sides multiples
    of 32), whatever height and width it is given; a size that function maps onto itself, so that the pipeline keeps
    the image it is given at the size it generates, and our decoder is conditioned on what it denoised."""
    dimensions = sys.modules[type(pipe).__module__].calculate_dimensions
    w, h = width, height
    for _ in range(8):  # a fixed point within a step or two: the rounded sides' aspect rounds back to them
        (w, h), (w0, h0) = dimensions(1024 * 1024, w / h)[:2], (w, h)
        if (w, h) == (w0, h0):
            break
    return w, h


def kontext_size(w: int, h: int) -> dict:
    """Kontext: generate at the size given (max_area its area, not 1024^2 px), the image kept at it (no preferred
    resolution)."""
    return {"_auto_resize": False, "max_area": w * h}


@dataclass(frozen=True)
class Pipeline:
    """How one diffusers pipeline is driven."""
    cls: str  # the diffusers class
    stems: tuple  # model_index.json class-name stems that select it
    inputs: dict = field(default_factory=lambda: INPAINT)  # our image / mask / control -> its __call__ keyword
    unpack: Optional[Callable] = None  # output_type="latent" comes back packed: (latents, h, w) -> (B, C, h, w)
    denormalised: bool = False  # output_type="latent" comes back as its VAE decodes it (else normalised)
    multiple: Callable = vae_multiple  # pipe -> the pixel multiple its height and width must be
    native: int = 0  # native side in px where the pipeline states none (default_sample_size, sample_size)
    call: Optional[Callable] = None  # (w, h) -> further __call__ keywords
    size: Optional[Callable] = None  # (pipe, width, height) -> (w, h): a pipeline that picks its own size
    pil: bool = False  # takes the image and mask as PIL images (its own resize reads image.size)
    frames: bool = False  # its VAE decodes one frame of video latents, (B, C, 1, h, w)

    @property
    def edit(self) -> bool:
        """An editing pipeline: it takes no mask (ours alone is told the region to keep)."""
        return "mask" not in self.inputs


def flux(cls, stems, **kw):
    """FLUX.1's VAE, latents packed in 2x2 patches."""
    return Pipeline(cls, stems, unpack=unpack_2x2, multiple=patch_multiple, **kw)


def qwen(cls, stems, **kw):
    """Qwen-Image's VAE (one frame): packed as FLUX.1's (its _unpack_latents adds the frame axis), per-channel
    statistics."""
    return Pipeline(cls, stems, unpack=unpack_2x2, multiple=patch_multiple, frames=True, **kw)


def klein(cls, stems, **kw):
    """FLUX.2's VAE: the pipeline unpacks, undoes its VAE's batch norm and unpatchifies before returning latents."""
    return Pipeline(cls, stems, denormalised=True, multiple=patch_multiple, **kw)


def kontext_inpaint(w, h):
    return {"_auto_resize": False}  # generate at the size given, not at the nearest of Kontext's resolutions


PIPELINES = (
    Pipeline("StableDiffusionInpaintPipeline", ("StableDiffusion",)),
    Pipeline("StableDiffusionXLInpaintPipeline", ("StableDiffusionXL",)),
    Pipeline("StableDiffusion3InpaintPipeline", ("StableDiffusion3",), multiple=transformer_patches),
    flux("FluxFillPipeline", ("FluxFill",)),
    flux("FluxInpaintPipeline", ("Flux",)),
    flux("FluxKontextInpaintPipeline", ("FluxKontext",), call=kontext_inpaint),
    flux("ChromaInpaintPipeline", ("Chroma",)),
    Pipeline("ZImageInpaintPipeline", ("ZImage",), multiple=patch_multiple, native=1024),  # patches, not packed
    klein("Flux2KleinInpaintPipeline", ("Flux2Klein",)),
    qwen("QwenImageInpaintPipeline", ("QwenImage",)),
    qwen("QwenImageEditInpaintPipeline", ("QwenImageEdit",), size=edit_size, pil=True),
    # ControlNet, Control and PAG variants: the same VAEs and latents, a control image where they take one
    Pipeline("StableDiffusionControlNetInpaintPipeline", ("StableDiffusionControlNet",), inputs=CONTROLNET),
    Pipeline("StableDiffusionControlNetPAGInpaintPipeline", ("StableDiffusionControlNetPAG",), inputs=CONTROLNET),
    Pipeline("StableDiffusionPAGInpaintPipeline", ("StableDiffusionPAG",)),
    Pipeline("StableDiffusionXLControlNetInpaintPipeline", ("StableDiffusionXLControlNet",), inputs=CONTROLNET),
    Pipeline("StableDiffusionXLControlNetUnionInpaintPipeline", ("StableDiffusionXLControlNetUnion",),
             inputs=CONTROLNET),  # control_mode: a __call__ keyword (--control-mode)
    Pipeline("StableDiffusionXLPAGInpaintPipeline", ("StableDiffusionXLPAG",)),
    Pipeline("StableDiffusion3ControlNetInpaintingPipeline",
             ("StableDiffusion3ControlNetInpainting", "StableDiffusion3ControlNet"), inputs=MASKED_CONTROL,
             multiple=transformer_patches),
    flux("FluxControlInpaintPipeline", ("FluxControl",), inputs=CONTROLNET),
    flux("FluxControlNetInpaintPipeline", ("FluxControlNet",), inputs=CONTROLNET),
    qwen("QwenImageControlNetInpaintPipeline", ("QwenImageControlNet",), inputs=MASKED_CONTROL),
    Pipeline("ZImageControlNetInpaintPipeline", ("ZImageControlNet",), inputs=CONTROLNET, multiple=patch_multiple,
             native=1024),
    # editing: the image and the prompt; our decoder alone is told the region the edit may change
    flux("FluxKontextPipeline", ("FluxKontext",), inputs=EDIT, call=kontext_size),
    qwen("QwenImageEditPipeline", ("QwenImageEdit",), inputs=EDIT, size=edit_size, pil=True),
    qwen("QwenImageEditPlusPipeline", ("QwenImageEditPlus",), inputs=EDIT, size=edit_size, pil=True),
    klein("Flux2KleinPipeline", ("Flux2Klein",), inputs=EDIT, pil=True),  # the image as its reference image
)


def stem(class_name: str) -> str:
    """'FluxKontextInpaintPipeline' -> 'FluxKontext'."""
    return next((class_name[:-len(s)] for s in SUFFIXES if class_name.endswith(s)), class_name)


def supported(edit: bool = False) -> str:
    tail = "" if edit else " (and their Inpaint/Img2Img variants)"
    return ", ".join(f"{s}Pipeline" for p in PIPELINES if p.edit == edit for s in p.stems) + tail


def read_index(folder) -> dict:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise PipelineError(f"{folder}: no such folder with model_index.json (a local pipeline folder, e.g. a "
                            "download of stable-diffusion-xl-base-1.0 or FLUX.1-dev)")
    try:
        return json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{index}: not JSON ({err})") from None


def select(folder, edit: bool = False) -> Pipeline:
    """The PIPELINES entry that runs a pipeline folder, from its model_index.json (`edit`: an editing entry)."""
    name = read_index(folder).get("_class_name") or ""
    found = next((p for p in PIPELINES if p.edit == edit and stem(name) in p.stems), None)
    if found is None:
        mode = " for editing (--edit)" if edit else ""
        raise PipelineError(f"{folder}: model_index.json names {name!r}; supported{mode}: {supported(edit)}")
    return found


def entry(pipe) -> Pipeline:
    """The PIPELINES entry of a loaded pipeline (or of its class)."""
    name = class_of(pipe).__name__
    found = next((p for p in PIPELINES if p.cls == name), None)
    if found is None:
        raise PipelineError(f"a {name}: not one of {', '.join(p.cls for p in PIPELINES)}")
    return found


def class_of(pipe) -> type:
    return pipe if isinstance(pipe, type) else type(pipe)
