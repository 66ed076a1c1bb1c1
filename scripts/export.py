"""Export any checkpoint `load_autoencoder` reads (run, SD, official, diffusers, decoder) to another format.

    python scripts/export.py CHECKPOINT --out DIR --format diffusers|official|decoder [--ema | --no-ema]

diffusers: DIR/config.json + DIR/diffusion_pytorch_model.safetensors (diffusers.AsymmetricAutoencoderKL; a VAE
           without quant convs (sd3, flux) gets identity 1x1 convs; config.json names the base and its
           scaling_factor and shift_factor);
official:  DIR/model.ckpt, {"state_dict": official ldm keys, "config": {"model": {"autoencoder": kwargs}}};
           4-channel bases with quant convs only (sd1, sdxl);
decoder:   DIR/decoder.safetensors (decoder.* + post_quant_conv.*, config in its metadata) + DIR/config.json.
Only weights and config are written; each file whole or not at all, with the umask's mode (ldm/files.py).
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ldm.convert import DECODER_FORMAT, CheckpointError, load_autoencoder  # noqa: E402
from ldm.cli import existing  # noqa: E402
from ldm.files import atomic_write  # noqa: E402

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


def export(checkpoint, out, fmt: str, ema=None) -> list[Path]:
    """Load `checkpoint` (any readable format; ema: None = EMA when present) and write it as `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    model = load_autoencoder(checkpoint, ema=ema)
    save = {"diffusers": save_diffusers, "official": save_official, "decoder": save_decoder}[fmt]
    return save(model, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=existing, help="run checkpoint, SD/ldm/official .ckpt/.safetensors, or folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="use the run's EMA decoder weights (default: when present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = export(args.checkpoint, args.out, args.format, args.ema)
    except CheckpointError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
