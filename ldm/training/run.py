"""Building a training run from its config: checked inputs -> networks -> system -> datamodule -> trainer.

train.py calls these in order; scripts (benchmarks, reference loops) and tests build the same system from here.
"""
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from data import ImageMaskDataModule, LogSkippedFiles, encoder_fingerprint
from data.sources import resolve_source
from ..formats.bases import check_base
from .callbacks import EMA, ImagesPerSecond, SampleGrids, StepProgressBar, StopOnNonFinite
from .checkpointing import (AtomicCheckpointIO, ResumableCSVLogger, RunCheckpoint, UnsafeCheckpointError,
                            checkpoint_step, load_checkpoint, newest_readable_checkpoint, remove_partial_saves)
from .cluster import trainer_arguments
from .config import ConfigError, config_changes, to_container
from ..formats.convert import CheckpointError, load_into, read_checkpoint
from ..files import atomic_write, disk_full
from ..latent_norm import fill
from ..models.asym_decoder import AsymmetricDecoderTraining, LossConfig, OptimConfig
from ..modules.families import build_autoencoder, upgrade
from ..modules.losses import NLayerDiscriminator, PerceptualLoss


def is_rank_zero() -> bool:
    """True in the launching process (before DDP workers exist) and on global rank 0."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def resolve_resume(resume, run_dir: Path):
    """The checkpoint to resume from, or None to start fresh; 'auto' skips unreadable ones, naming them."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise ConfigError(f"--resume: checkpoint not found: {resume}")
        try:
            checkpoint_step(resume)
        except UnsafeCheckpointError as err:
            raise ConfigError(f"--resume: {err}") from None
        except Exception as err:  # truncated, not a Lightning checkpoint
            raise ConfigError(f"--resume: unreadable checkpoint {resume} ({str(err).splitlines()[0][:160]})") from None
        return resume
    ckpt_dir = run_dir / "checkpoints"
    try:
        best, skipped = newest_readable_checkpoint(ckpt_dir, hpc_dir=run_dir)
    except UnsafeCheckpointError as err:
        raise ConfigError(f"--resume auto: {err}") from None
    if is_rank_zero():
        for path, reason in skipped:
            print(f"warning: --resume auto: skipping unreadable checkpoint {path} ({reason})", file=sys.stderr)
        for path in remove_partial_saves(ckpt_dir):
            print(f"warning: removed {path}, left by a save that was killed", file=sys.stderr)
        if best is not None:
            print(f"resuming from {best}", file=sys.stderr)
    if best is None and skipped:
        raise ConfigError(f"--resume auto: no readable checkpoint in {ckpt_dir} ({len(skipped)} unreadable)")
    return None if best is None else str(best)


SHAPING = ("model.autoencoder.", "discriminator.")  # config keys that shape the saved weights


def check_resume(cfg, system, resume, hint) -> None:
    """The run resumes the checkpoint's networks and optimiser state: a changed key that shapes their weights
    (model.autoencoder.* but gradient_checkpointing, discriminator.*), or other trained tensors than the
    checkpoint's optimiser holds, is an error naming it; other changes (a larger trainer.max_steps, data
    paths, model.compile) are listed."""
    ckpt = load_checkpoint(resume, mmap=True)
    saved = ckpt.get("config")
    if isinstance(saved, dict):  # written by train.py
        if isinstance(saved.get("model", {}).get("autoencoder"), dict):  # keys renamed since: today's names
            saved["model"]["autoencoder"] = upgrade(saved["model"]["autoencoder"])
        changed = config_changes(saved, to_container(cfg))  # key: (then, now)
        for key, (then, now) in changed.items():
            if key.startswith(SHAPING) and key != "model.autoencoder.gradient_checkpointing":
                raise ConfigError(f"--resume {resume}: {key} was {then!r} in that run, now {now!r}; {hint}")
        if changed and is_rank_zero():
            print("resuming with changed config: " + ", ".join(f"{k}: {then!r} -> {now!r}"
                                                              for k, (then, now) in changed.items()), file=sys.stderr)
    groups = [len(g["params"]) for g in (ckpt.get("optimizer_states") or [{}])[0].get("param_groups", [])]
    want = [len(g["params"]) for g in system.decoder_param_groups(lr=0.0)]
    if groups and groups != want:
        raise ConfigError(f"--resume {resume}: its decoder optimiser's groups hold {groups} tensors, this run "
                          f"trains {want} (a checkpoint from before post_quant_conv was frozen? see CHANGELOG.md; "
                          f"its weights still export and evaluate)")


