"""The paper's protocol: what an inpainting pipeline generates for each evaluation image, cached on disk.

For image i and its fixed mask the pipeline (ldm/decoding/pipelines.py) runs once, with the prompt on line i of a captions
file (or an empty one) and a seed drawn from (seed, i), to its final latents z (C, h, w) as its VAE decodes them.
Each z is written to <cache>/<i:06d>.pt atomically as it comes, with what it was made from (the image's and the
mask's SHA-256, the prompt): an interrupted run resumes where it stopped, a re-run reads them without loading the
pipeline, and a file made from another image, mask or prompt is refused. settings.json holds the rest (the
pipeline folder and class, steps, seed, guidance, strength, negative prompt): a cache made otherwise is refused.
Every decoder then decodes these same latents: ours conditioned on the image and mask, `vanilla` = the pipeline's
own VAE.
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import IterableDataset

from data.masks import seed_of

from ..decoding import pipelines
from ..training.checkpointing import atomic_save
from ..files import atomic_write_text

GENERATION_STREAM = 10  # seed-sequence tag of image i's pipeline seed (data/datasets.py lists the others)


class GenerationError(ValueError):
    """A cache, captions file or pipeline that does not fit the evaluation; the message names it."""


@dataclass(frozen=True)
class Generation:
    """How the pipeline runs for every image (ldm.decoding.pipelines.final_latents' arguments)."""
    pipeline: str  # the local pipeline folder
    steps: int = 50
    seed: int = 0
    guidance: Optional[float] = None  # None: the pipeline's own defaults
    strength: Optional[float] = None
    negative_prompt: Optional[str] = None

    def settings(self) -> dict:
        """What settings.json holds: these, the folder resolved and the pipeline class it selects."""
        return {**asdict(self), "pipeline": str(Path(self.pipeline).resolve()),
                "class": pipelines.select(self.pipeline).cls}

    def seed_of(self, index: int) -> int:
        return seed_of(self.seed, GENERATION_STREAM, index)


def read_captions(path) -> list:
    """One prompt per line (line i: image i; blank lines are empty prompts)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GenerationError(f"--captions {path}: not a readable text file ({err})") from None


def sample_key(sample: dict, prompt: str) -> dict:
    """What a cached z was made from: the image's and the mask's SHA-256 (with their shapes) and the prompt."""
    def digest(x):
        x = x.detach().cpu().contiguous()
        return hashlib.sha256(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()[:16]
    return {"image": digest(sample["image"]), "mask": digest(sample["mask"] > 0.5), "prompt": prompt}


class GeneratedLatents:
    """The cache folder: settings.json and one <index>.pt per image, {"z": (C, h, w) float32, "key": sample_key}."""

    def __init__(self, folder, generation: Generation, captions: Optional[list] = None):
        self.folder, self.generation, self.captions = Path(folder), generation, captions
        self.made = self.read_now = 0  # counts of this process, for the log

    def open(self) -> "GeneratedLatents":
        """Write settings.json, or refuse a cache whose settings differ (naming the keys)."""
        settings, path = self.generation.settings(), self.folder / "settings.json"
        if path.is_file():
            try:
                then = json.loads(path.read_text())
            except ValueError as err:
                raise GenerationError(f"latent cache {path}: not JSON ({err}); delete the folder") from None
            changed = [f"{k}: {then.get(k)!r} -> {v!r}" for k, v in settings.items() if then.get(k) != v]
            if changed:
                raise GenerationError(f"latent cache {self.folder} was generated with other settings ({'; '.join(changed)});"
                                      f" delete it or pass another --latent-cache")
        else:
            atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
        return self

    def prompt(self, index: int) -> str:
        if self.captions is None:
            return ""
        if index >= len(self.captions):
            raise GenerationError(f"--captions: {len(self.captions)} lines, none for image {index}")
        return self.captions[index]

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.pt"

    def read(self, sample: dict) -> Optional[torch.Tensor]:
        """The cached z of this sample (C, h, w), or None when not generated yet."""
        path, key = self.path(sample["index"]), sample_key(sample, self.prompt(sample["index"]))
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # atomic writes leave no partial file; anything else is foreign
            raise GenerationError(f"latent cache {path}: unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(stored, dict) or stored.get("key") != key:
            then = stored.get("key") if isinstance(stored, dict) else type(stored).__name__
            raise GenerationError(f"latent cache {path}: made for another image, mask or prompt ({then} != {key}); "
                                  f"delete the folder or pass another --latent-cache")
        return stored["z"]

    def fill(self, images, device="cpu", progress=None) -> None:
        """Generate, in image order, every z the cache lacks; the pipeline is loaded only if one is missing."""
        pipe = None
        for sample in images:
            if self.read(sample) is not None:
                self.read_now += 1
                continue
            if pipe is None:
                pipe = pipelines.load_pipeline(self.generation.pipeline, device)
                pipe.set_progress_bar_config(disable=True)  # one bar, per image (the caller's)
            self.write(sample, self.run(pipe, sample))
            if progress is not None:
                progress(sample["index"])

    def run(self, pipe, sample) -> torch.Tensor:
        """The pipeline on one image at its own shape: z (C, h, w)."""
        g, image, mask = self.generation, sample["image"][None], sample["mask"][None]
        multiple = pipelines.entry(pipe).multiple(pipe)
        height, width = image.shape[-2:]
        if height % multiple or width % multiple:
            raise GenerationError(f"--pipeline {g.pipeline}: a {type(pipe).__name__} takes sides that are multiples "
                                  f"of {multiple} px; image {sample['index']} is {height}x{width} (--resolution, "
                                  f"--aspect-ratios)")
        z, _, _ = pipelines.final_latents(pipe, image, mask, self.prompt(sample["index"]), steps=g.steps,
                                          seed=g.seed_of(sample["index"]), size=math.sqrt(height * width),
                                          guidance=g.guidance, strength=g.strength, negative_prompt=g.negative_prompt)
        return z[0]

    def write(self, sample, z) -> None:
        key = sample_key(sample, self.prompt(sample["index"]))
        atomic_save({"z": z.detach().float().cpu().contiguous(), "key": key}, self.path(sample["index"]))
        self.made += 1


class WithLatents(IterableDataset):
    """`images`' samples (data.evaluation.EvalImages) with their cached z as "latent" (C, h, w)."""

    def __init__(self, images, cache: GeneratedLatents):
        self.images, self.cache = images, cache

    def __iter__(self):
        for sample in self.images:
            z = self.cache.read(sample)
            if z is None:
                raise GenerationError(f"latent cache {self.cache.folder}: no z for image {sample['index']}")
            yield {**sample, "latent": z}


class PipelineVAE(torch.nn.Module):
    """The pipeline's own VAE as an evaluation decoder (`vanilla` on generated latents): its plain decode."""

    def __init__(self, vae, frames: bool = False):
        super().__init__()
        self.vae, self.frames = vae, frames  # frames: a video VAE (Qwen-Image's), decoding one frame

    def decode(self, z, tile=None):
        return pipelines.vae_decode(self.vae, z, frames=self.frames).to(z.device)
