"""The LightningDataModule that builds sources, masks and loaders from the config's `data:` section."""
import os
import signal
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from .buckets import SQUARE, ShapeBatches, aspect_buckets
from .datasets import ImageMaskTrain, ImageMaskVal
from .images import load_crop
from .latents import LatentCacheTrain, check_cache, is_latent_cache
from .masks import MaskGenerator
from .sources import file_samples, resolve_source, shard_samples


class EpochLoader(DataLoader):
    """DataLoader that tells its dataset which pass, and from which batch, to serve (Lightning tells samplers only).

    `trained_fn() -> batches this rank has trained in the run`; every pass holds len(self) batches, so a run
    resumed from a checkpoint saved mid-epoch continues its pass where it stopped, whatever Lightning's epoch
    counter says (it counts a pass finished at the checkpoint twice). Without it, passes count from 0.
    """

    def __init__(self, dataset, trained_fn=None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.trained_fn = trained_fn
        self.passes = 0

    def __iter__(self):
        trained = self.trained_fn() if self.trained_fn is not None else self.passes * len(self)
        self.dataset.set_epoch(*divmod(trained, len(self)))
        self.passes += 1
        return super().__iter__()

    # Lightning warns that a mid-epoch resume is inexact unless the training loader has these. Its position is the
    # trainer's own batch count (trained_fn), restored with the trainer's loops: there is nothing else to save.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def trained_batches(trainer) -> int:
    """Batches this rank has trained in the run, a checkpoint's included. Lightning saves at a batch end, where
    `processed` counts that batch (`completed` catches up after the hooks)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore the stop signals the main process handles (SIGTERM, SIGUSR1, SIGINT).

    SLURM signals every process of a job step, as `kill -- -PGID` does a process group and a terminal's Ctrl-C its
    foreground group: a worker killed by SIGTERM (or by SIGUSR1, whose default action terminates, or by SIGINT's
    KeyboardInterrupt) makes the main process raise before it can save.
    Workers still end with the main process (the DataLoader's shutdown, its parent watchdog) or by SIGKILL.
    Lightning adds its seeding worker_init_fn only to loaders without one: it is called here in its stead.
    """
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):  # no SIGUSR1 on Windows
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # set by seed_everything(workers=True), as train.py does
        pl_worker_init_function(worker_id)


