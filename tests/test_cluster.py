"""ldm.training.cluster: the DDP strategy every multi-process name maps to, and devices / nodes taken from SLURM's srun."""
import subprocess
import sys
from pathlib import Path

import pytest
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from ldm.training.cluster import ddp_strategy, slurm_layout, trainer_arguments
from ldm.training.config import ConfigError

SLURM_VARS = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NAME", "SLURM_JOB_ID")


@pytest.mark.parametrize("name", ["ddp", "ddp_fork", "ddp_notebook"])
def test_every_ddp_name_tolerates_the_idle_discriminator(name):
    for several in (False, True):  # DDP of one process checks for unused parameters too
        assert ddp_strategy(name, several) == f"{name}_find_unused_parameters_true"
    assert ddp_strategy(f"{name}_find_unused_parameters_true", True) == f"{name}_find_unused_parameters_true"
    with pytest.raises(ConfigError, match=f"trainer.strategy={name}_find_unused_parameters_false: fails"):
        ddp_strategy(f"{name}_find_unused_parameters_false", True)


def test_auto_a_ddp_strategy_object_and_the_refused_strategies():
    assert ddp_strategy("auto", several=True) == "ddp_find_unused_parameters_true"
    assert ddp_strategy("auto", several=False) == "auto"
    assert ddp_strategy("single_device", several=False) == "single_device"
    given = DDPStrategy(static_graph=False)
    assert ddp_strategy(given, True) is given and given._ddp_kwargs == {"static_graph": False,
                                                                          "find_unused_parameters": True}
    with pytest.raises(ConfigError, match=r"DDPStrategy\(find_unused_parameters=False\)"):
        ddp_strategy(DDPStrategy(find_unused_parameters=False), True)
    for given in ("ddp_spawn", "ddp_spawn_find_unused_parameters_true", DDPStrategy(start_method="spawn")):
        with pytest.raises(ConfigError, match="spawned processes get the trainer pickled"):  # measured: EMA's fn
            ddp_strategy(given, True)
    for name in ("fsdp", "deepspeed_stage_2"):
        with pytest.raises(ConfigError, match=f"trainer.strategy='{name}': several processes train under DDP only"):
            ddp_strategy(name, several=True)


def test_under_srun_devices_and_nodes_come_from_the_allocation(monkeypatch):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    base = {"accelerator": "cpu", "devices": "auto", "num_nodes": 1, "strategy": "auto"}
    assert trainer_arguments(base) == ({**base, "strategy": "auto"}, [])  # not under SLURM: as given
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NAME", "train.sbatch")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    kwargs, plugins = trainer_arguments(base)
    assert (kwargs["devices"], kwargs["num_nodes"], kwargs["strategy"]) == (8, 2, "ddp_find_unused_parameters_true")
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment) and not plugins[0].auto_requeue
    assert slurm_layout({"devices": 8, "num_nodes": 2}) == {"devices": 8, "num_nodes": 2}  # agreeing values
    assert slurm_layout({"devices": [0, 1, 2, 3, 4, 5, 6, 7]})["devices"] == 8
    with pytest.raises(ConfigError, match=r"trainer.devices=1, but SLURM runs --ntasks-per-node=8: leave"):
        slurm_layout({"devices": 1})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=4, but SLURM runs --nodes=2"):
        slurm_layout({"num_nodes": 4})
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(ConfigError, match="srun started 16 tasks without --ntasks-per-node"):
        slurm_layout({})
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's opt-out of SLURM detection
    assert trainer_arguments(base)[1] == []


# ---- scripts/slurm/train.sbatch's Python, run by bash without SLURM (srun: a stub that records its arguments)
SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"


def run_sbatch(submit_dir: Path, env_python=None):
    """bash train.sbatch as SLURM would start it from `submit_dir`, with `python` on the PATH one that lacks the
    project's packages (the system's, as on a login node); returns (exit code, output, srun's arguments or None)."""
    bin_dir = submit_dir / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys._base_executable} -S \"$@\"\n")  # -S: no site-packages
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {submit_dir / 'srun.args'}\n")
    for stub in ("python", "srun"):
        (bin_dir / stub).chmod(0o755)
    (submit_dir / "train_stub.py").write_text("print('runs/demo')\n")  # train.py --print-run-dir
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "TRAIN_SCRIPT": "train_stub.py", **({"PYTHON": env_python} if env_python else {})}
    proc = subprocess.run(["bash", str(SBATCH), "-c", "configs/demo.yaml"], env=env, capture_output=True, text=True,
                          timeout=120)
    args = submit_dir / "srun.args"
    return proc.returncode, proc.stdout + proc.stderr, args.read_text().split() if args.exists() else None


def test_the_job_script_uses_the_repositorys_venv_or_stops_before_srun_naming_the_python(tmp_path):
    """README: `./run.sh` installs into .venv/, then `sbatch scripts/slurm/train.sbatch ...` from the repository
    root. The job uses .venv (before: the system `python`, whose job died in srun with ModuleNotFoundError); with
    no .venv and a `python` that cannot import the project, it stops before srun, naming it and PYTHON=."""
    code, out, srun = run_sbatch(tmp_path)
    assert code == 2 and srun is None, out
    assert out.strip().splitlines()[-1].startswith(f"error: python ({tmp_path / 'bin' / 'python'}) cannot import "
                                                   f"torch and pytorch_lightning: run ./run.sh in {tmp_path} once")
    assert "PYTHON=/path/to/python sbatch" in out
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "python").chmod(0o755)
    code, out, srun = run_sbatch(tmp_path)
    assert code == 0 and srun[srun.index(".venv/bin/python"):][:2] == [".venv/bin/python", "train_stub.py"], out
    code, out, srun = run_sbatch(tmp_path, env_python=sys.executable)  # PYTHON= chooses another
    assert code == 0 and sys.executable in srun, out
