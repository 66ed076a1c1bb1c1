"""train.py with injected faults (for test_reliability.py): `+nan_batches=1,4,5` makes the LPIPS term NaN at
those batch indices; `+signal=SIGTERM@3` has the process signal itself once global_step reaches 3 (`@batch7`:
at the end of micro-batch 7 of the run, counted from 0);
`+min_step_seconds=0.3` makes each batch last at least that long (a window to kill the run in, on fast machines);
`+no_space=step00000004.ckpt` makes the save of that checkpoint fail as on a full disk (ENOSPC)."""
import errno
import os
import signal
import sys
import time

import pytorch_lightning as pl
from probe_utils import ROOT  # noqa: F401  (puts the repository on sys.path)

import train
from ldm.training import checkpointing
from ldm.models.asym_decoder import AsymmetricDecoderTraining


def inject_nan(batches):
    recon_terms = AsymmetricDecoderTraining.recon_terms

    def patched(self, recon, image, mask):
        terms = recon_terms(self, recon, image, mask)
        if self.trainer.fit_loop.total_batch_idx in batches:
            terms["lpips"] = terms["lpips"] * float("nan")
            terms["nll"] = terms["nll"] + terms["lpips"]
        return terms
    AsymmetricDecoderTraining.recon_terms = patched


def no_space_for(name):
    atomic_write = checkpointing.atomic_write

    def full(path, write):
        if os.path.basename(path) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return atomic_write(path, write)
    checkpointing.atomic_write = full


class SignalSelf(pl.Callback):
    """At a batch end: once global_step reaches `step`, or (`micro_batch`) at that micro-batch of the run."""

    def __init__(self, signum, step, micro_batch=False):
        self.signum, self.step, self.micro_batch = signum, step, micro_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = trainer.fit_loop.total_batch_idx if self.micro_batch else trainer.global_step
        if now == self.step:
            os.kill(os.getpid(), self.signum)


class MinStepSeconds(pl.Callback):
    def __init__(self, seconds):
        self.seconds, self.start = seconds, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(max(0.0, self.seconds - (time.monotonic() - self.start)))


def pop(argv, key):
    value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"+{key}=")), None)
    return value, [a for a in argv if not a.startswith(f"+{key}=")]


if __name__ == "__main__":
    nan_batches, argv = pop(sys.argv[1:], "nan_batches")
    sig, argv = pop(argv, "signal")
    seconds, argv = pop(argv, "min_step_seconds")
    full, argv = pop(argv, "no_space")
    if full:
        no_space_for(full)
    callbacks = [MinStepSeconds(float(seconds))] if seconds else []
    if nan_batches:
        inject_nan({int(b) for b in nan_batches.split(",")})
    if sig:
        name, at = sig.split("@")
        micro_batch = at.startswith("batch")
        callbacks.append(SignalSelf(getattr(signal, name), int(at.removeprefix("batch")), micro_batch))
    sys.exit(train.main(argv, extra_callbacks=callbacks))
