"""Export any checkpoint `load_autoencoder` reads (run, SD, official, diffusers, decoder) to another format.

    python scripts/export.py CHECKPOINT --out DIR --format diffusers|official|decoder [--ema | --no-ema]

diffusers: DIR/config.json + DIR/diffusion_pytorch_model.safetensors (diffusers.AsymmetricAutoencoderKL; a VAE
           without quant convs (sd3, flux) gets identity 1x1 convs; config.json names the base and its
           scaling_factor and shift_factor);
official:  DIR/model.ckpt, {"state_dict": official ldm keys, "config": {"model": {"autoencoder": kwargs}}};
           4-channel bases with quant convs only (sd1, sdxl);
decoder:   DIR/decoder.safetensors (decoder.* + post_quant_conv.*, config in its metadata) + DIR/config.json.
Only weights and config are written; each file whole or not at all, with the umask's mode (ldm/formats/export.py).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ldm import CheckpointError  # noqa: E402
from ldm.cli import existing, script_main  # noqa: E402
from ldm.formats.export import FORMATS, export, save_decoder, save_diffusers, save_official  # noqa: E402,F401


@script_main
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
