"""What a finished (or signal-stopped) run tells its user: a short summary and a PNG of its curves.

Both read only the run folder (metrics.csv, checkpoints/, samples/), so they describe any run of train.py.
"""
import csv
import math
from pathlib import Path

# the curves drawn and the validation metrics summarised, where logged (metrics.csv has a column per name)
CURVES = ("train/loss", "val/l1", "val/lpips_whole", "val/psnr_known", "val/psnr_hole")
SUMMARY_METRICS = ("val/l1", "val/lpips_whole", "val/psnr_known", "val/psnr_hole")


def read_metrics(path: Path) -> dict:
    """{metric: [(steps done, value), ...]} of metrics.csv, in step order; empty cells skipped. Lightning writes
    the 0-based index of the last step (the validation after step 20 at 19): + 1 counts steps as the checkpoint
    and sample-grid names do."""
    series = {}
    if not Path(path).is_file():
        return series
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"])) + 1
            for name, cell in row.items():
                if name not in ("step", "epoch") and cell not in ("", None):
                    series.setdefault(name, []).append((step, float(cell)))
    return {name: sorted(points) for name, points in series.items()}


def plot_curves(series: dict, out: Path) -> Path:
    """One panel per logged curve of CURVES, over steps (matplotlib, no display); returns `out`."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    names = [n for n in CURVES if series.get(n)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not names:
        axes[0][0].text(0.5, 0.5, "nothing logged yet", ha="center", va="center")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(name: str, value: float) -> str:
    return f"{value:.2f}" if "psnr" in name else f"{value:.4f}"  # dB to 0.01


def summarize(run_dir: Path, steps: int, max_steps: int, stopped_by=None) -> str:
    """The end-of-run text: steps, first and last validation metrics, where the outputs are, how to export."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.csv")
    plot = plot_curves(series, run_dir / "curves.png")
    how = f"stopped by {stopped_by} at" if stopped_by else "done:"
    lines = [f"run {how} step {steps} of {max_steps}"]
    for name in SUMMARY_METRICS:
        points = [(s, v) for s, v in series.get(name, []) if math.isfinite(v)]
        if points:
            (s0, v0), (s1, v1) = points[0], points[-1]
            lines.append(f"  {name}: {_fmt(name, v0)} after step {s0} -> {_fmt(name, v1)} after step {s1}")
    if not any(series.get(n) for n in SUMMARY_METRICS):
        lines.append("  no validation ran (trainer.val_check_interval is more than the steps run)")
    ckpts = run_dir / "checkpoints"
    last = ckpts / "last.ckpt"
    grids = sorted((run_dir / "samples").glob("step*.png"))
    lines += [f"  run folder:      {run_dir}",
              f"  metrics:         {run_dir / 'metrics.csv'} (curves: {plot})",
              f"  last checkpoint: {last if last.is_file() else 'none'}",
              f"  newest samples:  {grids[-1] if grids else 'none'}"]
    if last.is_file():
        lines.append(f"  export:          python scripts/export.py {last} --out exported/{run_dir.name} "
                     f"--format diffusers")
    return "\n".join(lines)