def check_inputs(cfg) -> None:
    """Fail before anything is built if a file the config names is missing (the error names key and file)."""
    ckpt = cfg.model.vae_ckpt
    if ckpt and not Path(ckpt).exists():
        raise ConfigError(f"model.vae_ckpt: file not found: {ckpt} (checkpoints/README.md lists the weights "
                          f"and where to download them)")
    for key in ("source", "val_source"):
        source = cfg.data[key]
        if source is None or source == "sample" or Path(str(source)).is_dir():
            continue  # a folder is listed once, by the datamodule (ImageNet: a million files)
        try:
            resolve_source(source)  # shards: expands the pattern and checks the local files exist
        except FileNotFoundError as err:
            raise ConfigError(f"data.{key}: {err}") from None
    backend = cfg.model.compile
    if backend is not None and not isinstance(backend, bool):
        from torch._dynamo import list_backends
        if not isinstance(backend, str) or backend not in list_backends(exclude_tags=()):
            raise ConfigError(f"model.compile must be true, false or a torch.compile backend (inductor, "
                              f"aot_eager, eager, ...: torch._dynamo.list_backends()), got {backend!r}")
    if cfg.optim.grad_clip > 0 and str(cfg.trainer.precision) in ("16", "16-mixed"):
        raise ConfigError("optim.grad_clip: clipping does not work with trainer.precision=16-mixed (the gradients "
                          "are still loss-scaled when clipped); use bf16-mixed, or optim.grad_clip=0")


def build_system(cfg, bases: Optional[dict] = None) -> AsymmetricDecoderTraining:
    """The networks and the training recipe, from the config (weights loaded where configured). A VAE file of
    another base than model.autoencoder's is refused; `bases` ({name: autoencoder kwargs}, ldm.formats.bases.read_bases
    of configs/bases/) lets the error name the file's base."""
    src, warm_keys = None, []
    if cfg.model.vae_ckpt:
        try:
            src = read_checkpoint(cfg.model.vae_ckpt)
            check_base(str(cfg.model.vae_ckpt), src.config, to_container(cfg.model.autoencoder), bases or {})
        except CheckpointError as err:  # unreadable, or of another base
            raise ConfigError(f"model.vae_ckpt: {err}") from None
        # the file's latent statistics where the base leaves them to it: then in config.yaml and every checkpoint
        cfg.model.autoencoder.latent_norm = fill(to_container(cfg.model.autoencoder).get("latent_norm"),
                                                 src.config.get("latent_norm"))
    vae = build_autoencoder(**to_container(cfg.model.autoencoder))
    if src is not None:
        try:
            report = load_into(vae, src)
        except CheckpointError as err:  # widths that do not match model.autoencoder
            raise ConfigError(f"model.vae_ckpt: {err}") from None
        warm_keys = [k for k in report.loaded if k.startswith("decoder.")]
    # built after the VAE: random-init order (hence the demo's numbers) stays as it was; built whatever
    # loss.perceptual_weight, as validation reports LPIPS
    try:
        perceptual = PerceptualLoss(**cfg.perceptual)
    except FileNotFoundError as err:  # its weights file: the message names it and where it goes
        raise ConfigError(f"perceptual: {err}") from None
    return AsymmetricDecoderTraining(
        vae, NLayerDiscriminator(**cfg.discriminator), perceptual,
        loss=LossConfig(**cfg.loss), optim=OptimConfig(**cfg.optim), batch_size=cfg.data.batch_size,
        sample_posterior=cfg.model.sample_posterior, latent_noise=cfg.model.latent_noise,
        val_latent_noise=cfg.model.val_latent_noise, warm_start_keys=warm_keys,
        channels_last=cfg.model.channels_last, compile=cfg.model.compile, run_config=to_container(cfg),
        seed=cfg.seed)


