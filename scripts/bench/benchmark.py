"""Training-step speed: our Lightning step against the official and a naive loop, on one fixed batch.

    python scripts/bench/benchmark.py -c CONFIG [key=value ...] [--steps N] [--warmup W] [--rounds R] [--batch-size B]
        [--reference official|naive ...] [--reference-precision 32-true|bf16-mixed] [--compile] [--cached-latents]
    python scripts/bench/benchmark.py --max-batch [key=value ...] [--presets x1.5 x2] [--resolutions 256 512]
        [--memory-budget-gb GIB]

Each variant runs in its own process on the same batch (random image in [-1, 1], a mask with holes),
resolution and precision; the GAN is on from step 0 (loss.disc_start=0) so the full step is measured.
"ours" is AsymmetricDecoderTraining.training_step in a real pl.Trainer (no logger, checkpoints, validation
or EMA), timed by a callback from one batch end to the next (CUDA: by events on the stream, which add no host
sync; reference_steps.mark).
Figures: median seconds per step over --steps after --warmup, images/s, peak memory (CUDA:
max_memory_allocated over the timed steps, the warm-up's apart: cuDNN's autotuning tries workspaces that can
fill the card, transiently; CPU: the process's peak RSS from getrusage, imports included), the decoder's model
FLOPs per step (FlopCounterMode, one decoder forward + backward) and, on CUDA, MFU. The last lines read
`speedup vs official: 1.52x` (reference seconds per step / ours). --cached-latents adds "ours-cached", our step with
the posterior in the batch as a latent cache gives it (the encoder skipped; scripts/bench/benchmark_latents.py), and the
encoder's own share of our step. On a shared machine, --rounds R alternates
the variants R times (load drifts evenly over them) and OMP_NUM_THREADS=1 avoids OpenMP stalls when other
processes hold the cores.

CPU target (x1, 64 px, batch 2, fp32):
    python scripts/bench/benchmark.py -c configs/x1.yaml model.vae_ckpt=null perceptual.pretrained=false \\
        data.resolution=64 data.batch_size=2 --reference official --reference naive
GPU (ours bf16 + channels_last against the naive loop in fp32):
    python scripts/bench/benchmark.py -c configs/x1_5.yaml model.vae_ckpt=null perceptual.pretrained=false \\
        data.resolution=256 trainer.precision=bf16-mixed model.channels_last=true \\
        --reference naive --reference-precision 32-true
Largest batch per GPU for x1.5 and x2 at 256 and 512 px, with and without gradient checkpointing
(CUDA: search with OOM catching; CPU: an estimate from per-image activation memory, fp32):
    python scripts/bench/benchmark.py --max-batch model.vae_ckpt=null perceptual.pretrained=false \\
        trainer.precision=bf16-mixed model.channels_last=true
"""
import argparse
import statistics
import sys

import torch

from harness import build_ours, fit_ours, gib, in_child, load, make_batch, pick_device, quiet  # first: puts ldm on the path
from benchmark_latents import cache_inputs, cache_report
from ldm.training.config import ConfigError
from ldm.cli import script_main
from reference_steps import REFERENCE_PRECISIONS, durations, mark, mark_step_end, run_reference, sync

# dense peaks (TFLOP/s) by device name: (bf16 tensor core, tf32 tensor core, fp32 non-tensor core)
PEAKS = [("H100 PCIe", (756.0, 378.0, 51.0)), ("H100 NVL", (835.0, 418.0, 60.0)), ("H100", (989.0, 495.0, 67.0)),
         ("H200", (989.0, 495.0, 67.0)), ("A100", (312.0, 156.0, 19.5))]


MAX_BATCH_UNUSED = ("config", "steps", "warmup", "rounds", "batch_size", "reference", "reference_precision", "compile",
                    "cached_latents")  # the options --max-batch has no use for
MAX_BATCH_ONLY = ("presets", "resolutions", "memory_budget_gb")  # and those only it uses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], help="YAML merged over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the variants in turn, pooling the timed steps (evens out a shared machine's load)")
    p.add_argument("--batch-size", type=int, default=None, help="overrides data.batch_size")
    p.add_argument("--reference", action="append", default=[], choices=["official", "naive"])
    p.add_argument("--reference-precision", default=None, choices=REFERENCE_PRECISIONS,
                   help="precision of the references (default: ours, trainer.precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile our blocks (model.compile=true)")
    p.add_argument("--cached-latents", action="store_true",
                   help="also time ours with a cached posterior in the batch (the encoder skipped)")
    p.add_argument("--max-batch", action="store_true", help="largest batch per GPU for x1.5 / x2 (see above); "
                   "takes key=value overrides and the three options below, no other")
    p.add_argument("--presets", nargs="+", default=["x1.5", "x2"], choices=["x1.5", "x2"], help="--max-batch")
    p.add_argument("--resolutions", nargs="+", type=int, default=[256, 512], help="--max-batch")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="GiB per GPU (default: CUDA the whole card, the CPU estimate 80); on CUDA a cap below the "
                        "card (torch.cuda.set_per_process_memory_fraction), e.g. 79.18 for an H100 80GB on a larger "
                        "card")
    args = p.parse_intermixed_args(argv)  # overrides on either side of the flags

    def flag(dest):
        return f"--{dest.replace('_', '-')}"

    def given(dests):  # the flags among dests set to other than their default
        return [flag(d) for d in dests if getattr(args, d) != p.get_default(d)]

    for dest in ("warmup", "steps", "rounds", "batch_size"):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            p.error(f"{flag(dest)} must be at least 1")
    if args.max_batch:
        if unused := given(MAX_BATCH_UNUSED):
            p.error(f"--max-batch takes none of {', '.join(unused)} (it runs configs/x1_5.yaml and x2.yaml)")
        return args
    if only := given(MAX_BATCH_ONLY):
        p.error(f"{', '.join(only)}: only with --max-batch")
    if not args.config:
        p.error("-c CONFIG is required (except with --max-batch)")
    check_config(p, args)
    return args


