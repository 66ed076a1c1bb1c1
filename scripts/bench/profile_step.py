"""Where our training step's time goes: torch.profiler over a few real steps, summarised.

    python scripts/bench/profile_step.py -c CONFIG [key=value ...] [--steps N] [--warmup W] [--top K] [--trace FILE]

The same step as scripts/bench/benchmark.py measures (one fixed batch, GAN on from step 0, a real pl.Trainer).
Prints the device's busy share of the profiled wall time (low: the host cannot feed it), the time per kernel
kind (convolution, normalisation, elementwise, ...) and the top kernels; --trace writes a Chrome trace. Then,
over as many further steps without the profiler, the time of each part of the step (encoder, decoder forward,
losses, backward, optimisers, the loop between), from marks at their boundaries (CUDA: events on the stream).
Example (the GPU target):
    python scripts/bench/profile_step.py -c configs/x1_5.yaml model.vae_ckpt=null perceptual.pretrained=false \\
        data.resolution=256 trainer.precision=bf16-mixed model.channels_last=true
"""
import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import build_ours, fit_ours, load, make_batch, pick_device, quiet
from ldm.cli import at_least, script_main
from ldm.training.config import ConfigError
from reference_steps import durations, mark, sync

# kernel kind by name, first match wins (cuDNN / cuBLAS / CUTLASS / ATen kernel names). Inductor's kernels come
# first: they are named after the ops they fuse (triton_red_fused_native_group_norm_..., ..._convolution_backward_...).
# cuDNN's convolutions say how they run (sm90_xmma_fprop_implicit_gemm_...): matched before cuBLAS's plain
# matmuls (sm90_xmma_gemm_..., ampere_sgemm_...). Normalisation layers by name, so that a vector norm (the
# adaptive weight's, NormTwoOps) is a reduction.
KINDS = [("compiled (inductor)", r"^triton_"),
         ("layout (cuDNN's own)", r"nchwToNhwc|nhwcToNchw"),
         ("convolution", r"conv|cudnn|implicit|wgrad|dgrad|fprop|winograd"),
         ("matmul / attention", r"gemm|matmul|aten::(add|b|baddb)?mm\b|flash|fmha|attention|cutlass"),
         ("normalisation", r"(group|layer|batch)_?norm|welford|moments|GammaBeta|InternalGradients|FusedParams"),
         ("optimiser", r"adam|multi_tensor|foreach"),
         ("copy (layout, dtype)", r"copy|contiguous|transpose|permute"),
         ("reduction", r"reduce|sum|norm"),
         ("elementwise", r"elementwise|vectorized|unrolled|silu|add|mul|activation|where|clamp|upsample")]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], required=True, help="YAML over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--steps", type=at_least(1), default=5, help="profiled steps (and as many for the phases)")
    p.add_argument("--warmup", type=at_least(1), default=3, help="unprofiled steps first (cuDNN autotuning, compilation)")
    p.add_argument("--top", type=at_least(1), default=20, help="kernels listed")
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace (chrome://tracing, perfetto)")
    args = p.parse_intermixed_args(argv)  # overrides on either side of the flags
    try:
        args.cfg = load(args.config, args.overrides)
    except ConfigError as err:  # a bad key or value: named, before any step runs
        p.error(str(err))
    return args


def profiled_steps(system, cfg, image, mask, warmup, steps):
    """Run warmup + 2 x steps training steps: the profiler records steps warmup+1..warmup+steps (from a step end to
    the last), the phase marks the `steps` after those (timed apart: the profiler slows the host)."""
    import pytorch_lightning as pl
    device = image.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    span = {}
    marks = phase_marks(system, device, first_step=warmup + steps)

    class Window(pl.Callback):  # waits for the device at the window's two ends only: the steps run as in training
        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step == warmup:
                sync(device)
                span["start"] = time.perf_counter()
                prof.start()
            elif trainer.global_step == warmup + steps:
                sync(device)
                prof.stop()
                span["wall"] = time.perf_counter() - span["start"]

    fit_ours(system, cfg, image, mask, warmup + 2 * steps, [Window(), marks.callback])
    return prof, span["wall"], marks


# a training step's parts, between the marks phase_marks records: (from, to) -> what runs there
PHASES = {("batch start", "encoder start"): "loop: batch into the step",
          ("encoder start", "encoder end"): "encoder (frozen, no grad)",
          ("encoder end", "decoder start"): "between encoder and decoder",
          ("decoder start", "decoder end"): "decoder forward (with the masked-image branch)",
          ("decoder end", "backward start"): "losses: L1, LPIPS, GAN fwd + grads to the output",
          ("backward start", "backward end"): "backward: decoder and discriminator",
          ("backward end", "batch end"): "finite check, Adam, schedulers, logs",
          ("batch end", "batch start"): "loop: between steps"}


class PhaseMarks:
    """Marks (reference_steps.mark: CUDA events, else the host clock) at the start and end of the step's parts, from
    training step `first_step` on; `durations()`: milliseconds per phase, one list entry per step."""

    def __init__(self, device, first_step):
        import pytorch_lightning as pl
        self.device, self.marks, self.on = device, [], False
        outer = self

        class Boundaries(pl.Callback):
            def on_train_batch_start(self, trainer, *args, **kwargs):
                outer.on = trainer.global_step >= first_step
                outer.add("batch start")

            def on_train_batch_end(self, trainer, *args, **kwargs):
                outer.add("batch end")

        self.callback = Boundaries()

    def add(self, name):
        if self.on:
            self.marks.append((name, mark(self.device)))

    def wrap(self, obj, attr, name):
        """Mark `name start` / `name end` around each call of obj.attr (an instance attribute shadows the method)."""
        fn = getattr(obj, attr)

        def marked(*args, **kwargs):
            self.add(f"{name} start")
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(f"{name} end")
        setattr(obj, attr, marked)

    def durations(self):
        """{phase: [milliseconds in each step]}; a step runs from its batch start to the next one's."""
        names = [n for n, _ in self.marks]
        times = durations([m for _, m in self.marks])  # times[i]: from mark i to mark i + 1
        starts = [i for i, n in enumerate(names) if n == "batch start"] + [len(times)]
        out = defaultdict(list)
        for lo, hi in zip(starts, starts[1:]):
            step = defaultdict(float)
            for a, b, t in zip(names[lo:hi], names[lo + 1:hi + 1], times[lo:hi]):
                step[PHASES.get((a, b), f"{a} -> {b}")] += t * 1e3
            for phase, total in step.items():
                out[phase].append(total)
        return out


def phase_marks(system, device, first_step):
    marks = PhaseMarks(device, first_step)
    marks.wrap(system, "latent", "encoder")
    marks.wrap(system, "decode_with_features", "decoder")
    marks.wrap(system, "manual_backward", "backward")
    return marks


def summarise_phases(marks):
    """Median milliseconds per step of each phase (device time between the marks on CUDA, idle included)."""
    per_phase = marks.durations()
    medians = {p: statistics.median(v) for p, v in per_phase.items()}
    total = sum(medians.values())
    print(f"phases of a step (median of {max(map(len, per_phase.values()), default=0)} steps; CUDA: device time "
          f"between the marks, idle included):")
    for phase, ms in medians.items():
        print(f"  {phase:<52}{ms:9.2f} ms {100 * ms / max(total, 1e-12):6.1f}%")
    print(f"  {'sum':<52}{total:9.2f} ms")
    return medians


def summarise(prof, wall, steps, device_type, top):
    on_device = device_type == "cuda"
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA") == on_device and (on_device or e.key.startswith("aten::"))]
    self_us = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) / 1e6
    print(f"profiled {steps} steps: {wall / steps * 1e3:.1f} ms/step wall")
    if on_device:
        print(f"device busy: {total / steps * 1e3:.1f} ms/step = {100 * total / wall:.0f} % of wall "
              f"(the rest: the device waits for the host)")
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += self_us(e) / 1e6
    print(f"{'time by kind':<22}{'ms/step':>9}{'share':>8}")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<22}{t / steps * 1e3:9.2f}{100 * t / max(total, 1e-12):7.1f}%")
    print(f"top {top} {'kernels' if on_device else 'ops'} by self time:")
    for e in sorted(events, key=self_us, reverse=True)[:top]:
        print(f"{self_us(e) / steps / 1e3:9.2f} ms/step  x{e.count // steps:<4} {kind_of(e.key):<20} {e.key[:110]}")


@script_main
def main(argv=None):
    args = parse_args(argv)
    quiet()
    cfg = args.cfg
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    image, mask = make_batch(cfg, device)
    torch.manual_seed(cfg.seed)
    system = build_ours(cfg)
    prof, wall, marks = profiled_steps(system, cfg, image, mask, args.warmup, args.steps)
    a = cfg.model.autoencoder
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; decoder ch={a.ch}, "
          f"{cfg.data.resolution} px, batch {cfg.data.batch_size}, {cfg.trainer.precision}, "
          f"channels_last={cfg.model.channels_last}, compile={cfg.model.compile}")
    summarise(prof, wall, args.steps, device.type, args.top)
    summarise_phases(marks)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"trace: {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
