"""The model card (README.md) every export writes beside its weights, in the form of the paper's published decoders'
(cross-attention/asymmetric-autoencoder-kl-x-1-5): YAML front matter (library, tags, base model), what the decoder
is (base, width, parameter counts), how it was trained (steps, data, the recipe's departures from the paper, read from
a run checkpoint's config), its validation metrics at the checkpoint's step (the run folder's metrics.csv) and a usage
snippet that runs as written for its base: `pipe.vae = ...` where diffusers' pipeline passes the image and mask to
the VAE (SD 1.x inpainting), our Python API (ldm.load_autoencoder, ldm.decoding.pipelines.inpaint) elsewhere.
"""
import csv
import json
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ..modules.families import PRESETS

PAPER = "https://arxiv.org/abs/2306.04632"
WIDTHS = {kw["ch"]: name for name, kw in PRESETS.items()}  # decoder width ch -> the paper's preset (x1, x1.5, x2)
# base -> (the model its VAE comes from, the inpainting pipeline class and repository a user runs it with)
BASES = {
    "sd1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionInpaintPipeline",
            "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLInpaintPipeline",
             "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"),
    "sd3": ("stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3InpaintPipeline",
            "stabilityai/stable-diffusion-3.5-medium"),
    "flux": ("black-forest-labs/FLUX.1-dev", "FluxFillPipeline", "black-forest-labs/FLUX.1-Fill-dev"),
    "flux2": ("black-forest-labs/FLUX.2-klein-base-9B", "Flux2KleinInpaintPipeline",
              "black-forest-labs/FLUX.2-klein-base-9B"),
    "qwenimage": ("Qwen/Qwen-Image", "QwenImageInpaintPipeline", "Qwen/Qwen-Image"),
}
# diffusers' pipelines that pass the image and mask to an AsymmetricAutoencoderKL's decode
PASSES_MASK = ("StableDiffusionInpaintPipeline", "StableDiffusionPAGInpaintPipeline")
# where a run may differ from the paper without changing what it learns: paths, hardware, logging
NOT_RECIPE = ("seed", "run.", "model.vae_ckpt", "model.compile", "model.channels_last",
              "model.autoencoder.gradient_checkpointing", "data.source", "data.val_source", "data.val_size",
              "data.num_workers", "data.shuffle_buffer", "optim.fused", "trainer.accelerator", "trainer.devices",
              "trainer.num_nodes", "trainer.strategy")
PROMPT = "a photo of a person"


def _leaves(tree, prefix="") -> dict:
    """{dotted key: value} of a nested dict's leaves (lists and empty dicts are values)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


def paper_recipe(configs, ch: int, base: Optional[str]) -> tuple[str, dict]:
    """(its name, the leaves of) the paper's recipe at this width over this base: configs/base.yaml, the width
    preset (x1, x1.5, x2) and configs/bases/<base>.yaml merged; base.yaml's x1 where the width is none of them."""
    configs = Path(configs)
    preset = f"{WIDTHS.get(ch, 'x1').replace('.', '_')}.yaml"  # configs/x1_5.yaml for x1.5
    layers = [configs / "base.yaml", configs / preset]
    if base and (configs / "bases" / f"{base}.yaml").is_file():
        layers.append(configs / "bases" / f"{base}.yaml")
    merged = OmegaConf.to_container(OmegaConf.merge(*map(OmegaConf.load, layers)), resolve=True)
    name = f"configs/{preset}" if ch in WIDTHS else f"configs/base.yaml, x1: no preset has ch {ch}"
    return name, _leaves(merged)


def departures(config: dict, recipe: dict) -> list[str]:
    """`key=value` (JSON) for each recipe key where a run's config differs from the paper's recipe."""
    ran = _leaves(config)
    return [f"{k}={json.dumps(v)}" for k, v in ran.items()
            if not k.startswith(NOT_RECIPE) and recipe.get(k, ...) != v]


def last_validation(metrics_csv, step: Optional[int]) -> Optional[tuple[int, dict]]:
    """(steps done, {metric: value}) of the last row of metrics.csv with val/ values at or before `step` (steps
    done: Lightning's 0-based step + 1, as checkpoints count them), or None."""
    found = None
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k and k.startswith("val/") and v not in ("", None)}
            done = int(float(row.get("step") or -1)) + 1
            if values and (step is None or done <= step):
                found = (done, values)
    return found


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def front_matter(model, fmt: str) -> str:
    base = model.config.get("base")
    tags = ["asymmetric-vqgan", "autoencoder", "inpainting", "stable-diffusion" if model.family == "sd" else
            model.family, *([base] if base else [])]
    lines = ["---", f"library_name: {'diffusers' if fmt == 'diffusers' else 'pytorch'}", "tags:",
             *[f"- {t}" for t in tags]]
    if base in BASES:
        lines.append(f"base_model: {BASES[base][0]}")
    return "\n".join([*lines, "inference: false", "---"])


