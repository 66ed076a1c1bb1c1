"""Trainer arguments for several processes: the DDP strategy the recipe needs, and devices / nodes from SLURM."""
import os

import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from .config import ConfigError

DDP_NAMES = ("ddp", "ddp_fork", "ddp_notebook")  # Lightning's launchers of DDP that this run supports
SPAWN = ("trainer.strategy={}: spawned processes get the trainer pickled, and Lightning's EMA averaging function "
         "cannot be; use ddp (or ddp_fork)")


def trainer_arguments(kwargs: dict) -> tuple[dict, list]:
    """(Trainer keyword arguments, extra plugins) for the config's `trainer:` section.

    Under srun, devices and num_nodes are SLURM's (tasks per node, nodes) and Lightning's SLURM auto-requeue is
    off: its SIGUSR1 handler saves inside the signal handler, mid-step (under DDP with a barrier that can meet
    another rank's all-reduce), and requeues at once; the run instead saves at the next step's end
    (ldm.training.checkpointing.RunCheckpoint) and scripts/slurm/train.sbatch requeues the job once training has stopped.
    """
    kwargs, plugins = dict(kwargs), []
    if SLURMEnvironment.detect():
        kwargs.update(slurm_layout(kwargs))
        plugins.append(SLURMEnvironment(auto_requeue=False))
    kwargs["strategy"] = ddp_strategy(kwargs.get("strategy", "auto"), several_processes(kwargs))
    return kwargs, plugins


def slurm_layout(kwargs: dict) -> dict:
    """{"devices": tasks per node, "num_nodes": nodes} of this srun; a config value that disagrees is an error."""
    tasks, nodes = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES", "1")
    if tasks is None:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError(f"srun started {os.environ['SLURM_NTASKS']} tasks without --ntasks-per-node: "
                              f"Lightning needs --ntasks-per-node (one process per device)")
        tasks = "1"
    layout = {"devices": int(tasks), "num_nodes": int(nodes)}
    for key, defaults, flag in (("devices", ("auto", -1), "--ntasks-per-node"), ("num_nodes", (1,), "--nodes")):
        given = kwargs.get(key, defaults[0])
        count = len(given) if isinstance(given, (list, tuple)) else given
        if given not in defaults and str(count) != str(layout[key]):
            raise ConfigError(f"trainer.{key}={given!r}, but SLURM runs {flag}={layout[key]}: leave trainer.{key} "
                              f"at {defaults[0]!r} under SLURM (the allocation sets it)")
    return layout


def ddp_strategy(strategy, several: bool):
    """The strategy to hand Lightning: DDP tolerating parameters without gradients (the discriminator sits idle
    before loss.disc_start), or a one-line ConfigError for a strategy this recipe cannot train under."""
    if isinstance(strategy, DDPStrategy) and getattr(strategy, "_start_method", None) == "spawn":
        raise ConfigError(SPAWN.format("DDPStrategy(start_method='spawn')"))
    if isinstance(strategy, str) and strategy.startswith("ddp_spawn"):
        raise ConfigError(SPAWN.format(strategy))
    if isinstance(strategy, DDPStrategy):
        if strategy._ddp_kwargs.get("find_unused_parameters") is False:
            raise ConfigError("trainer.strategy: DDPStrategy(find_unused_parameters=False) fails at the first step "
                              "(the discriminator has no gradients before loss.disc_start); leave it unset")
        strategy._ddp_kwargs["find_unused_parameters"] = True
        return strategy
    if strategy == "auto":
        return "ddp_find_unused_parameters_true" if several else "auto"
    if strategy in DDP_NAMES:
        return f"{strategy}_find_unused_parameters_true"
    if isinstance(strategy, str) and strategy.endswith("_find_unused_parameters_false"):
        raise ConfigError(f"trainer.strategy={strategy}: fails at the first step (the discriminator has no gradients "
                          f"before loss.disc_start); use {strategy.removesuffix('_false')}_true or auto")
    if several and not (isinstance(strategy, str) and strategy.endswith("_find_unused_parameters_true")):
        raise ConfigError(f"trainer.strategy={strategy!r}: several processes train under DDP only (auto, "
                          f"{', '.join(DDP_NAMES)}); the recipe's two optimisers step by hand")
    return strategy


def several_processes(kwargs: dict) -> bool:
    """Whether the Trainer arguments start more than one process (devices over all nodes)."""
    devices = kwargs.get("devices", "auto")
    if devices in ("auto", -1, "-1"):
        many = torch.cuda.device_count() > 1 and kwargs.get("accelerator", "auto") != "cpu"
    elif isinstance(devices, (list, tuple)):
        many = len(devices) > 1
    elif isinstance(devices, str) and "," in devices:  # "0,1": device indices
        many = len([d for d in devices.split(",") if d.strip()]) > 1
    else:
        many = int(devices) > 1
    return many or int(kwargs.get("num_nodes", 1)) > 1