def check_config(parser, args):
    """The config and the references' precision, as usage errors before any variant runs."""
    try:
        cfg = load(args.config, args.overrides, args.batch_size, args.compile)
    except ConfigError as err:
        parser.error(str(err))
    if args.reference and args.reference_precision is None and str(cfg.trainer.precision) not in REFERENCE_PRECISIONS:
        parser.error(f"--reference-precision: not given, so ours: trainer.precision={cfg.trainer.precision}, which "
                     f"the reference loops cannot run (no GradScaler); pass one of {', '.join(REFERENCE_PRECISIONS)}")


# ----------------------------------------------------------------------------- ours


def step_end_timer(device, stamps, after_warmup=None):
    """A callback marking each batch end (reference_steps.mark_step_end): step k lasts from stamps[k-1] to
    stamps[k]. `after_warmup` (n, fn): fn() once n steps have ended."""
    import pytorch_lightning as pl

    class StepEndTimer(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            mark_step_end(device, stamps, after_warmup)

    return StepEndTimer()


def run_ours(cfg, image, mask, n_steps, cached=False, after_warmup=None):
    """Step times of ours; `cached`: with the posterior in the batch, plus the encoder's time alone."""
    stamps, extra, info = [], None, {}
    torch.manual_seed(cfg.seed)
    system = build_ours(cfg)
    if cached:
        extra, info["encoder_times"] = cache_inputs(system, image, mask, cfg.trainer.precision, n_steps)
    sync(image.device)
    stamps.append(mark(image.device))
    fit_ours(system, cfg, image, mask, n_steps, [step_end_timer(image.device, stamps, after_warmup)], extra)
    return durations(stamps), info


# ----------------------------------------------------------------------------- one variant per process


def measure(variant, files, overrides, batch_size, n_steps, precision, compile_blocks, warmup):
    """Child process: build and time one variant; step times, peak memory and its kind.

    CUDA: `peak` is the peak of the steps after the `warmup` ones, `peak_warmup` that of the warm-up (set-up,
    compiling and cuDNN's autotuning, whose trial workspaces can fill the card: transient, not what a run needs).
    """
    import resource
    quiet()
    cfg = load(files, overrides, batch_size, compile_blocks)
    device = pick_device(cfg)
    info, warm = {}, {}

    def end_of_warmup():
        if device.type == "cuda":
            warm["peak_warmup"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes; the same for every variant
        torch.cuda.reset_peak_memory_stats(device)
    image, mask = make_batch(cfg, device)
    if variant in ("ours", "ours-cached"):
        times, info = run_ours(cfg, image, mask, n_steps, variant == "ours-cached", (warmup, end_of_warmup))
    else:
        times = run_reference(variant, cfg, image, mask, n_steps, precision, (warmup, end_of_warmup))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated after warm-up"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of its process (getrusage)"
    return dict(info, **warm, times=times, peak=peak, peak_kind=kind, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


class VariantFailed(Exception):
    """A variant's process raised; the message names the variant."""


def run_variant(name, args, precision, n_steps):
    """measure() of one variant in its own process (see in_child)."""
    naive = ["diffusers.models.autoencoders.autoencoder_asym_kl"] if "naive" in args.reference else []  # a dev extra
    try:
        return in_child(measure, name, args.config, args.overrides, args.batch_size, n_steps, precision,
                        args.compile and name.startswith("ours"), args.warmup, preload=naive)
    except Exception as err:  # the child's error, re-raised here (or the process died: BrokenProcessPool)
        raise VariantFailed(f"{name}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------- FLOPs and MFU


def decoder_flops(cfg) -> int:
    """Model FLOPs of one decoder forward + backward at the run's shape (counted on the meta device).

    Counted without gradient checkpointing: its recompute is extra work, not model FLOPs (MFU's numerator)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm import build_autoencoder
    with torch.device("meta"):
        vae = build_autoencoder(**{**cfg.model.autoencoder, "gradient_checkpointing": False})
        b, r = cfg.data.batch_size, cfg.data.resolution
        z = torch.empty(b, cfg.model.autoencoder.embed_dim, r // 8, r // 8)
        image, mask = torch.empty(b, 3, r, r), torch.empty(b, 1, r, r)
    vae.freeze_all_but_decoder()
    with FlopCounterMode(display=False) as counter:
        vae.decode(z, image, mask, check=False).sum().backward()
    return counter.get_total_flops()


def peak_tflops(device_name: str, precision: str):
    """The card's dense peak for the precision, or None when the card is not known. fp32 convolutions run
    on TF32 tensor cores under PyTorch's default (torch.backends.cudnn.allow_tf32), so that is their peak."""
    for key, (bf16, tf32, fp32) in PEAKS:
        if key in device_name:
            if "16" in str(precision):  # bf16-mixed, 16-mixed
                return bf16
            return tf32 if torch.backends.cudnn.allow_tf32 else fp32
    return None


# ----------------------------------------------------------------------------- report


def report(cfg, args, results, flops):
    our_precision = str(cfg.trainer.precision)
    ref_precision = args.reference_precision or our_precision
    ours = results["ours"]
    print(f"device: {ours['device_name']} ({ours['device']}, {torch.get_num_threads()} threads)")
    print(f"config: {' '.join(args.config)} {' '.join(args.overrides)}")
    a = cfg.model.autoencoder
    print(f"decoder ch={a.ch} ch_mult={list(a.ch_mult)} num_res_blocks={a.num_res_blocks}, "
          f"{cfg.data.resolution} px, batch {cfg.data.batch_size}, channels_last={cfg.model.channels_last}, "
          f"gradient_checkpointing={a.gradient_checkpointing}, compile={cfg.model.compile or False}")
    print(f"GAN on from step 0 (loss.disc_start={cfg.loss.disc_start}) for every variant: the full step is measured")
    print(f"timing: median of {args.steps} steps after {args.warmup} warm-up, x {args.rounds} round(s) of the "
          f"variants in turn, each in its own process; one fixed in-memory batch")
    print(f"decoder model FLOPs per step (1 fwd+bwd, FlopCounterMode): {flops / 1e12:.4f} TFLOP")
    medians = {}
    for name, r in results.items():
        med = statistics.median(r["times"])
        medians[name] = med
        precision = our_precision if name.startswith("ours") else ref_precision
        print(f"{name:<11} images/s={cfg.data.batch_size / med:.3f}  s/step={med:.4f}  (best {min(r['times']):.4f})  "
              f"precision={precision}  peak_mem={gib(r['peak'])} ({r['peak_kind']}"
              + (f"; warm-up: {gib(r['peak_warmup'])})" if "peak_warmup" in r else ")"))
        print(f"{'':<11} MFU (decoder FLOPs): {mfu_text(flops, med, r['device_name'], precision)}")
    best = {name: min(r["times"]) for name, r in results.items()}
    if "ours-cached" in results:
        print("\n".join(cache_report(cfg.data.batch_size, medians["ours"], medians["ours-cached"],
                                     statistics.median(results["ours-cached"]["encoder_times"]),
                                     best["ours"] / best["ours-cached"])))
    if args.reference:
        print("best-step ratios (less sensitive to other load on the machine): "
              + ", ".join(f"{name} {best[name] / best['ours']:.2f}x" for name in dict.fromkeys(args.reference)))
    for name in dict.fromkeys(args.reference):
        print(f"speedup vs {name}: {medians[name] / medians['ours']:.2f}x")


def mfu_text(flops, seconds, device_name, precision):
    if device_name == "cpu":
        return f"n/a on CPU ({flops / seconds / 1e9:.1f} GFLOP/s achieved)"
    peak = peak_tflops(device_name, precision)
    achieved = flops / seconds / 1e12
    if peak is None:
        return f"unknown peak for {device_name} ({achieved:.1f} TFLOP/s achieved)"
    return f"{100 * achieved / peak:.1f} % of {peak:g} TFLOP/s ({achieved:.1f} TFLOP/s achieved)"


def run_benchmark(args):
    cfg = load(args.config, args.overrides, args.batch_size, args.compile)
    n = args.warmup + args.steps
    ref_precision = args.reference_precision or str(cfg.trainer.precision)
    results = {}
    for _ in range(args.rounds):
        for name in ["ours", *(["ours-cached"] if args.cached_latents else []), *dict.fromkeys(args.reference)]:
            r = run_variant(name, args, None if name.startswith("ours") else ref_precision, n)
            r["times"] = r["times"][args.warmup:]
            if name in results:
                r["times"] = results[name]["times"] + r["times"]
                if "encoder_times" in r:
                    r["encoder_times"] = results[name]["encoder_times"] + r["encoder_times"]
                for key in ("peak", "peak_warmup"):
                    if key in r:
                        r[key] = max(r[key], results[name][key])
            results[name] = r
    report(cfg, args, results, decoder_flops(cfg))


@script_main
def main(argv=None):
    args = parse_args(argv)
    if args.max_batch:
        from benchmark_memory import run_max_batch
        run_max_batch(args)
        return 0
    try:
        run_benchmark(args)
    except VariantFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
