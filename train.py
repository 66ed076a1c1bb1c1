"""Train the asymmetric decoder.

    python train.py [-c CONFIG.yaml ...] [key=value ...] [--resume auto|PATH] [--name NAME]

Configs merge over configs/base.yaml in order, then the key=value overrides; with no config the demo
(configs/demo.yaml) runs. The run folder is <run.log_dir>/<name>/ with config.yaml, metrics.csv,
checkpoints/ and samples/.
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from data import ImageMaskDataModule, LogSkippedFiles
from ldm import AsymmetricAutoencoderKL
from ldm.callbacks import ImagesPerSecond, SampleGrids
from ldm.config import ConfigError, load_config, to_container
from ldm.models.asym_decoder import AsymmetricDecoderTraining, LossConfig, OptimConfig
from ldm.modules.losses import NLayerDiscriminator, PerceptualLoss

ROOT = Path(__file__).resolve().parent
# expected here: the frozen encoder and LPIPS stay in eval mode; manual optimisation checkpoints post-step
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], help="YAML merged over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=8")
    p.add_argument("--resume", default=None, help="'auto' (the run folder's last checkpoint) or a .ckpt path")
    p.add_argument("--name", default=None, help="run name (default: the last config file's name)")
    return p.parse_args(argv)


def is_rank_zero() -> bool:
    """True in the launching process (before DDP workers exist) and on global rank 0."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def resolve_resume(resume, ckpt_dir: Path):
    """The checkpoint to resume from, or None to start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    return resume


def build_system(cfg) -> AsymmetricDecoderTraining:
    """The networks and the training recipe, from the config (weights loaded where configured)."""
    vae = AsymmetricAutoencoderKL(**cfg.model.autoencoder)
    warm_keys = []
    if cfg.model.vae_ckpt:
        from ldm import load_into
        report = load_into(vae, cfg.model.vae_ckpt)
        warm_keys = [k for k in report.loaded if k.startswith(("decoder.", "post_quant_conv."))]
    perceptual = PerceptualLoss(**cfg.perceptual) if cfg.loss.perceptual_weight > 0 else None
    return AsymmetricDecoderTraining(
        vae, NLayerDiscriminator(**cfg.discriminator), perceptual,
        loss=LossConfig(**cfg.loss), optim=OptimConfig(**cfg.optim), batch_size=cfg.data.batch_size,
        sample_posterior=cfg.model.sample_posterior, warm_start_keys=warm_keys,
        channels_last=cfg.model.channels_last, run_config=to_container(cfg))


def build_loggers(cfg, run_dir: Path, name: str):
    loggers = [CSVLogger(save_dir=str(run_dir.parent), name=name, version="")]  # -> <run_dir>/metrics.csv
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
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.run.checkpoint_every_n_steps, save_last=True,
                        save_top_k=cfg.run.keep_last_k, monitor="step", mode="max"),
        SampleGrids(run_dir / "samples", cfg.run.sample_images),
        ImagesPerSecond(),
        LogSkippedFiles(),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.ema.decay is not None:
        callbacks.append(EMAWeightAveraging(decay=cfg.ema.decay))
    kwargs = to_container(cfg.trainer)
    if kwargs.get("strategy", "auto") == "auto":
        # the discriminator sits idle before disc_start: DDP must tolerate parameters without gradients
        kwargs["strategy"] = "ddp_find_unused_parameters_true" if _several_processes(kwargs) else "auto"
    return pl.Trainer(default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir, name),
                      callbacks=callbacks, check_val_every_n_epoch=None, **kwargs)


def _several_processes(kwargs) -> bool:
    devices = kwargs.get("devices", "auto")
    many = devices not in ("auto", 1, "1", [0]) and not (isinstance(devices, list) and len(devices) == 1)
    if devices == "auto":
        import torch
        many = torch.cuda.device_count() > 1
    return many or int(kwargs.get("num_nodes", 1)) > 1


def main(argv=None, extra_callbacks=()) -> int:
    args = parse_args(argv)
    files = args.config or [str(ROOT / "configs" / "demo.yaml")]
    cfg = load_config(ROOT / "configs" / "base.yaml", files, args.overrides)
    name = args.name or Path(files[-1]).stem
    run_dir = Path(cfg.run.log_dir) / name
    resume = resolve_resume(args.resume, run_dir / "checkpoints")
    if is_rank_zero() and args.resume is None and (run_dir / "checkpoints").exists() and not cfg.run.overwrite:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints: pass --resume auto to continue, "
                          f"--name NAME for a new run, or run.overwrite=true to start over")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = ImageMaskDataModule(**cfg.data)
    system = build_system(cfg)
    trainer = build_trainer(cfg, run_dir, name, extra_callbacks)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer.fit(system, datamodule=datamodule, ckpt_path=resume)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
