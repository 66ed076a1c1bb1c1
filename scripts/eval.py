"""Evaluate decoders side by side on fixed masks: the paper's table (FID, LPIPS, PSNR, SSIM, pre_error).

    python scripts/eval.py --decoder A [--decoder B ...] [--name LABEL ...] --data SOURCE \\
        --masks thick|medium|thin|mixed|MASK_DIR --out DIR [--vae SD_WEIGHTS] [--resolution 256] \\
        [--num-images N] [--batch-size 16] [--seed 0] [--max-area 0.5] [--no-lpips-pretrained] [--device auto]

A decoder is a run checkpoint (logs/<run>/checkpoints/last.ckpt), an exported or diffusers folder/file, or
`vanilla`: the plain SD decoder of --vae, decoded with the masked-image branch off (the paper's baseline).
With --vae every decoder decodes that encoder's latents (the frozen SD encoder); otherwise its own.
Writes DIR/results.md, results.csv, results.json and grid.png. Exit code 2: a bad argument, file or checkpoint.
"""
import argparse
import functools
import itertools
import logging
import math
import platform
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from data import (PRESETS, SkipCounter, load_crop, load_mask_files, make_eval_masks,  # noqa: E402
                  resolve_source, save_masks)
from data.sources import shard_samples  # noqa: E402
from ldm import CheckpointError, load_autoencoder  # noqa: E402
from ldm.cli import at_least, existing, fraction, multiple_of_8, tile_side  # noqa: E402
from ldm.evaluation import OUTPUTS, Decoder, FidTracker, evaluate, inception_weights, write_reports  # noqa: E402
from ldm.metrics import feather_radius  # noqa: E402
from ldm.tiling import TILE_ABOVE, auto_tile  # noqa: E402

log = logging.getLogger("eval")
MIXED = "mixed"  # thick + medium + thin in equal parts (MaskGenerator's default mix)