def what_it_is(model, fmt: str, ema: bool) -> str:
    c, decoder = model.config, model.decoder
    width = WIDTHS.get(c["ch"], "none of the paper's")
    branch = _count(getattr(decoder, "encoder", None))
    form = {"diffusers": "a diffusers folder (config.json, diffusion_pytorch_model.safetensors)",
            "official": "the official code's checkpoint layout (model.ckpt)",
            "decoder": "the decoder alone (decoder.safetensors, config.json)"}[fmt]
    return "\n".join([
        "## The decoder", "",
        f"- Base: {c.get('base') or 'unnamed'} (the {model.family} family; {c['z_channels']} latent channels, "
        f"{'with' if c['use_quant_conv'] else 'without'} quant convs; latent normalisation: "
        f"{model.latent_norm.describe()})",
        f"- Width: {width} (ch {c['ch']}, ch_mult {list(c['ch_mult'])}, {c['num_res_blocks']} res blocks per level); "
        f"masked-image branch: {'yes' if c['use_condition'] else 'no (a vanilla decoder)'}",
        f"- Parameters: decoder {_count(decoder) + _count(model.post_quant_conv):,} (its masked-image branch "
        f"{branch:,}); encoder {_count(model.encoder) + _count(getattr(model, 'quant_conv', None)):,} (the base "
        f"VAE's, frozen)",
        f"- Weights: {'EMA' if ema else 'raw (no EMA)'}; format: {form}"])


def how_trained(run: Optional[dict], configs, checkpoint) -> str:
    if not run or not isinstance(run.get("config"), dict):
        return "\n".join(["## Training", "", f"Not a run checkpoint of this repository ({checkpoint}): no training "
                          "record came with it."])
    cfg, step = run["config"], run.get("global_step")
    data, masks, trainer = cfg.get("data", {}), cfg.get("data", {}).get("masks", {}), cfg.get("trainer", {})
    ae = cfg.get("model", {}).get("autoencoder", {})
    lines = ["## Training", "",
             f"- Steps: {step if step is not None else 'unknown'} of trainer.max_steps {trainer.get('max_steps')}",
             f"- Data: {data.get('source')} at {data.get('resolution')} px (aspect ratios "
             f"{data.get('aspect_ratios')}), batch {data.get('batch_size')} per device (trainer.devices "
             f"{trainer.get('devices')}, num_nodes {trainer.get('num_nodes')}); masks: p_full {masks.get('p_full')}, "
             f"mix {json.dumps(masks.get('mix'))}"]
    if configs is not None:
        name, recipe = paper_recipe(configs, ae.get("ch"), ae.get("base"))
        delta = departures(cfg, recipe)
        lines.append(f"- Recipe: the paper's ({name}) with " + ("no departures" if not delta else
                     f"{len(delta)} departures: " + ", ".join(f"`{d}`" for d in delta)))
    return "\n".join(lines)


def validation(run_dir: Optional[Path], step: Optional[int]) -> str:
    found = last_validation(run_dir / "metrics.csv", step) if run_dir is not None else None
    if found is None:
        return "\n".join(["## Validation", "", "No validation record (the run folder's metrics.csv) came with it."])
    done, values = found
    rows = [f"| {name} | {value:.6g} |" for name, value in values.items()]
    return "\n".join([f"## Validation at step {done}", "", "The run's last validation at or before the checkpoint's "
                      f"step ({run_dir.name}/metrics.csv):", "", "| metric | value |", "| --- | ---: |", *rows])


def pipeline_of(model, pipeline: Optional[str]) -> tuple[str, str]:
    """(class name, what from_pretrained takes) of the pipeline the snippet runs: `pipeline` (a local folder: its
    model_index.json's class; a hub id: the base's class), else the base's."""
    base = model.config.get("base") or ("sd1" if model.family == "sd" and model.config["z_channels"] == 4 else None)
    cls, repo = BASES.get(base, (None, "StableDiffusionInpaintPipeline", "path/to/an/inpainting/pipeline"))[1:]
    if pipeline is not None and (Path(pipeline) / "model_index.json").is_file():
        cls = json.loads((Path(pipeline) / "model_index.json").read_text())["_class_name"]
    return cls, repo if pipeline is None else str(pipeline)


