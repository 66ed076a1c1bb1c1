"""Train the asymmetric decoder.

    python train.py [-c CONFIG.yaml ...] [key=value ...] [--resume auto|PATH] [--name NAME]

Configs merge over configs/base.yaml in order, then the key=value overrides; with no config the demo
(configs/demo.yaml) runs. The run folder is <run.log_dir>/<name>/ with config.yaml, metrics.csv,
checkpoints/ and samples/. SIGTERM or SIGUSR1 save last.ckpt at the current step and stop (exit 0);
`--resume auto` continues from the newest readable checkpoint (put it in SLURM scripts: a no-op at first).
Exit codes: 2 = a config, file or checkpoint error (one line naming it), 3 = the loss stayed non-finite
(1: any other failure, with its traceback).
"""
import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from data import ImageMaskDataModule, LatentCacheError, LogSkippedFiles, encoder_fingerprint
from data.sources import resolve_source
from ldm import AsymmetricAutoencoderKL, CheckpointError
from ldm.callbacks import EMA, ImagesPerSecond, NonFiniteLossError, SampleGrids, StopOnNonFinite
from ldm.checkpointing import (AtomicCheckpointIO, ResumableCSVLogger, RunCheckpoint, checkpoint_step,
                               newest_readable_checkpoint, remove_partial_saves)
from ldm.cluster import trainer_arguments
from ldm.config import ConfigError, load_config, to_container
from ldm.models.asym_decoder import AsymmetricDecoderTraining, LossConfig, OptimConfig
from ldm.modules.losses import NLayerDiscriminator, PerceptualLoss

ROOT = Path(__file__).resolve().parent
# expected here: the frozen encoder and LPIPS stay in eval mode; manual optimisation checkpoints post-step
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
# configure_model only compiles (shards nothing); validation metrics are reduced over ranks before they are logged
warnings.filterwarnings("ignore", message=r".*WeightAveraging doesn't support sharding.*")
warnings.filterwarnings("ignore", message=r".*recommended to use `self.log\(.*sync_dist=True`.*")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], help="YAML merged over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=8")
    p.add_argument("--resume", default=None, help="'auto' (the run folder's last checkpoint) or a .ckpt path")
    p.add_argument("--name", default=None, help="run name (default: the last config file's name)")
    p.add_argument("--print-run-dir", action="store_true", help="print the run folder and exit (for job scripts)")
    return p.parse_args(argv)


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
        except Exception as err:  # truncated, not a Lightning checkpoint
            raise ConfigError(f"--resume: unreadable checkpoint {resume} ({str(err).splitlines()[0][:160]})") from None
        return resume
    ckpt_dir = run_dir / "checkpoints"
    best, skipped = newest_readable_checkpoint(ckpt_dir, hpc_dir=run_dir)
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


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


SHAPING = ("model.autoencoder.", "discriminator.")  # config keys that shape the saved weights


def check_resume(cfg, system, resume, hint) -> None:
    """The run resumes the checkpoint's networks and optimiser state: a changed key that shapes their weights
    (model.autoencoder.* but gradient_checkpointing, discriminator.*), or other trained tensors than the
    checkpoint's optimiser holds, is an error naming it; other changes (a larger trainer.max_steps, data
    paths, model.compile) are listed."""
    ckpt = torch.load(resume, map_location="cpu", mmap=True, weights_only=False)
    saved = ckpt.get("config")
    if isinstance(saved, dict):  # written by train.py
        old, new = _flat(saved), _flat(to_container(cfg))
        changed = {k: (old.get(k, "(absent)"), new.get(k, "(absent)")) for k in sorted(old.keys() | new.keys())}
        changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}  # key: (then, now)
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


def build_system(cfg) -> AsymmetricDecoderTraining:
    """The networks and the training recipe, from the config (weights loaded where configured)."""
    vae = AsymmetricAutoencoderKL(**cfg.model.autoencoder)
    warm_keys = []
    if cfg.model.vae_ckpt:
        from ldm import load_into
        try:
            report = load_into(vae, cfg.model.vae_ckpt)
        except CheckpointError as err:  # unreadable, or widths that do not match model.autoencoder
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
        sample_posterior=cfg.model.sample_posterior, warm_start_keys=warm_keys,
        channels_last=cfg.model.channels_last, compile=cfg.model.compile, run_config=to_container(cfg))


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


def fit(argv=None, extra_callbacks=()) -> None:
    """Parse, check, build and train; errors are raised (main turns them into exit codes)."""
    args = parse_args(argv)
    files = args.config or [str(ROOT / "configs" / "demo.yaml")]
    cfg = load_config(ROOT / "configs" / "base.yaml", files, args.overrides)
    name = args.name or Path(files[-1]).stem
    run_dir = Path(cfg.run.log_dir) / name
    if args.print_run_dir:
        print(run_dir)
        return
    resume = resolve_resume(args.resume, run_dir)
    start_over = is_rank_zero() and args.resume is None and (run_dir / "checkpoints").exists()
    if start_over and not cfg.run.overwrite:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints: pass --resume auto to continue, "
                          f"--name NAME for a new run, or run.overwrite=true to start over")
    check_inputs(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    system = build_system(cfg)
    if resume is not None:
        check_resume(cfg, system, resume, hint=f"resume with that run's config: -c {run_dir / 'config.yaml'} "
                                               f"--name {name}")
    # a latent cache (scripts/cache_latents.py) must come from this run's frozen encoder
    datamodule = ImageMaskDataModule(**cfg.data, encoder_fingerprint=encoder_fingerprint(system.vae))
    trainer = build_trainer(cfg, run_dir, name, extra_callbacks)
    if start_over:  # only now that everything is built: a config error must not cost the old run
        clear_checkpoints(run_dir)  # else --resume auto would later pick the old run's newest step
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer.fit(system, datamodule=datamodule, ckpt_path=resume)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
