"""An evaluation built from scripts/eval.py's arguments: images, masks, decoders, the pipeline's latents, the tables.

Two tables. The reconstruction table: every decoder decodes the frozen encoder's posterior mean of the whole image
(--vae; the hole's latent holds the true content: the easy case). The generated table (--pipeline, the paper's
protocol): every decoder decodes the same latents an inpainting pipeline generated for the image and its mask
(ldm/evaluation/generated.py), ours conditioned on the image and mask, `vanilla` being the pipeline's own VAE.
"""
import functools
import logging
import math
import platform
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import resolve_source
from data.buckets import ShapeBatches, aspect_buckets
from data.evaluation import EvalImages, eval_masks, image_count
from ..decoding import pipelines
from ..formats.convert import CheckpointError, load_autoencoder
from .loop import OUTPUTS, Decoder, FidTracker, evaluate, inception_weights, write_reports
from .generated import Generation, GeneratedLatents, GenerationError, PipelineVAE, WithLatents, read_captions
from ..metrics import feather_radius
from ..modules.tiling import auto_tile

log = logging.getLogger("eval")
ROOT = Path(__file__).resolve().parents[2]  # the repository (ldm/evaluation/ is two below)
VANILLA = "vanilla"


class EvalError(ValueError):
    """A command-line value that cannot work; the message says which and why."""


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
    if spec == VANILLA:
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


def shared_vae(args, device):
    """The shared encoder (and `vanilla`): --vae, else the pipeline's own VAE folder, else None."""
    if args.vae:
        return load_autoencoder(args.vae, device=device)
    if not args.pipeline:
        return None
    try:
        return load_autoencoder(Path(args.pipeline) / "vae", device=device)
    except CheckpointError as err:
        raise EvalError(f"--pipeline {args.pipeline}: its VAE cannot be the reconstruction table's encoder ({err}); "
                        f"pass --vae") from None


def load_decoders(args, device):
    """(decoders, shared encoder or None); with --pipeline each must decode that pipeline VAE's latents."""
    vae = shared_vae(args, device)
    decoders = [load_decoder(s, n, vae, device, args.ema) for s, n in zip(args.decoder, labels(args.decoder, args.name))]
    if args.pipeline:
        config = pipelines.vae_config(args.pipeline)
        for dec in decoders:
            pipelines.check_decoder(dec.model, config, f"--decoder {dec.info['spec']}")
    return decoders, vae


@functools.lru_cache(maxsize=2)  # frozen: built once per process, also when main() runs repeatedly
def lpips_network(pretrained, device):
    from ..modules.losses import PerceptualLoss
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOMLY initialised.*")  # said in results.md
            with torch.random.fork_rng(devices=[]):  # untrained: the same VGG whatever ran before (a pipeline)
                torch.manual_seed(0)
                return PerceptualLoss("vgg", pretrained=pretrained).to(device)
    except FileNotFoundError as err:
        raise EvalError(f"{err} (or pass --no-lpips-pretrained for an untrained VGG)") from None


# ---- the generated latents ---------------------------------------------------------------------------------
def generated_latents(args, images, device) -> GeneratedLatents:
    """The pipeline's latents of every image, generated where the cache lacks them (ldm/evaluation/generated.py)."""
    generation = Generation(args.pipeline, steps=args.steps, seed=args.seed, guidance=args.guidance,
                            strength=args.strength, negative_prompt=args.negative_prompt)
    captions = read_captions(args.captions) if args.captions else None
    cache = GeneratedLatents(args.latent_cache or Path(args.out) / "latents", generation, captions).open()
    bar = tqdm(desc="pipeline", unit="image", file=sys.stderr)
    cache.fill(images, device, progress=lambda i: bar.update())
    bar.close()
    log.info("generated latents: %d made now, %d read from %s", cache.made, cache.read_now, cache.folder)
    return cache


