"""Evaluate decoders side by side on fixed masks: the paper's table (FID, LPIPS, PSNR, SSIM, pre_error, colour, seam).

    python scripts/eval.py --decoder A [--decoder B ...] [--name LABEL ...] --data SOURCE \\
        --masks thick|medium|thin|mixed|MASK_DIR --out DIR [--vae SD_WEIGHTS] [--resolution 256] \\
        [--aspect-ratios 0.5,1,2] [--num-images N] [--batch-size 16] [--seed 0] [--max-area 0.5] \\
        [--pipeline PIPELINE_FOLDER [--captions FILE] [--steps 50] [--latent-cache DIR]] [--device auto]

A decoder is a run checkpoint (logs/<run>/checkpoints/last.ckpt), an exported or diffusers folder/file, or
`vanilla`: the plain decoder of --vae, decoded with the masked-image branch off (the paper's baseline).
The reconstruction table: with --vae every decoder decodes that encoder's latents of the whole image (the frozen
SD encoder); otherwise its own. With --pipeline (a local inpainting pipeline folder, any that scripts/inpaint.py
drives), also the generated table, the paper's protocol: the pipeline runs once per image and mask (image i's
seed from --seed and i, the prompt on line i of --captions or empty) and every decoder decodes the same final
latents, cached in --latent-cache (default DIR/latents: a re-run reads them, an interrupted run resumes); there
`vanilla` is the pipeline's own VAE, and --vae defaults to the pipeline's VAE folder.
Writes DIR/results.md, results.csv, results.json and grid.png (grid_generated.png). Exit code 2: a bad argument,
file, checkpoint or pipeline.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from data.evaluation import MASK_CHOICES  # noqa: E402
from ldm.cli import (at_least, existing, fraction, multiple_of_8, non_negative, ratios, script_main,  # noqa: E402
                     tile_side)
from ldm.evaluation.run import main as run_main  # noqa: E402
from ldm.modules.tiling import TILE_ABOVE  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", action="append", required=True, help="checkpoint, folder or 'vanilla' (repeat)")
    p.add_argument("--name", action="append", default=[], help="label of each --decoder, in order")
    p.add_argument("--data", required=True, help="'sample', an image folder, or webdataset shards")
    p.add_argument("--masks", required=True, help=f"preset ({'|'.join(MASK_CHOICES)}) or a folder of mask "
                                                  "PNGs (white = hole)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vae", type=existing, default=None, help="SD autoencoder weights: the shared encoder, and 'vanilla'")
    p.add_argument("--resolution", type=multiple_of_8, default=256, help="square side in pixels, a multiple of 8")
    p.add_argument("--aspect-ratios", type=ratios, default=[1.0], help="width/height ratios, comma-separated: image "
                   "i at shape i mod n of about resolution^2 px (as data.aspect_ratios; default 1: squares)")
    p.add_argument("--num-images", type=at_least(1), default=None, help="the first N images (default: all)")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--seed", type=int, default=0, help="generated masks and the pipeline's noise are fixed by it")
    p.add_argument("--max-area", type=fraction, default=0.5, help="generated masks: redraw above this hole area")
    p.add_argument("--save-masks", default=None, help="write the generated masks here (reuse: --masks DIR)")
    p.add_argument("--pipeline", default=None, help="an inpainting pipeline folder: also the generated table")
    p.add_argument("--captions", type=existing, default=None, help="--pipeline: a text file, line i the prompt of image i")
    p.add_argument("--steps", type=at_least(1), default=50, help="--pipeline: denoising steps")
    p.add_argument("--guidance", type=non_negative, default=None, help="--pipeline: guidance scale (default: its own)")
    p.add_argument("--strength", type=fraction, default=None, help="--pipeline: re-noising strength (default: its own)")
    p.add_argument("--negative-prompt", default=None, help="--pipeline: (pipelines that take one)")
    p.add_argument("--latent-cache", default=None, help="--pipeline: the generated latents' folder (default DIR/latents)")
    p.add_argument("--lpips-pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="LPIPS with the ImageNet VGG (--no-lpips-pretrained: untrained, offline smoke tests)")
    p.add_argument("--inception-weights", type=existing, default=None, help="FID weights file (default: the torch hub cache)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="run checkpoints: use the EMA decoder (default: when present)")
    p.add_argument("--grid-images", type=at_least(1), default=4, help="images shown in grid.png")
    p.add_argument("--workers", type=at_least(0), default=2, help="DataLoader processes decoding images (0: none)")
    p.add_argument("--tile", type=tile_side, default=None, help="tiled decode in latent tiles of N px (default: "
                   f"64, i.e. 512 px, above {TILE_ABOVE} px; 0: never)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


@script_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
