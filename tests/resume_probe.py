"""train.py with a callback that saves the states the resumed run starts from (for test_train.py)."""
import sys

import pytorch_lightning as pl
import torch
from probe_utils import pop_probe

import train


class RecordStartState(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, pl.callbacks.WeightAveraging))
        torch.save({
            "global_step": trainer.global_step,
            "optimizer_states": [o.state_dict() for o in trainer.optimizers],
            "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "state_dict": pl_module.state_dict(),
            "ema_state_dict": {k[len("module."):]: v for k, v in ema._average_model.state_dict().items()
                               if k.startswith("module.")},
        }, self.path)


if __name__ == "__main__":
    probe, argv = pop_probe(sys.argv[1:])
    sys.exit(train.main(argv, extra_callbacks=[RecordStartState(probe)]))
