"""The end of a run tells its result (issue 17): the summary's numbers are metrics.csv's, the curves are a PNG,
the progress bar counts steps of max_steps, and Lightning's notes that mean nothing here stay off the terminal."""
import re

from PIL import Image

from ldm.training.summary import read_metrics
from test_train import run_here, val_rows


def test_a_tiny_run_ends_with_its_summary_and_a_plot_of_its_curves(tmp_path):
    proc = run_here(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2", "run.checkpoint_every_n_steps=2",
                    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=true", "loss.disc_start=2")
    run = tmp_path / "run"
    out = proc.stdout
    assert "run done: step 4 of 4" in out, out[-3000:]
    rows = val_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 3]  # Lightning's 0-based step index: after steps 2 and 4
    for name in ("val/l1", "val/lpips_whole", "val/psnr_known", "val/psnr_hole"):
        line = re.search(rf"^  {re.escape(name)}: (\S+) after step (\d+) -> (\S+) after step (\d+)$", out, re.M)
        assert line, (name, out[-3000:])
        first, s0, last, s1 = float(line[1]), int(line[2]), float(line[3]), int(line[4])
        assert (s0, s1) == (2, 4)
        digits = 2 if "psnr" in name else 4  # printed to 4 decimals (dB: 2)
        assert abs(first - rows[0][name]) <= 0.6 * 10 ** -digits and abs(last - rows[-1][name]) <= 0.6 * 10 ** -digits
    assert rows[0]["val/l1"] != rows[-1]["val/l1"]  # first and last are two different validations
    assert f"last checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert f"newest samples:  {run / 'samples' / 'step00000004.png'}" in out
    assert f"python scripts/export.py {run / 'checkpoints' / 'last.ckpt'} --out exported/run --format diffusers" in out
    with Image.open(run / "curves.png") as plot:
        assert plot.format == "PNG" and plot.width > 300 and plot.height > 100
        plot.verify()
    assert read_metrics(run / "metrics.csv")["train/loss"]  # what the first panel draws
    bar = out.split("run done:")[0]
    assert re.search(r"step: 100%.*\| 4/4", bar) and "Epoch" not in bar, bar[-2000:]
    for noise in ("LeafSpec", "IterableDataset", "litlogger", "is not empty", "Traceback"):
        assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
