"""The paper's core claim at demo scale: the masked-image branch keeps the known region; a plain decoder does not.

    python scripts/compare_condition.py [--steps N] [--out logs/compare_condition] [--log-dir logs] \\
        [--set key=value ...] [--skip-train]

Trains configs/demo.yaml (run demo_asym) and the same recipe without the branch
(configs/demo.yaml + configs/ablations/no_condition.yaml, run demo_vanilla) with the same seed and steps, then
evaluates both last checkpoints with scripts/eval.py on the same fixed masks (medium preset, seed 0, the
sample images at the demo's 64 px) and prints the table and each decoder's known-region PSNR.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))
import eval as eval_script  # noqa: E402  (scripts/eval.py)
from ldm.cli import at_least, multiple_of_8  # noqa: E402
from ldm.modules.losses import trunk_weights_path  # noqa: E402

RUNS = {  # run name -> (table label, config files over configs/base.yaml)
    "demo_asym": ("asymmetric", ["configs/demo.yaml"]),
    "demo_vanilla": ("vanilla", ["configs/demo.yaml", "configs/ablations/no_condition.yaml"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps of each run (default: configs/demo.yaml's trainer.max_steps)")
    p.add_argument("--out", default=None, help="eval output folder (default: <log-dir>/compare_condition)")
    p.add_argument("--log-dir", default="logs", help="where the two run folders go (run.log_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs, e.g. data.resolution=32 (repeat)")
    p.add_argument("--resolution", type=multiple_of_8, default=64, help="eval resolution (the demo trains at 64 px)")
    p.add_argument("--masks", default="medium", help="eval mask preset or folder")
    p.add_argument("--num-images", type=at_least(1), default=None, help="eval images (default: all sample images)")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing last checkpoints")
    return p.parse_args(argv)


def train(name, configs, args) -> int:
    """One train.py run in a subprocess (its own Lightning state); returns its exit code."""
    cmd = [sys.executable, str(ROOT / "train.py"), *[a for c in configs for a in ("-c", c)], "--name", name,
           f"run.log_dir={args.log_dir}", "run.overwrite=true", *args.set]
    if args.steps is not None:
        cmd.append(f"trainer.max_steps={args.steps}")
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode


def checkpoint(log_dir, name) -> Path:
    path = Path(log_dir) / name / "checkpoints" / "last.ckpt"
    return path if path.is_absolute() else ROOT / path


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.skip_train:
        for name, (_, configs) in RUNS.items():
            code = train(name, configs, args)
            if code:
                print(f"compare_condition: training {name} failed (exit code {code})", file=sys.stderr)
                return code
    out = Path(args.out or Path(args.log_dir) / "compare_condition")
    pretrained = os.path.isfile(trunk_weights_path("vgg"))  # the demo itself trains with an untrained VGG
    eval_args = [a for name, (label, _) in RUNS.items()
                 for a in ("--decoder", str(checkpoint(args.log_dir, name)), "--name", label)]
    eval_args += ["--data", "sample", "--masks", args.masks, "--resolution", str(args.resolution), "--seed", "0",
                  "--out", str(out), "--workers", "0",
                  "--lpips-pretrained" if pretrained else "--no-lpips-pretrained"]
    if args.num_images:
        eval_args += ["--num-images", str(args.num_images)]
    code = eval_script.main(eval_args)  # prints results.md
    if code:
        return code
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for label, outputs in metrics.items():
        psnr = outputs["raw"]["all"]["psnr_known"]
        print(f"{label}: known-region PSNR (pasted=raw): {'n/a' if psnr is None else f'{psnr:.2f}'} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
