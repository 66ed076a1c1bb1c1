"""scripts/ablate.py --slurm on a real one-node SLURM (tests/slurm_cluster.py): a job per variant through
scripts/slurm/train.sbatch, and the report job after them all."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slurm_cluster", reason="tests/slurm_cluster.py (the SLURM tier) is not on this branch")

from test_ablate import TINY  # noqa: E402  (tests/ is on sys.path, as for slurm_cluster)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def test_ablation_on_slurm_reports_once_every_variant_job_has_finished(slurm_cluster, tmp_path):
    out = tmp_path / "abl"
    env = {**slurm_cluster.env, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm_cluster.env.get('PATH', os.environ['PATH'])}"}
    cmd = [sys.executable, str(ROOT / "scripts" / "ablate.py"), "-c", "configs/demo.yaml", *TINY,
           "trainer.max_steps=2", "trainer.val_check_interval=2", "run.checkpoint_every_n_steps=2",
           "data.epoch_length=4", "--variant", "asymmetric=", "--variant", "no_condition", "--variant", "no_gan",
           "--out", str(out), "--slurm", "--sbatch=--ntasks-per-node=1 --cpus-per-task=1",
           "--eval", "--num-images 2 --batch-size 2 --grid-images 1 --masks medium --device cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(re.findall(r"ablate: (\w+): submitted job (\d+)", proc.stdout))
    assert list(jobs) == ["asymmetric", "no_condition", "no_gan"], proc.stdout
    report = int(re.search(r"report job (\d+) \(after ([\d, ]+)\)", proc.stdout).group(1))
    assert not (out / "report").exists()  # submitted, not yet run
    assert slurm_cluster.wait(report, timeout=1200) == "COMPLETED", (out / f"report-{report}.out").read_text()[-3000:]
    for name, job in jobs.items():
        assert slurm_cluster.wait(int(job), timeout=60) == "COMPLETED", name
    table = out / "report" / "ablation.csv"
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["variant"] for r in rows}) == ["asymmetric", "no_condition", "no_gan"]
    newest_checkpoint = max((out / n / "checkpoints" / "last.ckpt").stat().st_mtime for n in jobs)
    assert table.stat().st_mtime > newest_checkpoint  # written after every variant had finished
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not submitted") == 3, again.stdout  # only a report job
    second = int(re.search(r"report job (\d+) \(after nothing\)", again.stdout).group(1))
    assert slurm_cluster.wait(second, timeout=600) == "COMPLETED"