def with_pipeline_vae(decoders, folder, device) -> list:
    """The decoders of the generated table: `vanilla` becomes the pipeline's own VAE (loaded alone)."""
    vae = None
    out = []
    for dec in decoders:
        if dec.info["spec"] == VANILLA:
            vae = vae or PipelineVAE(pipelines.load_vae(folder, device), frames=pipelines.select(folder).frames)
            dec = Decoder(dec.name, vae, branch=False, info={**dec.info, "weights": str(Path(folder) / "vae"),
                                                               "format": type(vae.vae).__name__})
        out.append(dec)
    return out


# ---- scoring and reports ---------------------------------------------------------------------------------
def score(args, decoders, dataset, n, device, encoder=None, name="eval"):
    """(summary, grid) of `decoders` on the n images of `dataset` (batched by image shape); FID when its weights are
    present."""
    weights, _ = inception_weights(args.inception_weights)
    keys = [(d.name, o) for d in decoders for o in OUTPUTS]
    fid = FidTracker.inception(keys, weights, device) if weights else None
    loader = DataLoader(ShapeBatches(dataset, args.batch_size), batch_size=None, num_workers=args.workers)
    batches = tqdm(loader, total=math.ceil(n / args.batch_size) if n else None, desc=name, unit="batch",
                   file=sys.stderr)
    return evaluate(decoders, batches, lpips_network(args.lpips_pretrained, device), encoder, fid,
                    args.grid_images, tile=auto_tile(args.tile, args.resolution))


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchmetrics", "diffusers", "lpips", "torch-fidelity", "scikit-image", "asymmetric-decoder"):
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


def image_notes(args, buckets, mask_info, evaluated, skipped) -> list:
    """What results.md says about the images and masks."""
    shapes = ", ".join(f"{h}x{w}" for h, w in buckets)
    crop = (f"centre-cropped to the largest square and resized to {shapes}" if len(buckets) == 1 else
            f"image i centre-cropped to the aspect of shape i mod {len(buckets)} of {shapes} (--aspect-ratios "
            f"{','.join(map(str, args.aspect_ratios))}) and resized to it")
    if mask_info["kind"] == "preset":
        masks = (f"masks: {mask_info['preset']} preset (LaMa), generated from seed {args.seed} at each image's shape, "
                 f"hole area <= {args.max_area:.0%} (redrawn above)")
    else:
        masks = (f"masks: {mask_info['count']} files from {mask_info['folder']} (white = hole), resized (nearest) "
                 f"to each image's shape" + ("; cycled: image i takes mask i mod count" if mask_info["cycled"] else ""))
    return [f"command: `{' '.join(['python scripts/eval.py', *args.argv])}`",
            f"images: {evaluated} from {args.data}, {crop} (area averaging to shrink, bilinear to enlarge)"
            + (f"; {skipped} unreadable skipped" if skipped else ""), masks]


def table_notes(args, names, generation) -> list:
    """What results.md says about the two tables, the outputs and the metrics."""
    encoder = args.vae or (Path(args.pipeline) / "vae" if args.pipeline else None)
    out = [f"reconstruction table: every decoder decodes the posterior mean of the encoder in {encoder}, for the "
           f"whole image (the hole's latent holds the true content)" if encoder else
           "reconstruction table: each decoder decodes its own encoder's posterior mean of the whole image"]
    if generation is not None:
        g = generation
        out.append(f"generated table (the paper's protocol): {g.settings()['class']} from {args.pipeline} ran once per "
                   f"image and mask, {g.steps} steps, image i's seed drawn from (seed {g.seed}, i), prompts from "
                   f"{args.captions or 'none (empty)'}" + (f", guidance {g.guidance}" if g.guidance is not None else "")
                   + (f", strength {g.strength}" if g.strength is not None else "")
                   + f"; every decoder decodes its final latents (cached in {args.latent_cache or 'OUT/latents'}); "
                   f"vanilla there = the pipeline's own VAE")
    out += ["raw = decoder output clamped to [-1, 1]; pasted = raw in the hole, original pixels in the known region "
            "(its known-region PSNR is the 100 dB cap and its pre_error 0); feathered = raw pasted through the mask "
            f"dilated and blurred by {feather_radius(args.resolution)} px (ldm.metrics.feather_back: what inpainting "
            "tools do)",
            "PSNR and SSIM on [-1, 1] (data range 2), PSNR capped at 100 dB; LPIPS (VGG) of a composite that differs "
            "from the image only in the region; pre_error = known-region MSE on the [0, 1] scale; dE00 known = mean "
            "CIEDE2000 colour difference over the known region (scikit-image); seam = mean |gradient error| on a "
            f"band of {feather_radius(args.resolution)} px each side of the mask's edge; means ignore undefined "
            "values; n/a = undefined for every image",
            f"grid.png{' and grid_generated.png' if generation else ''}: a row per image (the first of image 0's shape); "
            f"columns: image, masked image (holes grey), then for each decoder ({', '.join(names)}) its raw output "
            "and |output - image| x 4"]
    if VANILLA in args.decoder and encoder:
        out.append(f"vanilla = the decoder of {encoder}, decoded without the masked image (the paper's baseline)")
    if not args.lpips_pretrained:
        out.append("LPIPS uses an UNTRAINED VGG (--no-lpips-pretrained): not perceptual, a smoke test only")
    return out


