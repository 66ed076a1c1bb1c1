"""What the benchmarks share: the run's config with the GAN on, one fixed batch, our system in a real pl.Trainer on
that batch, and one process per measured variant. Also a harness for tests that train a system on a fixed batch."""
import concurrent.futures as futures
import multiprocessing
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # ldm and data from a checkout

from ldm.training.config import ConfigError, load_config  # noqa: E402


def load(files, overrides, batch_size=None, compile_blocks=False):
    """The run's config, with the GAN on from step 0; a value the benchmark cannot run raises ConfigError."""
    extra = ["loss.disc_start=0"] + ([f"data.batch_size={batch_size}"] if batch_size is not None else [])
    extra += ["model.compile=true"] if compile_blocks else []
    cfg = load_config(ROOT / "configs" / "base.yaml", files, [*overrides, *extra])
    if cfg.loss.disc_weight <= 0:
        raise ConfigError("loss.disc_weight must be > 0: the benchmark measures the full step with the GAN")
    return cfg


def pick_device(cfg) -> torch.device:
    wants_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def make_batch(cfg, device, seed=0):
    """One fixed batch: image (B,3,H,W) in [-1,1]; mask (B,1,H,W) with 1..3 rectangular holes (1 = hole)."""
    g = torch.Generator().manual_seed(seed)
    b, r = cfg.data.batch_size, cfg.data.resolution
    image = torch.rand(b, 3, r, r, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, r, r)
    for i in range(b):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            y, x = torch.randint(0, r // 2, (2,), generator=g).tolist()
            h, w = torch.randint(r // 8, r // 2, (2,), generator=g).tolist()
            mask[i, :, y:y + h, x:x + w] = 1.0
    return image.to(device), mask.to(device)


def build_ours(cfg):
    from ldm.training.run import build_system
    return build_system(cfg)  # model.compile: the Trainer's configure_model compiles the blocks


def fit_ours(system, cfg, image, mask, steps, callbacks=(), extra=None, first_batch=None):
    """Run `steps` real training steps of `system` in a pl.Trainer on the repeated batch (plus `extra` entries);
    `first_batch` (image, mask): another batch for the first step."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    batch = {"image": image, "mask": mask, **(extra or {})}
    trainer = pl.Trainer(accelerator=image.device.type if image.device.type == "cuda" else "cpu", devices=1,
                         precision=cfg.trainer.precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    batches = [batch] * steps  # the same tensors every step
    if first_batch is not None:
        batches[0] = {"image": first_batch[0], "mask": first_batch[1]}
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(system, train_dataloaders=loader)
    return trainer


def quiet():
    import logging
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def in_child(fn, *args, preload=()):
    """fn(*args) in a fresh process: its own peak memory, no state shared between variants.

    CUDA: spawned (CUDA does not survive a fork). CPU: forked from this process, which has imported the
    heavy modules (ldm.training.run, and the `preload` module names) once and run no torch compute (no OpenMP pool to inherit).
    """
    method = "spawn" if torch.cuda.is_available() else "fork"
    if method == "fork":
        import importlib

        import ldm.training.run  # noqa: F401
        for name in preload:
            importlib.import_module(name)
    with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
        return pool.submit(fn, *args).result()


def gib(n):
    return f"{n / 2**30:.2f} GiB"
