"""scripts/ablate.py and ldm/evaluation/ablation.py: variants resolved and refused before training, run folders skipped,
resumed or refused, SLURM submission lines, and a three-variant ablation end to end (killed and re-run)."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.evaluation.ablation import Plan, Variant, delta, load_set, parse_variant, prepare, progress, resolve, split_items
from ldm.training.config import ConfigError
from probe_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
SETS = sorted((ROOT / "configs" / "ablations" / "sets").glob("*.yaml"))
# tests/test_train.py's TINY at 32 px, without the keys the ablation sets itself
TINY = [
    "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
    "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1",
    "perceptual.pretrained=false", "discriminator.ndf=8", "discriminator.n_layers=2",
    "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_size=2",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=1", "optim.warmup_steps=1", "optim.base_lr=1e-4",
]


ablate = load_script("ablate")


def no_training(*args, **kwargs):
    raise AssertionError(f"nothing may run here: {args[0] if args else kwargs}")


# ---- variants and sets (no training) -------------------------------------------------------------------
def test_variant_specs_items_and_layer_order():
    assert split_items("no_gan, data.masks.mix={thick: 1.0, medium: 0.0},x=[1,2]") == [
        "no_gan", "data.masks.mix={thick: 1.0, medium: 0.0}", "x=[1,2]"]
    assert parse_variant("no_gan") == Variant("no_gan", ["no_gan"])
    assert parse_variant("configs/ablations/l2.yaml") == Variant("l2", ["configs/ablations/l2.yaml"])
    assert parse_variant("asym=") == Variant("asym", [])
    assert parse_variant("wide=model.autoencoder.ch=64,no_gan") == Variant("wide", ["model.autoencoder.ch=64", "no_gan"])
    # a base override and a variant's ablation file on the same key: the variant's wins (layers: base, then variant)
    plan = Plan("t", ["configs/demo.yaml", "loss.disc_weight=0.5"],
                [Variant("asym", []), parse_variant("no_gan"), parse_variant("both=no_gan,loss.disc_weight=0.25")], [])
    base, configs = resolve(plan)
    assert base.loss.disc_weight == 0.5 and configs["no_gan"].loss.disc_weight == 0.0
    assert configs["both"].loss.disc_weight == 0.25  # the variant's override after its file
    assert [delta(base, configs[n]) for n in configs] == [[], ["loss.disc_weight=0.0"], ["loss.disc_weight=0.25"]]
    assert plan.out == Path("logs") / "ablate_t" and configs["asym"].run.log_dir == str(plan.out)


@pytest.mark.parametrize("path", SETS, ids=[p.name for p in SETS])
def test_every_set_file_resolves(path):
    chosen = load_set(path)
    plan = Plan(chosen["name"], chosen["base"], chosen["variants"], chosen["eval_args"])
    base, configs = resolve(plan)
    deltas = [delta(base, cfg) for cfg in configs.values()]
    assert len(set(map(tuple, deltas))) == len(deltas), deltas  # no two variants are the same recipe
    ablate.eval_script.parse_args(ablate.eval_argv(plan, base, configs))  # its eval flags are eval.py's


def test_condition_set_is_the_documented_comparison():
    chosen = load_set(ROOT / "configs" / "ablations" / "sets" / "condition.yaml")
    plan = Plan(chosen["name"], chosen["base"], chosen["variants"], chosen["eval_args"])
    base, configs = resolve(plan)
    assert {n: delta(base, c) for n, c in configs.items()} == {
        "asymmetric": [], "vanilla": ["model.autoencoder.use_condition=false"]}
    args = ablate.eval_script.parse_args(ablate.eval_argv(plan, base, configs))
    assert (args.data, args.masks, args.resolution, args.seed, args.lpips_pretrained) == ("sample", "medium", 64, 0, False)
    assert args.decoder == [str(Path("logs/ablate_condition") / n / "checkpoints" / "last.ckpt") for n in configs]


@pytest.mark.parametrize("bad, named", [
    ("bad=loss.no_such_key=1", "variant 'bad': overrides: unknown config key 'loss.no_such_key'"),
    ("bad=no_such_ablation", "variant 'bad': no ablation 'no_such_ablation'"),
    ("bad=loss.disc_weight=abc", "variant 'bad': overrides: config key 'loss.disc_weight' expects float"),
    ("report=", "variant name 'report'"),
])
def test_an_invalid_variant_is_refused_before_anything_is_written_or_trained(bad, named, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate.subprocess, "run", no_training)
    out = tmp_path / "ablation"
    argv = ["-c", "configs/demo.yaml", "--variant", "good=", "--variant", "no_gan", "--variant", bad, "--out", str(out)]
    assert ablate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # not even the valid variants' configs


def test_a_bad_eval_flag_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate.subprocess, "run", no_training)
    with pytest.raises(SystemExit) as stop:
        ablate.main(["--variant", "a=", "--out", str(tmp_path / "x"), "--eval", "--masks medium --resolution big"])
    assert stop.value.code == 2 and "--resolution" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # eval's flags that ablate.py sets itself
        ablate.main(["--variant", "a=", "--out", str(tmp_path / "x"), "--eval=--name=b"])
    assert stop.value.code == 2 and "--name is set by ablate.py" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- run folders: finished, changed (no training) ------------------------------------------------------
def fake_checkpoint(run_dir: Path, step: int) -> None:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, run_dir / "checkpoints" / "last.ckpt")


def test_a_changed_variant_is_refused_unless_asked(tmp_path):
    def plan(*items):
        return Plan("t", ["trainer.max_steps=4"], [Variant("keep", []), Variant("v", list(items))], [], tmp_path)

    _, configs = resolve(plan("loss.disc_weight=0.5"))
    assert prepare(plan("loss.disc_weight=0.5"), configs) == {"keep": 0, "v": 0}
    assert OmegaConf.load(tmp_path / "v" / "config.yaml").loss.disc_weight == 0.5
    _, configs = resolve(plan("loss.disc_weight=0.25"))
    prepare(plan("loss.disc_weight=0.25"), configs)  # no checkpoint yet: nothing trained, the config is replaced
    fake_checkpoint(tmp_path / "v", 2)
    fake_checkpoint(tmp_path / "keep", 4)
    _, configs = resolve(plan("loss.disc_weight=0.0"))
    with pytest.raises(ConfigError, match=r"variant 'v' has changed since its run .* \(loss.disc_weight: 0.25 -> 0.0\); "
                                          r"pass --changed resume"):
        prepare(plan("loss.disc_weight=0.0"), configs)
    assert OmegaConf.load(tmp_path / "v" / "config.yaml").loss.disc_weight == 0.25  # refused: nothing written
    assert prepare(plan("loss.disc_weight=0.0"), configs, "resume") == {"keep": 4, "v": 2}  # train.py continues it
    assert OmegaConf.load(tmp_path / "v" / "config.yaml").loss.disc_weight == 0.0
    _, configs = resolve(plan("loss.disc_weight=0.125"))
    assert prepare(plan("loss.disc_weight=0.125"), configs, "restart") == {"keep": 4, "v": 0}
    assert not (tmp_path / "v" / "checkpoints").exists() and progress(tmp_path / "keep") == 4


def test_report_only_refuses_unfinished_variants(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate.subprocess, "run", no_training)
    argv = ["--variant", "a=", "--variant", "no_gan", "trainer.max_steps=4", "--out", str(tmp_path)]
    fake_checkpoint(tmp_path / "a", 4)
    fake_checkpoint(tmp_path / "no_gan", 3)
    assert ablate.main([*argv, "--report-only"]) == 2
    assert "not finished, nothing evaluated: no_gan (step 3 of 4)" in capsys.readouterr().err


def test_slurm_submits_a_job_per_unfinished_variant_then_the_report_after_them(tmp_path, monkeypatch, capsys):
    calls, ids = [], iter(range(101, 200))

    def fake_sbatch(cmd, **kwargs):
        if cmd[0] == "squeue":  # job 102 (l2's) is still running at the second submission
            state = "RUNNING" if cmd[cmd.index("--jobs") + 1] == "102" else ""
            return subprocess.CompletedProcess(cmd, 0, stdout=state + "\n", stderr="")
        assert cmd[:2] == ["sbatch", "--parsable"], cmd
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{next(ids)}\n", stderr="")

    script = tmp_path / "train.sbatch"
    script.write_text("#!/bin/bash\n")
    monkeypatch.setattr(ablate, "SBATCH", script)
    monkeypatch.setattr(ablate.subprocess, "run", fake_sbatch)
    out = tmp_path / "abl"
    fake_checkpoint(out / "done", 4)  # finished: not submitted
    argv = ["--variant", "done=", "--variant", "no_gan", "--variant", "l2", "trainer.max_steps=4", "--out", str(out),
            "--slurm", "--sbatch=--nodes=2 --gpus-per-node=8", "--sbatch-report=--gpus=1", "--eval", "--masks thin"]
    assert ablate.main(argv) == 0
    no_gan, l2, report = calls
    assert no_gan[2:] == ["--job-name=ablation.no_gan", f"--output={out}/no_gan/slurm-%j.out", "--nodes=2",
                          "--gpus-per-node=8", str(script), "-c", str(out / "no_gan" / "config.yaml"),
                          "--name", "no_gan", f"run.log_dir={out}"]
    assert l2[-5:-3] == ["-c", str(out / "l2" / "config.yaml")]
    assert report[2:5] == ["--dependency=afterany:101:102", "--job-name=ablation.report", f"--output={out}/report-%j.out"]
    assert report[5:7] == ["--gpus=1", "--wrap"]
    wrapped = report[7].split()
    assert wrapped[:2] == [sys.executable, str(ROOT / "scripts" / "ablate.py")] and wrapped[-1] == "--report-only"
    assert "--slurm" not in wrapped and not any(a.startswith("--sbatch") for a in wrapped)
    assert wrapped[wrapped.index("--eval") + 1:][:2] == ["'--masks", "thin'"]  # shlex-quoted, as given
    for name in ("no_gan", "l2"):  # written before submission: what the job trains
        assert OmegaConf.load(out / name / "config.yaml").run.log_dir == str(out)
    assert "report job 103 (after 101, 102)" in capsys.readouterr().out
    calls.clear()  # again: no_gan's job 101 has left the queue unfinished, l2's is still running
    assert ablate.main(argv) == 0
    assert [c[2] for c in calls] == ["--job-name=ablation.no_gan", "--dependency=afterany:104:102"]
    assert "l2: already in the queue as job 102" in capsys.readouterr().out


# ---- end to end ----------------------------------------------------------------------------------------
def run_ablate(out, *extra, check=True, **popen):
    cmd = [sys.executable, str(ROOT / "scripts" / "ablate.py"), "-c", "configs/demo.yaml", *TINY, *STEPS,
           "--variant", "asymmetric=", "--variant", "no_condition", "--variant", "no_gan", "--out", str(out),
           *EVAL, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"ablate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def ablate_here(out, *extra):
    """run_ablate in this process (ablate.main; its train.py runs are processes as ever): one start-up of torch and
    Lightning fewer. Returns what it printed, as a CompletedProcess."""
    import contextlib
    import io
    argv = ["-c", "configs/demo.yaml", *TINY, *STEPS, "--variant", "asymmetric=", "--variant", "no_condition",
            "--variant", "no_gan", "--out", str(out), *EVAL, *extra]
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(ROOT)  # the config paths are relative to the repository, as run_ablate's
    try:
        with contextlib.redirect_stdout(printed):
            code = ablate.main(argv)
    finally:
        os.chdir(cwd)
    assert code == 0, printed.getvalue()[-3000:]
    return subprocess.CompletedProcess(argv, code, printed.getvalue(), "")


# the GAN on from step 3: no_gan differs
STEPS = ["trainer.max_steps=6", "run.checkpoint_every_n_steps=2", "trainer.val_check_interval=6",
         "loss.disc_start=2", "data.epoch_length=6"]  # passes of 3 batches: the kill at step 2 is mid-pass
EVAL = ["--eval", "--num-images 3 --batch-size 3 --grid-images 2 --masks medium"]


def table(out):
    with open(out / "report" / "ablation.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_three_variants_end_to_end_killed_in_the_second_and_rerun(tmp_path):
    """Three 6-step trainings, one killed at its step-2 checkpoint and resumed, the evaluation: the table an
    uninterrupted ablation writes, number for number; then the same command again: nothing trains, the same
    table."""
    out = tmp_path / "abl"
    proc = run_ablate(out, start_new_session=True)
    second = out / "no_condition" / "checkpoints" / "step00000002.ckpt"
    deadline = time.time() + 600
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # ablate.py and the train.py it runs, without warning
    proc.wait()
    first_ckpt = out / "asymmetric" / "checkpoints" / "last.ckpt"
    assert progress(out / "asymmetric") == 6 and 2 <= progress(out / "no_condition") < 6
    assert not (out / "no_gan" / "checkpoints").exists() and not (out / "report").exists()
    stamp = first_ckpt.stat().st_mtime_ns

    rerun = ablate_here(out)
    assert "asymmetric: finished (step 6), skipped" in rerun.stdout
    assert "no_condition: resuming at step 2 to step 6" in rerun.stdout and "no_gan: training to step 6" in rerun.stdout
    assert first_ckpt.stat().st_mtime_ns == stamp  # not trained again
    rows = table(out)
    outputs = list(dict.fromkeys(r["output"] for r in rows))
    assert outputs[:2] == ["raw", "pasted"]  # and whatever other outputs eval reports
    assert [r["variant"] for r in rows] == [v for v in ("asymmetric", "no_condition", "no_gan") for _ in outputs]
    deltas = {r["variant"]: r["delta"] for r in rows}
    assert deltas == {"asymmetric": "(base)", "no_condition": "model.autoencoder.use_condition=false",
                      "no_gan": "loss.disc_weight=0.0"}
    for row in rows:
        assert float(row["n"]) == 3 and float(row["psnr_known"]) > 0 and 0 <= float(row["lpips_whole"]) < 1, row
    raw = {r["variant"]: r for r in rows if r["output"] == "raw"}
    assert len({raw[v]["psnr_whole"] for v in raw}) == 3  # three different decoders
    md = (out / "report" / "ablation.md").read_text()
    assert "| no_gan | loss.disc_weight=0.0 | raw |" in md and "PSNR known" in md
    assert (out / "report" / "grid.png").is_file() and (out / "report" / "results.md").is_file()

    again = ablate_here(out)  # everything finished: nothing trains, the same table
    assert again.stdout.count("), skipped") == 3 and table(out) == rows
    for name in ("asymmetric", "no_gan"):  # trained without a kill: taken as finished, only no_condition trains
        shutil.copytree(out / name, tmp_path / "uninterrupted" / name)
    assert ablate_here(tmp_path / "uninterrupted").stdout.count("), skipped") == 2
    assert table(tmp_path / "uninterrupted") == rows  # the resumed pass continued where the kill stopped it


def test_a_signal_to_ablate_reaches_the_variant_in_training():
    """SIGTERM to ablate.py goes on to its train.py (which saves its step and exits) instead of orphaning it."""
    child = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\ntime.sleep(60)"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.time()
    assert ablate.run_forwarding_signals([sys.executable, "-c", child]) == 7
    assert time.time() - started < 30 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
