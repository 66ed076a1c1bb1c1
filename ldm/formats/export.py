"""Export forms: an autoencoder written as a diffusers folder, an official-layout checkpoint or a decoder export
(scripts/export.py is their command line; ldm/formats/convert.py reads each of them back).

diffusers: DIR/config.json + DIR/diffusion_pytorch_model.safetensors (the family's diffusers class; a VAE without
           quant convs (sd3, flux) gets identity 1x1 convs; config.json names the base and its latent normalisation);
official:  DIR/model.ckpt, {"state_dict": official ldm keys, "config": {"model": {"autoencoder": kwargs}}};
           4-channel bases with quant convs only (sd1, sdxl);
decoder:   DIR/decoder.safetensors (decoder.* + post_quant_conv.*, config in its metadata) + DIR/config.json;
and in every form DIR/README.md, its model card (ldm/formats/card.py).
Each file whole or not at all, with the umask's mode (ldm/files.py).
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_write, atomic_write_text
from ..modules.common import CheckpointError
from .card import model_card
from .convert import DECODER_FORMAT, load_autoencoder

FORMATS = ("diffusers", "official", "decoder")


def _tensors(state: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def _json(path: Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_diffusers(model, out) -> list[Path]:
    """A folder the family's diffusers class (AsymmetricAutoencoderKL, AutoencoderKLQwenImage) reads with
    from_pretrained, with no missing or unexpected keys (model.diffusers_form: what diffusers cannot hold is
    refused, naming why)."""
    config, state = model.diffusers_form()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = _tensors(state)
    return [atomic_write(out / "diffusion_pytorch_model.safetensors",
                    lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"})),
            _json(out / "config.json", config)]


def save_official(model, out) -> list[Path]:
    """A Lightning-style checkpoint in the official key layout (what the official code loads)."""
    if model.family != "sd" or not model.config["use_quant_conv"] or model.config["z_channels"] != 4:
        raise CheckpointError(f"--format official holds 4-channel VAEs with quant convs (sd1, sdxl); this model "
                              f"({model.config.get('base') or 'unnamed base'}: {model.config['z_channels']} latent "
                              f"channels, use_quant_conv={model.config['use_quant_conv']}) has another layout: use "
                              f"--format diffusers or decoder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = {"state_dict": _tensors(model.state_dict()), "config": {"model": {"autoencoder": model.config}}}
    return [atomic_write(out / "model.ckpt", lambda tmp: torch.save(ckpt, tmp))]


def save_decoder(model, out) -> list[Path]:
    """decoder.* + post_quant_conv.* as safetensors (config in its metadata) and config.json beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    meta = {"format": DECODER_FORMAT, "autoencoder": json.dumps(model.config)}
    return [atomic_write(out / "decoder.safetensors", lambda tmp: save_file(_tensors(state), str(tmp), metadata=meta)),
            _json(out / "config.json", {"format": DECODER_FORMAT, "autoencoder": model.config})]


def export(checkpoint, out, fmt: str, ema=None, configs=None, pipeline=None, repo_id=None) -> list[Path]:
    """Load `checkpoint` (any readable format; ema: None = EMA when present), write it as `fmt` and its model card
    (out/README.md; configs, pipeline, repo_id: card.model_card's)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    model = load_autoencoder(checkpoint, ema=ema)
    save = {"diffusers": save_diffusers, "official": save_official, "decoder": save_decoder}[fmt]
    paths = save(model, out)
    out = Path(out)
    vae_class = json.loads((out / "config.json").read_text())["_class_name"] if fmt == "diffusers" else None
    where = out / "model.ckpt" if fmt == "official" else out
    text = model_card(model, fmt, where, checkpoint, configs, pipeline, repo_id, vae_class)
    return [*paths, atomic_write_text(out / "README.md", text)]
