"""16-mixed with a GradScaler (run on the CPU's fp16 autocast): one scaler update per step for both optimisers."""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import harness  # noqa: E402
from test_benchmark import TINY  # noqa: E402


def test_fp16_scaler_updates_once_per_step_and_steps_both_networks():
    # harness.load sets loss.disc_start=0: the GAN from step 0
    cfg = harness.load([], [*TINY, "data.resolution=32"])
    torch.manual_seed(0)
    system = harness.build_ours(cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    updates = []
    update = scaler.update
    scaler.update = lambda *a, **k: (updates.append(scaler.get_scale()), update(*a, **k))[1]
    before = [p.detach().clone() for p in system.discriminator.parameters()]
    conv_out = system.vae.decoder.conv_out.weight.detach().clone()
    image, mask = harness.make_batch(cfg, torch.device("cpu"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(system, train_dataloaders=DataLoader([{"image": image, "mask": mask}] * 3, batch_size=None))
    assert trainer.global_step == 3  # decoder steps only: the discriminator's step does not count
    assert len(updates) == 3  # one update per backward, after both optimisers (two would rescale between them)
    assert any(not torch.equal(a, b) for a, b in zip(before, system.discriminator.parameters()))
    assert not torch.equal(conv_out, system.vae.decoder.conv_out.weight)  # the scaler did not skip every step
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
