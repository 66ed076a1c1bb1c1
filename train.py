"""Train the asymmetric decoder.

    python train.py [-c CONFIG.yaml ...] [key=value ...] [--resume auto|PATH] [--name NAME]

Configs merge over configs/base.yaml in order, then the key=value overrides; with no config the demo
(configs/demo.yaml) runs. The run folder is <run.log_dir>/<name>/ with config.yaml, metrics.csv,
checkpoints/ and samples/. SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) save last.ckpt at the current step and stop
(exit 0; a second Ctrl-C stops at once, unsaved); `--resume auto` continues from the newest readable checkpoint
(put it in SLURM scripts: a no-op at first). A run folder belongs to one job at a time (run.lock).
Exit codes: 2 = a config, file or checkpoint error, a full disk, or a run folder in use by a live job (one line
naming it), 3 = the loss stayed non-finite, 130 = Ctrl-C before training began (1: any other failure, with
its traceback).
"""
import argparse
import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl

from data import LatentCacheError
from ldm.cli import script_main
from ldm.formats.bases import read_bases
from ldm.training.callbacks import NonFiniteLossError
from ldm.training.checkpointing import RunCheckpoint
from ldm.training.checks import pointless
from ldm.training.config import ConfigError, load_config
from ldm.models.asym_decoder import AsymmetricDecoderTraining
from ldm.training.run import (build_datamodule, build_system, build_trainer, check_inputs, check_resume, disk_full_as_error,
                     is_rank_zero, open_run_dir, prepare_run_dir)
from ldm.training.runlock import RunLock
from ldm.training.summary import summarize

ROOT = Path(__file__).resolve().parent


def ignore_known_warnings() -> None:
    """Filters for the warnings that say nothing to a user of this codebase (installed at import; tests that run
    train.main in their own process install them again inside their warnings capture)."""
    # expected here: the frozen encoder and LPIPS stay in eval mode; manual optimisation checkpoints post-step
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    # configure_model only compiles (shards nothing); validation metrics are reduced over ranks before they are logged
    warnings.filterwarnings("ignore", message=r".*WeightAveraging doesn't support sharding.*")
    warnings.filterwarnings("ignore", message=r".*recommended to use `self.log\(.*sync_dist=True`.*")
    # notes that say nothing to a user of this codebase: Lightning's own deprecations, its IterableDataset __len__
    # caution (each worker reads its own share, data/datamodule.py), the CSV logger's "directory not empty" (--resume
    # and run.overwrite decide that) and its litlogger tip
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(pytorch_lightning|lightning_fabric)\.")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")


ignore_known_warnings()
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda rec: "litlogger" not in rec.getMessage())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], help="YAML merged over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=8")
    p.add_argument("--resume", default=None, help="'auto' (the run folder's last checkpoint) or a .ckpt path")
    p.add_argument("--name", default=None, help="run name (default: the last config file's name)")
    p.add_argument("--print-run-dir", action="store_true", help="print the run folder and exit (for job scripts)")
    return p.parse_intermixed_args(argv)  # overrides before, between and after the flags


def fit(argv=None, extra_callbacks=()) -> None:
    """Parse, check, build and train; errors are raised (main turns them into exit codes)."""
    args = parse_args(argv)
    files = args.config or [str(ROOT / "configs" / "demo.yaml")]
    cfg = load_config(ROOT / "configs" / "base.yaml", files, args.overrides)
    name = args.name or Path(files[-1]).stem
    if args.print_run_dir:  # for job scripts (scripts/slurm/train.sbatch): where the logs go
        print(Path(cfg.run.log_dir) / name)
        return
    # one job per run folder: a second one exits 2 naming the live holder (ldm/training/runlock.py); rank 0 holds it
    with RunLock(Path(cfg.run.log_dir) / name, enabled=is_rank_zero()):
        run_dir, resume, start_over = prepare_run_dir(cfg, name, args.resume)
        check_inputs(cfg)
        for note in pointless(cfg) if is_rank_zero() else ():
            print(f"warning: {note}", file=sys.stderr)
        pl.seed_everything(cfg.seed, workers=True)
        # the networks and the training step; a VAE of another base than configured is refused, naming both
        system: AsymmetricDecoderTraining = build_system(cfg, bases=read_bases(ROOT / "configs" / "bases"))
        if resume is not None:
            check_resume(cfg, system, resume, hint=f"resume with that run's config: -c {run_dir / 'config.yaml'} "
                                                   f"--name {name}")
        datamodule = build_datamodule(cfg, system)
        trainer = build_trainer(cfg, run_dir, name, extra_callbacks)
        open_run_dir(cfg, run_dir, trainer, start_over)
        with disk_full_as_error(run_dir):  # one line naming the file and the newest intact checkpoint
            trainer.fit(system, datamodule=datamodule, ckpt_path=resume)
            if trainer.is_global_zero:  # the result: steps, validation metrics, where everything is, how to export
                signal = next((c.received for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)
                print(summarize(run_dir, trainer.global_step, trainer.max_steps, stopped_by=signal), flush=True)


@script_main
def main(argv=None, extra_callbacks=()) -> int:
    """Exit code of a run: 0 done (or stopped by a signal, checkpoint saved), 2 config error, 3 non-finite loss."""
    try:
        fit(argv, extra_callbacks)
    except (ConfigError, LatentCacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # before training began (once it has, Ctrl-C saves: ldm.training.checkpointing.RunCheckpoint)
        print("error: interrupted before training began: nothing to save", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
