"""train.py with a callback for test_slurm.py: each rank appends "<restart count> <global step>" to
`PROBE-rank<R>.txt` after every step, writes its PID to `PROBE-pid<R>` and saves its decoder's weights at the end (`PROBE-decoder<R>.pt`);
`+min_step_seconds=S` makes each batch last at least S seconds (time to signal a job mid-run)."""
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from fault_probe import MinStepSeconds, pop
from probe_utils import pop_probe

import train


class RecordSteps(pl.Callback):
    def __init__(self, prefix):
        self.prefix = prefix

    def on_train_start(self, trainer, pl_module):
        Path(f"{self.prefix}-pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(f"{self.prefix}-rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} {trainer.global_step}\n")

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.vae.decoder.state_dict(), f"{self.prefix}-decoder{trainer.global_rank}.pt")


if __name__ == "__main__":
    probe, argv = pop_probe(sys.argv[1:])
    seconds, argv = pop(argv, "min_step_seconds")
    callbacks = [RecordSteps(probe)] + ([MinStepSeconds(float(seconds))] if seconds else [])
    sys.exit(train.main(argv, extra_callbacks=callbacks))