def _diffusers_snippet(cls: str, repo: str, vae_class: str, name: str, device: str, images: list) -> list[str]:
    """`pipe.vae = ...`: the seed's form."""
    what = "decodes with the image and mask" if vae_class == "AsymmetricAutoencoderKL" else "a plain VAE"
    return ["import torch", f"from diffusers import {vae_class}, {cls}", "from diffusers.utils import load_image", "",
            device, f"pipe = {cls}.from_pretrained({json.dumps(repo)})",
            f"pipe.vae = {vae_class}.from_pretrained({json.dumps(name)})  # {what}", "pipe.to(device)", *images,
            f"result = pipe(prompt={json.dumps(PROMPT)}, image=image, mask_image=mask).images[0]",
            'result.save("inpainted.png")']


def _api_snippet(cls: str, repo: str, name: str, device: str, images: list, hub: bool) -> list[str]:
    """Our Python API: the pipeline to its final latents, decoded by our decoder with the image and mask."""
    return ["import torch", f"from diffusers import {cls}", "from diffusers.utils import load_image",
            *(["from huggingface_hub import snapshot_download"] if hub else []),
            "from torchvision.transforms.functional import to_pil_image", "",
            "from ldm import load_autoencoder", "from ldm.decoding.pipelines import inpaint", "", device,
            f"pipe = {cls}.from_pretrained({json.dumps(repo)}).to(device)",
            f"vae = load_autoencoder({name}, device=device)", *images,
            f"ours, _ = inpaint(pipe, vae, image, mask, {json.dumps(PROMPT)})  # (1, 3, H, W) in [-1, 1], its size",
            'to_pil_image((ours[0].clamp(-1, 1) + 1) / 2).save("inpainted.png")']


def usage(model, where: str, vae_class: Optional[str], pipeline: Optional[str], repo_id: Optional[str]) -> str:
    """The usage section: diffusers' own `pipe.vae = ...` where it runs as the decoder is meant to run (an
    AsymmetricAutoencoderKL in a pipeline that passes it the image and mask; a decoder without the branch, exported as
    the base's plain VAE class, in any), our Python API elsewhere."""
    cls, repo = pipeline_of(model, pipeline)
    device = 'device = "cuda" if torch.cuda.is_available() else "cpu"'
    images = ['image = load_image("image.png")  # your photo (turned as shown: EXIF orientation)',
              'mask = load_image("mask.png")  # white: the region to repaint']
    plain = vae_class is not None and vae_class != "AsymmetricAutoencoderKL"
    if vae_class is not None and (plain or cls in PASSES_MASK):
        intro = (f"diffusers' {cls} passes the image and mask to this decoder itself:" if not plain else
                 f"A decoder without the masked-image branch: {vae_class}, the base's own VAE class, in any pipeline:")
        code = _diffusers_snippet(cls, repo, vae_class, repo_id or where, device, images)
    else:
        intro = (f"{cls} does not give the VAE the image and mask: this repository's Python API (`pip install -e .` in "
                 "its checkout) runs the pipeline to its final latents and decodes them with this decoder, "
                 "conditioned on the image and mask:")
        name = f"snapshot_download({json.dumps(repo_id)})" if repo_id else json.dumps(where)
        code = _api_snippet(cls, repo, name, device, images, hub=repo_id is not None)
    return "\n".join(["## Usage", "", intro, "", "```python", *code, "```"])


def model_card(model, fmt: str, where, checkpoint, configs=None, pipeline=None, repo_id=None,
               vae_class: Optional[str] = None) -> str:
    """README.md of an export of `model` (load_autoencoder's, its load_report.run: a run checkpoint's config and
    step) in `fmt` written to `where` (a diffusers folder of `vae_class`); `configs`: the configs folder (the paper's
    recipe); `pipeline`: the pipeline the snippet runs (a folder or hub id; default the base's); `repo_id`: the hub
    id the export is uploaded to."""
    report = getattr(model, "load_report", None)
    run = getattr(report, "run", None)
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    run_dir = run_dir if run_dir is not None and (run_dir / "metrics.csv").is_file() else None
    width = WIDTHS.get(model.config["ch"], f"ch {model.config['ch']}")
    title = f"# Asymmetric decoder {width} for {model.config.get('base') or 'an unnamed base'}"
    parts = [front_matter(model, fmt), title,
             f"The heavier decoder with a masked-image branch of [Designing a Better Asymmetric VQGAN for "
             f"StableDiffusion]({PAPER}): it decodes the base's latents and keeps the known region of an inpainted "
             f"image, given the image and the mask.",
             what_it_is(model, fmt, bool(getattr(report, "ema", False))),
             how_trained(run, configs, checkpoint), validation(run_dir, (run or {}).get("global_step")),
             usage(model, str(where), vae_class, pipeline, repo_id)]
    return "\n\n".join(parts) + "\n"
