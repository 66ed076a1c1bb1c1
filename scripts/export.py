"""Export any checkpoint `load_autoencoder` reads (run, SD, official, diffusers, decoder) to another format.

    python scripts/export.py CHECKPOINT --out DIR --format diffusers|official|decoder [--ema | --no-ema] \\
        [--pipeline FOLDER_OR_HUB_ID] [--repo-id USER/NAME]

diffusers: DIR/config.json + DIR/diffusion_pytorch_model.safetensors (diffusers.AsymmetricAutoencoderKL; a VAE
           without quant convs (sd3, flux) gets identity 1x1 convs; config.json names the base and its
           scaling_factor and shift_factor);
official:  DIR/model.ckpt, {"state_dict": official ldm keys, "config": {"model": {"autoencoder": kwargs}}};
           4-channel bases with quant convs only (sd1, sdxl);
decoder:   DIR/decoder.safetensors (decoder.* + post_quant_conv.*, config in its metadata) + DIR/config.json.
Beside them DIR/README.md, the model card (ldm/formats/card.py): base, width, parameter counts; for a run checkpoint
its step, data and departures from the paper's recipe (configs/), and its last validation row (the run folder's
metrics.csv); a usage snippet running --pipeline (default: the base's) with the export (from --repo-id once uploaded).
Only weights, config and the card are written; each file whole or not at all, with the umask's mode (ldm/files.py).
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from ldm import CheckpointError  # noqa: E402
from ldm.cli import existing, script_main  # noqa: E402
from ldm.formats.export import FORMATS, export, save_decoder, save_diffusers, save_official  # noqa: E402,F401


@script_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=existing,
                        help="run checkpoint, SD/ldm/official .ckpt/.safetensors, or folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="use the run's EMA decoder weights (default: when present)")
    parser.add_argument("--pipeline", default=None, help="the inpainting pipeline the model card's usage snippet runs "
                        "(a folder or hub id; default: the base's)")
    parser.add_argument("--repo-id", default=None, help="the hub repository the export will be uploaded to: the "
                        "card's snippet loads it from there (default: from --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = export(args.checkpoint, args.out, args.format, args.ema, ROOT / "configs", args.pipeline,
                       args.repo_id)
    except CheckpointError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