def run(args) -> list:
    """Evaluate and write the reports; returns their paths."""
    if args.resolution % 8 or args.resolution <= 0:
        raise EvalError(f"--resolution {args.resolution}: must be a positive multiple of 8")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.pipeline:
        pipelines.select(args.pipeline)  # a foreign folder stops here, before anything loads
    source = resolve_source(args.data)
    n = image_count(source, args.num_images)
    buckets = aspect_buckets(args.resolution, args.aspect_ratios)
    try:
        masks, mask_info = eval_masks(args.masks, args.resolution, n, args.seed, args.max_area, args.save_masks,
                                      buckets)
    except ValueError as err:
        raise EvalError(str(err)) from None
    decoders, vae = load_decoders(args, device)
    tables, grids, cache = {}, {}, None
    if args.pipeline:
        cache = generated_latents(args, EvalImages(source, args.resolution, masks, n, buckets), device)
        tables["generated"], grids["generated"] = score(
            args, with_pipeline_vae(decoders, args.pipeline, device),
            WithLatents(EvalImages(source, args.resolution, masks, n, buckets), cache), n, device, name="generated")
    images = EvalImages(source, args.resolution, masks, n, buckets)
    tables["reconstruction"], grids["reconstruction"] = score(args, decoders, images, n, device, vae,
                                                              "reconstruction")
    if not tables["reconstruction"]:
        raise EvalError(f"--data {args.data}: no readable image among the first {n or 'all'}")
    evaluated = int(next(iter(tables["reconstruction"].values()))["raw"]["all"]["n"])
    skipped = images.skipped.value  # shared by the loader's worker processes
    weights, fid_note = inception_weights(args.inception_weights)
    meta = {"config": {k: v for k, v in vars(args).items() if k != "argv"}, "command": args.argv,
            "seed": args.seed, "versions": versions(), "device": str(device), "masks": mask_info,
            "images": {"source": args.data, "evaluated": evaluated, "skipped": skipped,
                       "shapes": [list(b) for b in buckets]},
            "decoders": {d.name: d.info for d in decoders}, "fid": str(weights) if weights else fid_note,
            **({"generation": cache.generation.settings()} if cache else {})}
    lines = [*image_notes(args, buckets, mask_info, evaluated, skipped),
             *table_notes(args, [d.name for d in decoders], cache and cache.generation)] + ([fid_note] if fid_note else [])
    return write_reports(args.out, tables["reconstruction"], lines, meta, grids["reconstruction"],
                         generated=(tables["generated"], grids["generated"]) if cache else None)


def main(args) -> int:
    """Run, printing the report; a bad argument, file, checkpoint or pipeline: one line `eval: ...`, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.backends.cudnn.benchmark = False  # the same numbers on every run
    try:
        paths = run(args)
    except (EvalError, CheckpointError, FileNotFoundError, GenerationError, pipelines.PipelineError) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    for path in paths:
        print(path, file=sys.stderr)
    return 0
