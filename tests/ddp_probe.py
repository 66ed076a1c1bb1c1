"""train.py with a callback that saves each rank's first mask batch and final weights (for test_train.py's DDP test)."""
import sys

import pytorch_lightning as pl
import torch
from probe_utils import pop_probe

import train


class SaveFirstMasks(pl.Callback):
    def __init__(self, prefix):
        self.prefix = prefix

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            torch.save(batch["mask"].cpu(), f"{self.prefix}{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.prefix}-weights{trainer.global_rank}.pt")


if __name__ == "__main__":
    probe, argv = pop_probe(sys.argv[1:])
    sys.exit(train.main(argv, extra_callbacks=[SaveFirstMasks(probe)]))
