"""Lightning callbacks of the training run: sample grids, images/s on the progress bar, a non-finite guard, EMA."""
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, TQDMProgressBar

from ..metrics import sample_grid, save_grid


class SampleGrids(pl.Callback):
    """After each validation, write image | masked | mask | reconstruction | pasted | error as a PNG (rank 0)."""

    def __init__(self, out_dir: Path, max_images: int = 8):
        self.out_dir, self.max_images = Path(out_dir), max_images

    def on_validation_epoch_end(self, trainer, pl_module):
        example = pl_module.val_example
        if example is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        image, recon, mask = (t.float().cpu() for t in example)
        grid = sample_grid(image, recon, mask, max_images=self.max_images)
        path = self.out_dir / f"step{trainer.global_step:08d}.png"
        save_grid(grid, path)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):  # tensorboard
                logger.experiment.add_image("val/samples", grid, trainer.global_step)  # uint8 (3, H, W)
            elif hasattr(logger, "log_image"):  # wandb
                logger.log_image("val/samples", [str(path)], step=trainer.global_step)


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimiser steps of trainer.max_steps over the whole run, from the resumed step
    (Lightning's counts each epoch's batches under 'Epoch N', and the stream's epochs mean nothing here)."""

    def on_train_epoch_start(self, trainer, *_):
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # once per run: the bar is not reset at each epoch
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step
            bar.set_description("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes


class ImagesPerSecond(pl.Callback):
    """Training throughput (images/s across all ranks) on the progress bar and in the logs."""

    def __init__(self, every_n_steps: int = 10):
        self.every, self._t0, self._step0 = every_n_steps, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._t0 is None or step < self._step0:
            self._t0, self._step0 = time.perf_counter(), step
            return
        if step - self._step0 >= self.every:
            per_step = batch["image"].shape[0] * trainer.world_size * pl_module.optim_cfg.accumulate_grad_batches
            rate = (step - self._step0) * per_step / (time.perf_counter() - self._t0)
            rate = torch.tensor(rate)  # a CPU tensor: a Python number would be copied to the device, a sync
            pl_module.log("train/images_per_sec", rate, rank_zero_only=True)
            pl_module.log("img/s", rate, prog_bar=True, logger=False, rank_zero_only=True)  # fits an 80-column bar
            self._t0, self._step0 = time.perf_counter(), step


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss (or its gradients) stayed non-finite."""


class StopOnNonFinite(pl.Callback):
    """Stop the run once `max_consecutive` optimiser steps in a row were skipped as non-finite.

    Skipped steps change no weights (nor Adam's state), so the checkpoints already on disk hold the last good
    step's weights; raising (rather than `should_stop`) makes sure nothing of the broken run is saved on the
    way out. On a GPU the streak is read without waiting for the device, so the stop can come a step late.
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = pl_module.nonfinite
        if self.max_consecutive > 0 and steps.streak >= self.max_consecutive:
            raise NonFiniteLossError(
                f"loss term '{steps.term}' was non-finite for {steps.streak} consecutive steps "
                f"({steps.skipped} skipped in all); stopping at step {trainer.global_step} with the "
                f"checkpoints left as they were (skipped steps changed no weights)")


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights (same schedule, checkpoint keys, validation and end-of-training swap) with a
    faster update: one foreach lerp over the trained parameters and the float buffers, and no host sync.

    AveragedModel.update_parameters compares its device-side counter on the host twice (each drains the device's
    queue) and launches a few kernels per tensor of the whole module, the frozen encoder and LPIPS included,
    whose average never moves from its first copy.
    """

    def __init__(self, decay: float = 0.999, **kwargs):
        super().__init__(decay=decay, **kwargs)
        self.decay = decay

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._average_model.update_parameters = _LerpUpdate(self._average_model, 1.0 - self.decay)


class _LerpUpdate:
    """AveragedModel.update_parameters (use_buffers=True) for ema = lerp(ema, live, weight): a copy the first time,
    then the trained parameters and float buffers lerped, integer buffers copied; all on the device."""

    def __init__(self, average, weight: float):
        self.average, self.weight, self.first = average, weight, None

    @torch.no_grad()
    def __call__(self, model):
        average = self.average
        if self.first is None:  # the counter's one host read per run: 0 unless resumed
            self.first = int(average.n_averaged) == 0
        params = list(zip(average.module.parameters(), model.parameters()))
        buffers = list(zip(average.module.buffers(), model.buffers()))
        if self.first:
            lerp, copy, self.first = [], params + buffers, False
        else:
            lerp = [(a, m) for a, m in params if m.requires_grad]
            lerp += [(a, m) for a, m in buffers if a.is_floating_point()]
            copy = [(a, m) for a, m in buffers if not a.is_floating_point()]
        if lerp:
            torch._foreach_lerp_([a for a, _ in lerp], [m for _, m in lerp], self.weight)
        if copy:
            torch._foreach_copy_([a for a, _ in copy], [m for _, m in copy])
        average.n_averaged += 1