class EvalError(ValueError):
    """A command-line value that cannot work; the message says which and why."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", action="append", required=True, help="checkpoint, folder or 'vanilla' (repeat)")
    p.add_argument("--name", action="append", default=[], help="label of each --decoder, in order")
    p.add_argument("--data", required=True, help="'sample', an image folder, or webdataset shards")
    p.add_argument("--masks", required=True, help=f"preset ({'|'.join([*PRESETS, MIXED])}) or a folder of mask "
                                                  "PNGs (white = hole)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vae", type=existing, default=None, help="SD autoencoder weights: the shared encoder, and 'vanilla'")
    p.add_argument("--resolution", type=multiple_of_8, default=256, help="square side in pixels, a multiple of 8")
    p.add_argument("--num-images", type=at_least(1), default=None, help="the first N images (default: all)")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--seed", type=int, default=0, help="generated masks are fixed by it")
    p.add_argument("--max-area", type=fraction, default=0.5, help="generated masks: redraw above this hole area")
    p.add_argument("--save-masks", default=None, help="write the generated masks here (reuse: --masks DIR)")
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:  # "gpu", "cuda:x": torch's message lists the device types
        raise EvalError(f"--device {name}: {err}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {name}: {torch.cuda.device_count()} CUDA device(s) here")
    return device


# ---- images and masks ------------------------------------------------------------------------------------
class EvalImages(IterableDataset):
    """Source image i, centre-cropped and resized, with mask i mod len(masks); unreadable files are skipped."""

    def __init__(self, source, resolution, masks, n=None):
        self.source, self.resolution, self.masks, self.n = source, resolution, masks, n
        self.skipped = SkipCounter()

    def _raw(self):
        if self.source.kind == "files":
            return iter(self.source.items)
        return (raw for _, raw in shard_samples(self.source.items, self.skipped.add))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, raw in enumerate(itertools.islice(self._raw(), self.n)):
            if i % workers != worker:
                continue
            try:
                pixels = load_crop(raw, self.resolution)  # (R, R, 3) uint8, the largest centred square
            except Exception as error:  # corrupt or not an image: counted and reported
                self.skipped.add(raw if isinstance(raw, str) else f"sample {i}", error)
                continue
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # (3, R, R) in [-1, 1]
            yield {"image": image, "mask": self.masks[i % len(self.masks)].float(), "index": i}


def image_count(source, num_images):
    """Images to evaluate (None: unknown, a shard source read to its end)."""
    if source.kind == "files":
        return len(source) if num_images is None else min(len(source), num_images)
    return num_images


def build_masks(args, n):
    """(masks bool (M,1,R,R), description for the reports)."""
    R = args.resolution
    if Path(args.masks).is_dir():
        masks = load_mask_files(args.masks, resolution=R) > 0.5  # (M, 1, R, R)
        cycled = n is None or len(masks) < n
        return masks, {"kind": "files", "folder": str(args.masks), "count": len(masks), "cycled": cycled}
    if args.masks not in (*PRESETS, MIXED):
        raise EvalError(f"--masks {args.masks!r}: neither a folder nor a preset ({', '.join([*PRESETS, MIXED])})")
    if n is None:
        raise EvalError("--num-images is needed to generate masks for a shard source (its length is unknown)")
    mix = None if args.masks == MIXED else {args.masks: 1.0}
    array = make_eval_masks(n, R, seed=args.seed, mix=mix, max_area=args.max_area)  # (n, R, R) uint8
    if args.save_masks:
        save_masks(array, args.save_masks)
    return torch.from_numpy(array[:, None] > 0), {"kind": "preset", "preset": args.masks, "seed": args.seed,
                                                  "max_area": args.max_area, "count": n, "saved": args.save_masks}


# ---- decoders --------------------------------------------------------------------------------------------
def default_label(spec: str) -> str:
    """logs/<run>/checkpoints/last.ckpt -> <run>; a folder -> its name; a file -> its stem."""
    path = Path(spec)
    if path.parent.name == "checkpoints" and path.suffix == ".ckpt":
        run = path.parent.parent.name
        return run if path.stem == "last" else f"{run}/{path.stem}"
    return path.name if path.is_dir() else path.stem


def labels(specs, names):
    if names and len(names) != len(specs):
        raise EvalError(f"{len(names)} --name for {len(specs)} --decoder: give one per decoder, or none")
    out = []
    for label in names or [default_label(s) for s in specs]:
        base, k = label, 2
        while label in out:  # two decoders must not share a row label
            label, k = f"{base}#{k}", k + 1
        out.append(label)
    return out


def load_decoder(spec, name, vae, device, ema) -> Decoder:
    """One decoder; the branch is off for `vanilla` and for weights without a trained branch."""
    if spec == "vanilla":
        if vae is None:
            raise EvalError("--decoder vanilla needs --vae: the SD weights whose decoder it is")
        return Decoder(name, vae, branch=False, info={"spec": spec, "weights": vae.load_report.path,
                                                      "format": vae.load_report.format, "branch": False,
                                                      "config": vae.config})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoder export.*")  # handled below
        model = load_autoencoder(spec, device=device, ema=ema)
    report = model.load_report
    if vae is not None and model.config["embed_dim"] != vae.config["embed_dim"]:
        raise EvalError(f"--decoder {spec}: decodes {model.config['embed_dim']} latent channels (base "
                        f"{model.config.get('base')}), --vae {vae.load_report.path} encodes {vae.config['embed_dim']}")
    if report.format == "decoder" and vae is None:
        raise EvalError(f"--decoder {spec}: a decoder export has no encoder; pass --vae (the SD weights)")
    branch = not any(k.startswith("decoder.encoder.") for k in report.fresh)  # an untrained branch stays off
    if not branch:
        log.warning("%s: no masked-image branch weights in it; evaluated as a plain decoder", spec)
    return Decoder(name, model, branch=branch, info={"spec": spec, "format": report.format, "ema": report.ema,
                                                     "branch": branch and model.config["use_condition"],
                                                     "config": model.config})


def load_decoders(args, device):
    """(decoders, shared encoder or None)."""
    vae = load_autoencoder(args.vae, device=device) if args.vae else None
    names = labels(args.decoder, args.name)
    return [load_decoder(s, n, vae, device, args.ema) for s, n in zip(args.decoder, names)], vae


@functools.lru_cache(maxsize=2)  # frozen: built once per process, also when main() runs repeatedly
def lpips_network(pretrained, device):
    from ldm.modules.losses import PerceptualLoss
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOMLY initialised.*")  # said in results.md
            return PerceptualLoss("vgg", pretrained=pretrained).to(device)
    except FileNotFoundError as err:
        raise EvalError(f"{err} (or pass --no-lpips-pretrained for an untrained VGG)") from None


# ---- reports ---------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchmetrics", "diffusers", "lpips", "torch-fidelity", "asymmetric-decoder"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def notes(args, names, mask_info, evaluated, skipped, fid_note) -> list:
    """What results.md says about how the numbers were made."""
    R = args.resolution
    if mask_info["kind"] == "preset":
        masks = (f"masks: {mask_info['preset']} preset (LaMa), generated from seed {args.seed}, hole area "
                 f"<= {args.max_area:.0%} (redrawn above)")
    else:
        masks = (f"masks: {mask_info['count']} files from {mask_info['folder']} (white = hole), resized (nearest) "
                 f"to {R}x{R}" + ("; cycled: image i takes mask i mod count" if mask_info["cycled"] else ""))
    encoder = (f"latents: posterior mean of the encoder in {args.vae} (the frozen SD encoder), for every decoder"
               if args.vae else "latents: posterior mean of each decoder's own encoder")
    out = [f"command: `{' '.join(['python scripts/eval.py', *args.argv])}`",
           f"images: {evaluated} from {args.data}, centre-cropped to the largest square and resized to {R}x{R} "
           f"(area averaging to shrink, bilinear to enlarge)" + (f"; {skipped} unreadable skipped" if skipped else ""),
           masks, encoder,
           "raw = decoder output clamped to [-1, 1]; pasted = raw in the hole, original pixels in the known region "
           "(its known-region PSNR is the 100 dB cap and its pre_error 0); feathered = raw pasted through the mask "
           f"dilated and blurred by {feather_radius(R)} px (ldm.metrics.feather_back: what inpainting tools do)",
           "PSNR and SSIM on [-1, 1] (data range 2), PSNR capped at 100 dB; LPIPS (VGG) of a composite that differs "
           "from the image only in the region; pre_error = known-region MSE on the [0, 1] scale; means ignore "
           "undefined values; n/a = undefined for every image"]
    out.append(f"grid.png: a row per image (the first {min(args.grid_images, evaluated)}); columns: image, masked "
               f"image (holes grey), then for each decoder ({', '.join(names)}) its raw output and "
               "|output - image| x 4")
    if "vanilla" in args.decoder:
        out.append(f"vanilla = the SD decoder of {args.vae}, decoded without the masked image (the paper's baseline)")
    if not args.lpips_pretrained:
        out.append("LPIPS uses an UNTRAINED VGG (--no-lpips-pretrained): not perceptual, a smoke test only")
    return out + ([fid_note] if fid_note else [])


def run(args) -> list:
    """Evaluate and write the reports; returns their paths."""
    if args.resolution % 8 or args.resolution <= 0:
        raise EvalError(f"--resolution {args.resolution}: must be a positive multiple of 8")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    source = resolve_source(args.data)
    n = image_count(source, args.num_images)
    masks, mask_info = build_masks(args, n)
    decoders, vae = load_decoders(args, device)
    perceptual = lpips_network(args.lpips_pretrained, device)
    weights, fid_note = inception_weights(args.inception_weights)
    keys = [(d.name, o) for d in decoders for o in OUTPUTS]
    fid = FidTracker.inception(keys, weights, device) if weights else None
    dataset = EvalImages(source, args.resolution, masks, n)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    total = math.ceil(n / args.batch_size) if n else None
    batches = tqdm(loader, total=total, desc="eval", unit="batch", file=sys.stderr)
    summary, grid_image = evaluate(decoders, batches, perceptual, vae, fid, args.grid_images,
                                   tile=auto_tile(args.tile, args.resolution))
    if not summary:
        raise EvalError(f"--data {args.data}: no readable image among the first {n or 'all'}")
    evaluated = int(next(iter(summary.values()))["raw"]["all"]["n"])
    skipped = dataset.skipped.value  # shared by the loader's worker processes
    meta = {"config": {k: v for k, v in vars(args).items() if k != "argv"}, "command": args.argv,
            "seed": args.seed, "versions": versions(), "device": str(device), "masks": mask_info,
            "images": {"source": args.data, "evaluated": evaluated, "skipped": skipped},
            "decoders": {d.name: d.info for d in decoders}, "fid": str(weights) if weights else fid_note}
    lines = notes(args, [d.name for d in decoders], mask_info, evaluated, skipped, fid_note)
    return write_reports(args.out, summary, lines, meta, grid_image)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.backends.cudnn.benchmark = False  # the same numbers on every run
    try:
        paths = run(args)
    except (EvalError, CheckpointError, FileNotFoundError) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    for path in paths:
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
