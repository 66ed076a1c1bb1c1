"""Runs that survive faults: atomic checkpoints, kill/preemption + resume, NaN steps, clear config errors."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train  # the command line's exit codes (test_config_errors_...)
from ldm import AsymmetricAutoencoderKL
from ldm.training.checkpointing import AtomicCheckpointIO, atomic_save, newest_readable_checkpoint
from ldm.training.config import ConfigError, load_config
from ldm.training.run import build_loggers, resolve_resume
from fault_probe import SignalSelf
from test_train import ROOT, TINY, run_here

NO_VAL = ["trainer.val_check_interval=1000"]  # these tests are about steps and checkpoints, not validation


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def step_files(ckpt_dir: Path) -> list:
    return sorted(p.name for p in ckpt_dir.glob("step*.ckpt"))


def start_train(tmp_path, *overrides, name="run", script="train.py", new_session=False):
    cmd = [sys.executable, str(ROOT / script), *TINY, f"run.log_dir={tmp_path}", *overrides, "--name", name]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)  # its own process group, led by train.py


def wait_for(path: Path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"train.py ended early:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---------------------------------------------------------------- atomic writes, choosing the checkpoint
def test_atomic_save_leaves_the_old_file_when_killed_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    replaced = []
    real_replace, real_save = os.replace, torch.save
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append(Path(src).parent) or real_replace(src, dst))

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # as a signal arriving mid-write
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert step_of(path) == 1 and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    atomic_save({"global_step": 3}, path)
    assert step_of(path) == 3 and replaced == [path.parent]  # staged beside the target: a rename, never a copy


def test_a_resumed_run_continues_metrics_csv(tmp_path):
    """ResumableCSVLogger (train.py): a second logger on the run folder, as after a resume or SLURM requeue, appends
    to metrics.csv and keeps its columns; Lightning's CSVLogger deletes the file (the earlier steps' metrics)."""
    from ldm.training.checkpointing import ResumableCSVLogger
    for steps, metrics in ((range(0, 3), {"train/loss": 1.0}), (range(3, 5), {"train/loss": 2.0, "val/l1": 0.5})):
        logger = ResumableCSVLogger(save_dir=str(tmp_path), name="run", version="")
        for step in steps:
            logger.log_metrics(metrics, step=step)
        logger.finalize("success")
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [r["val/l1"] for r in rows] == ["", "", "", "0.5", "0.5"] and rows[0]["train/loss"] == "1.0"


def _fake_run(tmp_path, steps):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for name, step in steps.items():
        torch.save({"global_step": step, "state_dict": {"w": torch.zeros(1000)}}, ckpt_dir / name)
    return ckpt_dir


def test_resume_auto_skips_a_truncated_last_checkpoint(tmp_path, capsys):
    ckpt_dir = _fake_run(tmp_path, {"step00000002.ckpt": 2, "step00000004.ckpt": 4, "last.ckpt": 5})
    (ckpt_dir / ".last.ckpt.abc.tmp").write_bytes(b"partial")
    assert resolve_resume("auto", tmp_path / "run") == str(ckpt_dir / "last.ckpt")
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as a non-atomic save killed mid-write
    assert resolve_resume("auto", tmp_path / "run") == str(ckpt_dir / "step00000004.ckpt")
    err = capsys.readouterr().err
    assert f"skipping unreadable checkpoint {last}" in err and f"resuming from {ckpt_dir / 'step00000004.ckpt'}" in err
    assert not (ckpt_dir / ".last.ckpt.abc.tmp").exists()


def test_resume_auto_prefers_the_highest_step_and_refuses_when_none_is_readable(tmp_path):
    # killed between the step save and the last.ckpt save: the step checkpoint is newer
    ckpt_dir = _fake_run(tmp_path, {"step00000004.ckpt": 4, "step00000006.ckpt": 6, "last.ckpt": 4})
    assert resolve_resume("auto", tmp_path / "run") == str(ckpt_dir / "step00000006.ckpt")
    for p in ckpt_dir.iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        resolve_resume("auto", tmp_path / "run")


# ---------------------------------------------------------------- kill, preemption, resume (end to end)
def test_sigkill_then_resume_auto_ends_at_the_uninterrupted_step(tmp_path):
    args = ["trainer.max_steps=8", "run.checkpoint_every_n_steps=2", "run.keep_last_k=2", *NO_VAL]
    proc = start_train(tmp_path, *args, "+min_step_seconds=0.3", script="tests/fault_probe.py")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    wait_for(ckpt_dir / "last.ckpt", proc)  # written after step00000002.ckpt
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    newest, unreadable = newest_readable_checkpoint(ckpt_dir)
    assert not unreadable and 2 <= step_of(newest) < 8
    resumed = run_here(tmp_path, *args, resume="auto")
    assert f"resuming from {newest}" in resumed.stderr
    assert step_of(ckpt_dir / "last.ckpt") == 8  # where the uninterrupted run ends
    assert step_files(ckpt_dir) == ["step00000006.ckpt", "step00000008.ckpt"]  # keep_last_k, old run's pruned


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    proc = start_train(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=2", *NO_VAL)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    wait_for(ckpt_dir / "step00000002.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = step_of(ckpt_dir / "last.ckpt")
    assert f"SIGTERM: last checkpoint {ckpt_dir / 'last.ckpt'} at step {saved}; stopping" in out + err
    newest_periodic = max(int(name[4:12]) for name in step_files(ckpt_dir))
    assert newest_periodic <= saved < 400


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_to_the_whole_process_group_spares_the_loader_workers(tmp_path, name):
    """As SLURM signals every process of a job step (`kill -- -PGID` a group, a terminal's Ctrl-C its foreground
    group): with loader workers the run still saves last.ckpt at the current step and exits 0 (the workers ignore
    the signal; before, a worker died of it and the run with 'DataLoader worker (pid N) is killed by signal',
    exit 1, last.ckpt left behind; Ctrl-C ended in KeyboardInterrupt tracebacks, exit 1, nothing saved)."""
    proc = start_train(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=2", "data.num_workers=1",
                       *NO_VAL, new_session=True)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    wait_for(ckpt_dir / "step00000002.ckpt", proc)
    os.killpg(proc.pid, getattr(signal, name))  # train.py and its worker
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = step_of(ckpt_dir / "last.ckpt")
    assert f"{name}: last checkpoint {ckpt_dir / 'last.ckpt'} at step {saved}; stopping" in out + err
    assert 2 <= saved < 400 and "killed by signal" not in err and "Traceback" not in err
    if name == "SIGINT":
        assert "SIGINT: saving last.ckpt at the end of this step, then stopping (Ctrl-C again: stop at once" in err


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for a save at the step's end; the second raises KeyboardInterrupt (Lightning then
    shuts down, exit 1); the handlers in place before training are back afterwards."""
    from ldm.training.checkpointing import RunCheckpoint
    callback, before = RunCheckpoint(dirpath="unused"), signal.getsignal(signal.SIGINT)
    callback.on_train_start(type("Trainer", (), {"is_global_zero": False})(), None)  # installs the handlers
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C stopped the run at once, unsaved")
        assert callback.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback._restore_handlers()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigusr1_saves_between_periodic_checkpoints(tmp_path):
    proc = run_here(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=2", *NO_VAL,
                    callbacks=[SignalSelf(signal.SIGUSR1, 3)])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert step_of(ckpt_dir / "last.ckpt") == 3 and step_files(ckpt_dir) == ["step00000002.ckpt"]
    assert "SIGUSR1: last checkpoint" in proc.stdout + proc.stderr
    assert not list((tmp_path / "run").glob("samples/*.png"))  # no validation on the way out


