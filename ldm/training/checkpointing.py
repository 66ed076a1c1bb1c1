"""Checkpoints that survive faults: atomic writes, last.ckpt at the final step and on preemption, auto-resume."""
import csv
import pickle
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from .config import ConfigError
from ..files import atomic_write

PARTIAL_GLOB = ".*.ckpt.*.tmp"  # what atomic_save leaves behind when killed mid-write


def atomic_save(obj, path) -> None:
    """torch.save through ldm.files.atomic_write: `path` is old or new, never partial, and honours the umask.

    Lightning's own local save stages the file in $TMPDIR and moves it over, which degrades to a plain
    (interruptible) copy when $TMPDIR and the run folder are on different filesystems, as on most clusters.
    """
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint whose pickle names a global outside torch's weights-only allowlist (it could run code)."""


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch's words for a global outside its allowlist (or in a blocked module)


def load_checkpoint(path, mmap: bool = False) -> dict:
    """A run checkpoint, read by torch's weights-only unpickler: tensors, containers and plain values, all that a
    checkpoint of this codebase holds (GAN, EMA, any logger, SLURM's hpc_ckpt alike). A pickle naming anything
    else (a class, a function such as os.system) is refused before it runs: UnsafeCheckpointError naming the
    file and the global. Other failures (truncated, not a checkpoint) raise torch's own error."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found is None:
            raise
        raise UnsafeCheckpointError(f"{path}: not loaded: its pickle calls for {found.group(1)}, which no checkpoint "
                                    f"written by train.py holds (unpickling it could run code)") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with `atomic_save` and `load_checkpoint` for local paths (Trainer(plugins=[...])):
    trainer.fit(ckpt_path=...) restores through it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path)  # always weights-only, whatever the caller asks


def remove_partial_saves(ckpt_dir) -> list:
    """Delete the temporary files of saves that were killed mid-write; returns their paths."""
    partial = sorted(Path(ckpt_dir).glob(PARTIAL_GLOB)) if Path(ckpt_dir).is_dir() else []
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def checkpoint_step(path) -> int:
    """global_step of a Lightning checkpoint; raises if the file is unreadable (truncated, not a checkpoint)."""
    # mmap: only the pickled structure is read, not the tensor data; a truncated zip fails here already
    return int(load_checkpoint(path, mmap=True)["global_step"])


def newest_readable_checkpoint(ckpt_dir, hpc_dir=None):
    """(newest readable checkpoint or None, [(path, reason) of unreadable ones]) among last.ckpt, step*.ckpt
    and Lightning's SLURM hpc_ckpt_*.ckpt (in `hpc_dir`); newest = highest global_step, last.ckpt wins ties."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("step*.ckpt"))
    if hpc_dir is not None:
        candidates += sorted(Path(hpc_dir).glob("hpc_ckpt_*.ckpt"))
    best, best_key, skipped = None, None, []
    for order, path in enumerate(p for p in candidates if p.is_file()):
        try:
            step = checkpoint_step(path)
        except UnsafeCheckpointError:
            raise  # not a torn write: someone put it there
        except Exception as err:  # any other failure to read means: not resumable
            skipped.append((path, (str(err).splitlines() or [type(err).__name__])[0]))
            continue
        key = (step, -order)  # candidates are in order of preference
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best, skipped


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt at the final step and, on SIGTERM, SIGUSR1 or SIGINT (Ctrl-C), at
    the current step; a second SIGINT stops at once, unsaved (Lightning's KeyboardInterrupt shutdown, exit 1).

    A signal only sets a flag; at the next batch end that steps the optimisers (with gradient accumulation,
    the cycle's last micro-batch: a save in mid-cycle would lose the gradients summed so far) every rank agrees
    to stop (one all-reduce per step under DDP, as Lightning's own SIGTERM check), last.ckpt is saved and the
    trainer stops without validating.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: Optional[str] = None  # name of the signal seen, until the run stops
        self._previous = {}
        self._announce = True  # rank 0 says what a Ctrl-C does

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._announce = trainer.is_global_zero
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)  # no SIGUSR1 on Windows
            if signum is not None:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:  # a terminal's Ctrl-C reaches every process of its group, the loader workers too
            if self.received == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl-C
            if self._announce:
                print("\nSIGINT: saving last.ckpt at the end of this step, then stopping (Ctrl-C again: stop at once, "
                      "unsaved)", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum).name
        previous = self._previous.get(signum)
        # A previous SIGUSR1 handler is kept (train.py turns Lightning's SLURM auto-requeue off: ldm/training/cluster.py).
        # Lightning's SIGTERM handler is not chained: it would end the run by SIGTERMException at the next step;
        # nor Python's SIGINT one (KeyboardInterrupt at once).
        if signum == signal.SIGUSR1 and callable(previous):
            previous(signum, frame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the periodic save
        if not getattr(pl_module, "completes_a_step", lambda: True)():
            return  # mid-way through an accumulation cycle: the same on every rank
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            if 0 < trainer.max_steps <= trainer.global_step:  # the final step: saved before on_train_end, where
                self._save_last_now(trainer)  # EMA has already swapped its average into the live weights
            return
        self._save_last_now(trainer)
        rank_zero_info(f"{self.received or 'a signal on another rank'}: last checkpoint {self.last_model_path} "
                       f"at step {trainer.global_step}; stopping")
        trainer.limit_val_batches = 0  # no validation on the way out: a preemption grace period is short
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        # a run that ends other than at max_steps (max_epochs, max_time): by now the live weights are EMA's average
        self._save_last_now(trainer)
        super().on_train_end(trainer, pl_module)
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        self._restore_handlers()

    def _save_last_now(self, trainer):
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _restore_handlers(self):
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}



class ResumableCSVLogger(CSVLogger):
    """CSVLogger that continues the run folder's metrics.csv: Lightning's deletes it when the folder is not empty,
    so each resume (each SLURM requeue) lost the metrics logged before it."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # called by __init__: keep the file and its columns
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])