def plain(value):
    """OmegaConf containers (or any mapping/sequence) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def check_readable(source, resolution, limit=1000):
    """Raise, naming the source, unless one of its first `limit` images decodes."""
    if source.kind == "files":
        pairs = file_samples(source.items[:limit])
    else:
        pairs = shard_samples(source.items, lambda name, error: None)
    for n, (_key, raw) in enumerate(pairs):
        if n >= limit:
            break
        try:
            load_crop(raw, min(resolution, 64))
            return
        except Exception:
            continue
    raise RuntimeError(f"image source {source.name!r}: no usable image (corrupt, empty or not images)")


class ImageMaskDataModule(pl.LightningDataModule):
    """(image, mask) batches: image float32 (B,3,R,R) in [-1,1], mask float32 (B,1,R,R), 1 = hole.

    source / val_source: "sample" (the bundled photographs), an image folder, or webdataset shards
    (path, brace pattern, URL or pipe: command). epoch_length counts samples over all ranks.
    masks: keyword arguments of MaskGenerator (p_full, mix, presets). Validation splits the first
    val_size images over ranks and workers, each once, with crops and masks fixed by the seed.
    A `source` of latent-cache shards (scripts/cache_latents.py; detected by their samples) yields its stored
    crops with fresh masks plus "mean" and "logvar"; it needs flip=False, and must have been made at
    `resolution` and with the encoder whose weights give `encoder_fingerprint` (None: not checked).
    aspect_ratios (width / height): crops of (H, W) buckets of about resolution**2 pixels (data.buckets), one bucket
    per training batch, validation image i in bucket i mod n (batched by shape); (1.0,) = square crops, the paper.
    `skipped` counts the unreadable files met so far on this rank (LogSkippedFiles logs it).
    """

    def __init__(self, source="sample", resolution=256, batch_size=4, num_workers=4, seed=0, val_source=None,
                 val_size=64, epoch_length=1281167, flip=True, crop_min_scale=0.5, shuffle_buffer=1000, masks=None,
                 aspect_ratios=SQUARE, encoder_fingerprint=None):
        super().__init__()
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.source, self.val_source = str(source), str(val_source or source)
        self.resolution, self.batch_size, self.num_workers = int(resolution), int(batch_size), int(num_workers)
        self.seed, self.val_size, self.epoch_length = int(seed), val_size, int(epoch_length)
        self.flip, self.crop_min_scale, self.shuffle_buffer = bool(flip), float(crop_min_scale), int(shuffle_buffer)
        self.mask_kwargs = plain(masks or {})
        self.buckets = aspect_buckets(self.resolution, plain(aspect_ratios))
        self.encoder_fingerprint = encoder_fingerprint  # train.py: that of the run's frozen encoder
        self.train_set = self.val_set = None

    def rank_and_world_size(self):
        """From the trainer, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def mask_generator(self):
        """The training/validation mask generator from the `masks` settings."""
        return MaskGenerator(self.resolution, **self.mask_kwargs)

    def setup(self, stage=None):
        """Resolve and check the sources; build the datasets for this rank."""
        rank, world = self.rank_and_world_size()
        masks = self.mask_generator()
        if stage in (None, "fit") and self.train_set is None:
            source = resolve_source(self.source)
            check_readable(source, self.resolution)
            batches = max(1, self.epoch_length // (world * self.batch_size))  # per rank, all full
            kwargs = dict(seed=self.seed, rank=rank, world_size=world, batch_size=self.batch_size,
                          crop_min_scale=self.crop_min_scale, shuffle_buffer=self.shuffle_buffer)
            if is_latent_cache(source):
                check_cache(source, self.resolution, self.flip, self.encoder_fingerprint, self.buckets)
                self.train_set = LatentCacheTrain(source, self.resolution, masks, batches * self.batch_size,
                                                  encoder=self.encoder_fingerprint, **kwargs)
            else:
                self.train_set = ImageMaskTrain(source, self.resolution, masks, batches * self.batch_size,
                                                flip=self.flip, buckets=self.buckets, **kwargs)
        if stage in (None, "fit", "validate") and self.val_set is None:
            source = resolve_source(self.val_source)
            check_readable(source, self.resolution)
            self.val_set = ImageMaskVal(source, self.resolution, masks, seed=self.seed, rank=rank,
                                        world_size=world, size=self.val_size, buckets=self.buckets)

    def _loader_kwargs(self, batch_size):
        return dict(batch_size=batch_size, num_workers=self.num_workers,
                    pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                    worker_init_fn=init_worker)

    def train_dataloader(self):
        if self.train_set is None:
            self.setup("fit")
        trainer = self.trainer
        trained_fn = (lambda: trained_batches(trainer)) if trainer is not None else None
        return EpochLoader(self.train_set, trained_fn=trained_fn, **self._loader_kwargs(self.batch_size))

    def val_dataloader(self):
        if self.val_set is None:
            self.setup("validate")
        # batched in the workers, one image shape per batch (one bucket: the batches of batch_size DataLoader makes)
        return DataLoader(ShapeBatches(self.val_set, self.batch_size), **self._loader_kwargs(None))

    @property
    def skipped(self):
        """Unreadable files skipped so far on this rank (train + validation, all workers)."""
        return sum(ds.skipped.value for ds in (self.train_set, self.val_set) if ds is not None)


class LogSkippedFiles(pl.Callback):
    """Logs `data/skipped` (unreadable files, summed over ranks) after each validation and training epoch."""

    def _log(self, trainer, pl_module):
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "skipped"):
            count = torch.tensor(float(trainer.datamodule.skipped), device=pl_module.device)
            pl_module.log("data/skipped", count, sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)