def build_loggers(cfg, run_dir: Path, name: str):
    loggers = [ResumableCSVLogger(save_dir=str(run_dir.parent), name=name, version="")]  # <run_dir>/metrics.csv
    kind = cfg.run.logger
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    elif kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger
        online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "offline"
        loggers.append(WandbLogger(project=cfg.run.wandb_project, name=name, save_dir=str(run_dir),
                                   offline=not online))  # offline without a key: never hangs on the network
    elif kind != "csv":
        raise ConfigError(f"run.logger must be csv, wandb or tensorboard, got '{kind}'")
    return loggers


def build_trainer(cfg, run_dir: Path, name: str, extra_callbacks=()) -> pl.Trainer:
    callbacks = [*extra_callbacks,
        RunCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                      every_n_train_steps=cfg.run.checkpoint_every_n_steps, save_last=True,
                      save_top_k=cfg.run.keep_last_k, monitor="step", mode="max",
                      enable_version_counter=False),  # names as newest_readable_checkpoint looks for them
        StopOnNonFinite(cfg.run.max_nonfinite_steps),
        SampleGrids(run_dir / "samples", cfg.run.sample_images),
        ImagesPerSecond(),
        LogSkippedFiles(),
        LearningRateMonitor(logging_interval="step"),
        *([StepProgressBar()] if cfg.trainer.enable_progress_bar else []),
    ]
    if cfg.ema.decay is not None:
        callbacks.append(EMA(decay=cfg.ema.decay))
    # DDP that tolerates the idle discriminator; under srun, devices and nodes from SLURM's allocation
    kwargs, plugins = trainer_arguments(to_container(cfg.trainer))
    return pl.Trainer(default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir, name), callbacks=callbacks,
                      check_val_every_n_epoch=None, plugins=[AtomicCheckpointIO(), *plugins], **kwargs)


def clear_checkpoints(run_dir: Path) -> None:
    """run.overwrite=true: delete the old run's checkpoints (and Lightning's SLURM hpc_ckpt_*.ckpt) and metrics."""
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "metrics.csv").unlink(missing_ok=True)  # else the new run's rows would follow the old run's
    for path in run_dir.glob("hpc_ckpt_*.ckpt"):
        path.unlink()


def prepare_run_dir(cfg, name: str, resume_arg=None):
    """(run folder, checkpoint to resume or None, whether an old run's checkpoints are to be deleted). A run folder
    that holds checkpoints is never overwritten without --resume or run.overwrite=true."""
    run_dir = Path(cfg.run.log_dir) / name
    resume = resolve_resume(resume_arg, run_dir)
    start_over = is_rank_zero() and resume_arg is None and (run_dir / "checkpoints").exists()
    if start_over and not cfg.run.overwrite:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints: pass --resume auto to continue, "
                          f"--name NAME for a new run, or run.overwrite=true to start over")
    return run_dir, resume, start_over


def build_datamodule(cfg, system: AsymmetricDecoderTraining) -> ImageMaskDataModule:
    """The data of `cfg.data`; a latent cache (scripts/cache_latents.py) must come from the system's frozen encoder."""
    return ImageMaskDataModule(**cfg.data, encoder_fingerprint=encoder_fingerprint(system.vae))


def open_run_dir(cfg, run_dir: Path, trainer: pl.Trainer, start_over: bool) -> None:
    """Once everything is built (a config error must not cost the old run): delete an overwritten run's checkpoints
    (else --resume auto would later pick its newest step) and write the resolved config (rank 0)."""
    if start_over:
        clear_checkpoints(run_dir)
    if trainer.is_global_zero:
        atomic_write(run_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))


@contextmanager
def disk_full_as_error(run_dir: Path):
    """A full disk (or exhausted quota) while training: a ConfigError naming the file that could not be written and
    the newest intact checkpoint; checkpoints are written whole or not at all, so `--resume auto` continues from
    it once there is room."""
    try:
        yield
    except Exception as raised:
        line = disk_full(raised, run_dir)
        if line is None:
            raise
        best, _ = newest_readable_checkpoint(run_dir / "checkpoints", hpc_dir=run_dir)
        newest = f"{best} (step {checkpoint_step(best)})" if best is not None else "none yet"
        raise ConfigError(f"{line}; newest intact checkpoint: {newest}; make room, then --resume auto continues from "
                          f"it") from None