def test_a_signal_mid_accumulation_saves_once_the_cycle_has_stepped(tmp_path):
    """optim.accumulate_grad_batches=2: a signal after micro-batch 6 (step 3 done, micro-batch 7 to come) saves
    at step 4, once micro-batch 7 has stepped; a save at step 3 would resume without micro-batch 6's gradients."""
    proc = run_here(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=100",
                    "optim.accumulate_grad_batches=2", *NO_VAL, callbacks=[SignalSelf(signal.SIGUSR1, 6, micro_batch=True)])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert step_of(ckpt_dir / "last.ckpt") == 4
    assert "at step 4; stopping" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- non-finite losses
@pytest.mark.parametrize("fused", [True, False])
def test_nan_steps_are_skipped_and_a_run_of_them_stops_training(tmp_path, fused, monkeypatch):
    """Fused Adam (the default) skips a non-finite step on the device (found_inf), without a host sync: the step
    counts, its weights and Adam state stay. Unfused Adam: the host checks first and skips the step itself."""
    from fault_probe import inject_nan
    from ldm.models.asym_decoder import AsymmetricDecoderTraining
    monkeypatch.setattr(AsymmetricDecoderTraining, "recon_terms", AsymmetricDecoderTraining.recon_terms)  # restored
    inject_nan({1, 3, 4})  # the LPIPS term NaN at those batches
    proc = run_here(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=1", "run.max_nonfinite_steps=2",
                    "run.keep_last_k=5", "trainer.log_every_n_steps=1", f"optim.fused={fused}", *NO_VAL, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: loss term 'lpips' was non-finite for 2 consecutive steps (3 skipped in all)")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    if fused:  # batches 0-3 counted; the checkpoint after batch 3 (NaN) holds batch 2's weights and Adam state
        assert ckpt["global_step"] == 4 and ckpt["skipped_nonfinite"] == 2
        good = torch.load(ckpt_dir / "step00000003.ckpt", map_location="cpu", weights_only=False)
        assert good["skipped_nonfinite"] == 1
        live = "current_model_state"  # EMA on: state_dict holds the average, which moves every counted step
        assert good[live].keys() == ckpt[live].keys()
        for key, value in good[live].items():
            assert torch.equal(ckpt[live][key], value), key
        for new_opt, old_opt in zip(ckpt["optimizer_states"], good["optimizer_states"]):
            for i, state in old_opt["state"].items():
                assert torch.equal(new_opt["state"][i]["step"], state["step"])
                assert torch.equal(new_opt["state"][i]["exp_avg"], state["exp_avg"])
    else:
        assert ckpt["global_step"] == 2  # batches 0 and 2 stepped; batch 1 was skipped
        assert ckpt["skipped_nonfinite"] == 1  # saved at step 2, after the one isolated NaN
    with open(tmp_path / "run" / "metrics.csv") as f:
        skipped = [float(r["train/skipped_nonfinite"]) for r in csv.DictReader(f) if r.get("train/skipped_nonfinite")]
    assert skipped[:3] == [0.0, 1.0, 1.0] and max(skipped) >= 2


# ---------------------------------------------------------------- config and file errors: one line, exit 2
@pytest.fixture
def mismatched_vae(tmp_path):
    """A full-model checkpoint whose encoder is wider than TINY's."""
    vae = AsymmetricAutoencoderKL(ch=32, num_res_blocks=1, encoder_ch=64, encoder_num_res_blocks=1)
    path = tmp_path / "wide_encoder.ckpt"
    torch.save({"state_dict": vae.state_dict()}, path)
    return path


@pytest.mark.parametrize("overrides,message", [
    (["model.vae_ckpt=/nowhere/kl-f8.ckpt"],
     "error: model.vae_ckpt: file not found: /nowhere/kl-f8.ckpt (checkpoints/README.md"),
    (["data.source=/nowhere/images"], "error: data.source: image source '/nowhere/images'"),
    (["--resume", "/nowhere/last.ckpt"], "error: --resume: checkpoint not found: /nowhere/last.ckpt"),
    (["optim.base_lr=fast"], "error: command line: config key 'optim.base_lr' expects float"),
    (["perceptual.pretrained=true"], "error: perceptual: LPIPS(vgg) needs the ImageNet weights file vgg16"),
    (["model.vae_ckpt={vae}"], "error: model.vae_ckpt: {vae}: does not fit the model"),
    (["optim.grad_clip=1.0", "trainer.precision=16-mixed"], "error: optim.grad_clip: clipping does not work"),
], ids=["vae_ckpt", "data_source", "resume_path", "wrong_type", "lpips_weights", "width_mismatch", "clip_fp16"])
def test_config_errors_are_one_line_naming_key_or_file(tmp_path, monkeypatch, capsys, mismatched_vae,
                                                       overrides, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS weights there
    overrides = [o.format(vae=mismatched_vae) for o in overrides]
    message = message.format(vae=mismatched_vae)
    code = train.main([*TINY, f"run.log_dir={tmp_path}", *overrides, "--name", "run"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(message), errors
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


def test_wandb_without_a_key_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(ROOT / "configs" / "base.yaml", [], ["run.logger=wandb"])
    wandb_logger = build_loggers(cfg, tmp_path / "run", "run")[1]
    assert wandb_logger._offline
