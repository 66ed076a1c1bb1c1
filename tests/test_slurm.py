"""The `slurm` tier: scripts/slurm/train.sbatch on a real one-node SLURM (tests/slurm_cluster.py), CPU, gloo.

Two tasks on one node (`--ntasks-per-node=2`) stand for the GPUs of a node: train.py takes devices and nodes
from the allocation. tests/slurm_probe.py records every step each rank trains (with SLURM's restart count).
"""
import csv
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import ROOT, TINY

pytestmark = pytest.mark.slurm
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
ARGS = [a for a in TINY if not a.startswith("trainer.devices=")] + ["trainer.devices=auto"]  # (demo.yaml: 1)
NO_VAL = ["trainer.val_check_interval=1000", "trainer.log_every_n_steps=1"]


def submit(cluster, tmp_path, *train_args, tasks=2):
    """Submit the sbatch script as a user would (plus the probe); returns the job id."""
    export = f"--export=ALL,PYTHON={sys.executable},TRAIN_SCRIPT={ROOT / 'tests' / 'slurm_probe.py'}"
    return cluster.sbatch("--nodes=1", f"--ntasks-per-node={tasks}", f"--output={tmp_path / 'job.out'}", export,
                          SBATCH, *ARGS, f"run.log_dir={tmp_path}", *train_args, f"+probe={tmp_path / 'probe'}",
                          "--name", "run", cwd=ROOT)


def steps(tmp_path, rank=0) -> list:
    """[(restart count, step)] that rank trained, in order."""
    path = tmp_path / f"probe-rank{rank}.txt"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def job_log(tmp_path, job) -> str:
    return (tmp_path / "job.out").read_text() + (tmp_path / "run" / f"slurm-{job}.log").read_text()


def wait_for_step(cluster, job, tmp_path, step, timeout=240):
    """Until rank 0 has trained `step` steps in this run."""
    deadline = time.monotonic() + timeout
    while not steps(tmp_path) or steps(tmp_path)[-1][1] < step:
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING"), f"{cluster.job(job)}\n{cluster.logs()}\n{job_log(tmp_path, job)[-2000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached: {job_log(tmp_path, job)[-3000:]}"
        time.sleep(0.2)


def wait_requeued(cluster, job, restarts, timeout=120):
    """Until the job is pending again with `restarts` restarts; then start it at once."""
    deadline = time.monotonic() + timeout
    while not (cluster.state(job) == "PENDING" and cluster.job(job)["Restarts"] == str(restarts)):
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.5)
    cluster.start_now(job)


def test_sbatch_trains_two_ddp_ranks_to_the_last_step_in_one_run_folder(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, tmp_path, "trainer.max_steps=4", "run.checkpoint_every_n_steps=2",
                 "loss.disc_start=2", *NO_VAL)  # the GAN switches on mid-run
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", job_log(tmp_path, job)[-3000:]
    log = job_log(tmp_path, job)
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # two processes, from --ntasks-per-node=2
    for rank in (0, 1):
        assert [s for _, s in steps(tmp_path, rank)] == [1, 2, 3, 4]
    decoders = [torch.load(tmp_path / f"probe-decoder{r}.pt") for r in (0, 1)]
    assert all(torch.equal(decoders[0][k], decoders[1][k]) for k in decoders[0])
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "curves.png", "metrics.csv",
                                                     f"slurm-{job}.log"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step00000002.ckpt",
                                                                      "step00000004.ckpt"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 4
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][1]["state"], "the discriminator trained after loss.disc_start"


def test_a_warned_job_saves_requeues_and_resumes_and_a_killed_one_resumes_from_its_checkpoint(slurm_cluster,
                                                                                              tmp_path):
    """The warning SLURM sends before a time limit (--signal=B:USR1@120, here sent at once as SLURM does, to the
    batch shell): the ranks save at the current step, the job requeues itself (restart 1), resumes there and ends
    at the uninterrupted run's final step with no step trained twice. Then a kill without warning (SIGKILL to
    the training processes, as a node that dies; requeued by hand): the next run resumes from the newest periodic
    checkpoint. Then `scancel` (SIGTERM to the tasks, SIGKILL KillWait seconds later; requeued by hand): the ranks
    save at the current step and the next run resumes there."""
    job = submit(slurm_cluster, tmp_path, "trainer.max_steps=16", "run.checkpoint_every_n_steps=4",
                 "+min_step_seconds=0.5", *NO_VAL)
    wait_for_step(slurm_cluster, job, tmp_path, 3)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    wait_requeued(slurm_cluster, job, restarts=1)
    first = [s for r, s in steps(tmp_path) if r == 0]
    saved = int(re.search(r"SIGUSR1: last checkpoint \S+ at step (\d+)", job_log(tmp_path, job)).group(1))
    assert first == list(range(1, saved + 1)) and 3 <= saved < 9  # saved at the step it had reached

    wait_for_step(slurm_cluster, job, tmp_path, 9)  # past the periodic checkpoint of step 8
    ckpts = tmp_path / "run" / "checkpoints"
    for rank in (0, 1):  # as a node that dies: no signal to save on (scancel sends SIGTERM before SIGKILL)
        os.kill(int((tmp_path / f"probe-pid{rank}").read_text()), signal.SIGKILL)
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"  # and not requeued by the script: no warning came
    periodic = max(ckpt_step(p) for p in ckpts.glob("step*.ckpt"))
    killed_at = steps(tmp_path)[-1][1]
    slurm_cluster.run("scontrol", "requeue", str(job))
    wait_requeued(slurm_cluster, job, restarts=2)

    wait_for_step(slurm_cluster, job, tmp_path, periodic + 2)  # saved at 10 or 11: not a periodic one
    slurm_cluster.run("scancel", str(job))
    assert slurm_cluster.wait(job, timeout=60) == "CANCELLED"
    cancelled_at = steps(tmp_path)[-1][1]
    assert ckpt_step(ckpts / "last.ckpt") == cancelled_at and cancelled_at % 4  # saved on SIGTERM
    slurm_cluster.run("scontrol", "requeue", str(job))
    wait_requeued(slurm_cluster, job, restarts=3)
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", job_log(tmp_path, job)[-3000:]

    log = job_log(tmp_path, job)
    assert log.count(f"resuming from {ckpts / 'last.ckpt'}") == 3  # rank 0 says it, each restart
    assert f"SIGTERM: last checkpoint {ckpts / 'last.ckpt'} at step {cancelled_at}" in log
    assert [s for r, s in steps(tmp_path) if r == 1] == list(range(saved + 1, killed_at + 1))
    assert [s for r, s in steps(tmp_path) if r == 2] == list(range(periodic + 1, cancelled_at + 1))  # checkpoint on
    assert [s for r, s in steps(tmp_path) if r == 3] == list(range(cancelled_at + 1, 17))  # no step lost
    assert steps(tmp_path, 1) == steps(tmp_path, 0)
    assert ckpt_step(ckpts / "last.ckpt") == 16
    with open(tmp_path / "run" / "metrics.csv") as f:  # continued over the restarts, not started again
        logged = {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert set(range(16)) <= logged, sorted(logged)


def test_a_wrong_config_fails_fast_with_its_error_and_is_not_requeued(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, tmp_path, "model.autoencoder.chh=3")
    assert slurm_cluster.wait(job, timeout=120) == "FAILED"
    out = (tmp_path / "job.out").read_text()
    assert "error: command line: unknown config key 'model.autoencoder.chh'" in out and "Traceback" not in out
    time.sleep(3)
    info = slurm_cluster.job(job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "2:0")
    assert not (tmp_path / "run").exists()
