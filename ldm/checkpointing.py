"""Checkpoints that survive faults: atomic writes, last.ckpt at the final step and on preemption, auto-resume."""
import csv
import os
import signal
import tempfile
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

PARTIAL_GLOB = ".*.ckpt.*.tmp"  # what atomic_save leaves behind when killed mid-write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: `path` is old or new, never partial.

    Lightning's own local save stages the file in $TMPDIR and moves it over, which degrades to a plain
    (interruptible) copy when $TMPDIR and the run folder are on different filesystems, as on most clusters.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    """`text` (UTF-8) written as atomic_save writes."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write(path, write) -> None:
    """write(binary file) into a temporary file in path's folder, fsync, then os.replace (the umask's permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with `atomic_save` for local paths (pass as Trainer(plugins=[...]))."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def remove_partial_saves(ckpt_dir) -> list:
    """Delete the temporary files of saves that were killed mid-write; returns their paths."""
    partial = sorted(Path(ckpt_dir).glob(PARTIAL_GLOB)) if Path(ckpt_dir).is_dir() else []
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def checkpoint_step(path) -> int:
    """global_step of a Lightning checkpoint; raises if the file is unreadable (truncated, not a checkpoint)."""
    # mmap: only the pickled structure is read, not the tensor data; a truncated zip fails here already
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return int(ckpt["global_step"])


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
        except Exception as err:  # any failure to read means: not resumable
            skipped.append((path, (str(err).splitlines() or [type(err).__name__])[0]))
            continue
        key = (step, -order)  # candidates are in order of preference
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best, skipped


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt at the final step and, on SIGTERM/SIGUSR1, at the current step.

    A signal only sets a flag; at the next batch end that steps the optimisers (with gradient accumulation,
    the cycle's last micro-batch: a save in mid-cycle would lose the gradients summed so far) every rank agrees
    to stop (one all-reduce per step under DDP, as Lightning's own SIGTERM check), last.ckpt is saved and the
    trainer stops without validating.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: Optional[str] = None  # name of the signal seen, until the run stops
        self._previous = {}

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)  # no SIGUSR1 on Windows
            if signum is not None:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received = signal.Signals(signum).name
        previous = self._previous.get(signum)
        # A previous SIGUSR1 handler is kept (train.py turns Lightning's SLURM auto-requeue off: ldm/cluster.py).
        # Lightning's SIGTERM handler is not chained: it would end the run by SIGTERMException at the next step.
        if signum != signal.SIGTERM and callable(previous):
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
