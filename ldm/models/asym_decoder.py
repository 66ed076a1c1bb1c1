"""The training recipe: frozen encoder, trainable asymmetric decoder, L1 + LPIPS + PatchGAN (any family)."""
import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import nn

from data.masks import seed_of

from ..metrics import region_metrics
from ..modules.common import AsymmetricAutoencoder, Block, DiagonalGaussianDistribution
from ..modules.losses import (adaptive_weight_from_output_grads, discriminator_loss, generator_loss,
                              reconstruction_losses)
from .nonfinite import NonFiniteSteps

NOISE_STREAM = 7  # seed-sequence tag of the posterior samples and latent noise (data/datasets.py lists the others)
VAL_NOISE_STREAM = 8  # the fixed noise of validation's perturbed latents (model.val_latent_noise)
# what validation reports on the perturbed latents (as val/noisy_<name>): the known region's
NOISY_METRICS = ("psnr_known", "ssim_known", "lpips_known", "pre_error", "de2000_known")


@dataclass
class LossConfig:
    """Loss weights; the GAN terms are off before `disc_start` optimiser steps (DESIGN.md: 50001)."""
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    hole_weight: float = 1.0
    known_weight: float = 1.0
    disc_weight: float = 0.8
    disc_start: int = 50001
    disc_loss: str = "hinge"


@dataclass
class OptimConfig:
    """Adam for both networks; lr = base_lr x global batch, warm-up then cosine to `min_lr_ratio`."""
    base_lr: float = 4.5e-6
    betas: tuple = (0.5, 0.9)
    warmup_steps: int = 5000
    min_lr_ratio: float = 0.0
    warm_start_lr_scale: float = 0.1  # decoder weights loaded from SD (x1) train at lr x this
    grad_clip: float = 0.0  # max global grad norm per network; 0 = off
    accumulate_grad_batches: int = 1
    fused: Optional[bool] = None  # None = fused Adam on CUDA and CPU


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimiser step s: linear warm-up, then cosine decay to min_ratio."""
    def fn(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """torch.compile, in place, each block of `module` (its family's Blocks: SD's ResnetBlock, AttnBlock, Upsample,
    Downsample; the Blend) and each GroupNorm outside them (norm_out); names, hooks and state_dict keys stay.
    Returns how many. `backend`: "inductor", or "aot_eager" / "eager" to debug a compile problem.

    Inductor fuses GroupNorm, SiLU and the residual add around cuDNN's convs and keeps channels_last through
    GroupNorm, upsampling and the mask blend (eager CUDA GroupNorm returns NCHW: two layout copies per call).
    Static shapes: one graph per block shape, so the recompile limit is raised to hold a decoder's (and its
    backward's) shapes.
    """
    import torch._dynamo.config as dynamo_config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    units = [m for m in module.modules() if isinstance(m, (Block, nn.GroupNorm))]
    inside = {id(n) for b in units for n in b.modules() if n is not b}
    blocks = [m for m in units if id(m) not in inside]  # the outermost: a block's own norms compile with it
    for m in blocks:
        m.compile(backend=backend, dynamic=False)
    return len(blocks)


def _drop_saved_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forgive_missing_keys(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not re.search(r"(^|\.)perceptual\.", k)]


def keep_out_of_checkpoints(perceptual: nn.Module) -> None:
    """The frozen LPIPS network is rebuilt from its own files: no copy in state_dicts (or EMA copies)."""
    perceptual.register_state_dict_post_hook(_drop_saved_keys)
    perceptual.register_load_state_dict_post_hook(_forgive_missing_keys)


class AsymmetricDecoderTraining(pl.LightningModule):
    """Trains `vae.decoder` with one decoder forward per batch; encoder, quant_conv and post_quant_conv stay frozen."""

    def __init__(self, vae: AsymmetricAutoencoder, discriminator: nn.Module, perceptual: Optional[nn.Module],
                 loss: Optional[LossConfig] = None, optim: Optional[OptimConfig] = None, batch_size: int = 1,
                 sample_posterior: bool = True, latent_noise: float = 0.0, val_latent_noise: float = 0.0,
                 warm_start_keys: Iterable[str] = (), channels_last: bool = False,
                 compile: Union[bool, str, None] = None, run_config: Optional[dict] = None, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.vae, self.discriminator, self.perceptual = vae, discriminator, perceptual
        self.loss_cfg, self.optim_cfg = loss or LossConfig(), optim or OptimConfig()
        self.batch_size, self.sample_posterior, self.seed = batch_size, sample_posterior, int(seed)
        self.latent_noise, self.val_latent_noise = float(latent_noise), float(val_latent_noise)
        self._noise = None  # the posterior sample's generator, on the device, reseeded every batch
        self.warm_start_keys = set(warm_start_keys)  # names relative to vae, e.g. "decoder.conv_in.weight"
        if perceptual is not None:
            keep_out_of_checkpoints(perceptual)
        vae.freeze_all_but_decoder()
        self.channels_last, self.run_config = channels_last, run_config
        self.compile_backend = "inductor" if compile is True else (compile or None)  # None: eager
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.val_sums = {}
        self.val_example = None  # (image, recon, mask) of the first validation batch, for SampleGrids
        self.nonfinite = NonFiniteSteps()  # steps skipped for a non-finite loss or gradient, read without a sync

    def configure_model(self):
        """Under a Trainer only (fit / validate): compile, once, when configured, the decoder's and the frozen
        encoder's blocks (the encoder's when first called: never, on a latent cache), LPIPS and the
        discriminator (whole: their elementwise work around cuDNN's convs fuses, e.g. LPIPS' fp32 feature
        normalisation at full resolution)."""
        if self.compile_backend and not getattr(self, "_compiled", False):
            compile_blocks(self.vae.decoder, self.compile_backend)
            compile_blocks(self.vae.encoder, self.compile_backend)
            for net in (self.perceptual, self.discriminator):
                if net is not None:
                    net.compile(backend=self.compile_backend, dynamic=False)
            self._compiled = True

    # ------------------------------------------------------------------ train
    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.encoder.eval()  # frozen: no dropout, whatever the trainer asks
        return self

    @torch.no_grad()
    def latent(self, batch, image: torch.Tensor) -> torch.Tensor:
        """The latent the training step decodes (B,C,h,w), from the posterior of the full, unmasked image (the frozen
        encoder's, or the batch's cached "mean" and "logvar" from scripts/cache_latents.py: the encoder skipped):
        a sample mean + std * eps, std = exp(logvar / 2) (with sample_posterior false: the mean); then, with
        latent_noise > 0, tau * n added where the diffusion model works (vae.latent_norm: for SD, z + tau * n /
        0.18215), tau ~ U(0, latent_noise) per sample and n ~ N(0, I) (RAE's noise augmentation: the decoder learns
        to take a denoiser's imperfect latents). eps, tau and n are drawn in that order from noise_generator."""
        if "mean" in batch:
            posterior = DiagonalGaussianDistribution(torch.cat([batch["mean"], batch["logvar"]], dim=1))
        else:
            posterior = self.vae.encode(image)
        generator = self.noise_generator(image.device)
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        if self.latent_noise > 0:
            x = self.vae.latent_norm.to_diffusion(z)  # (B, C p^2, h/p, w/p): the diffusion model's latents
            tau = self.latent_noise * torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device,
                                                 dtype=x.dtype)
            z = self.vae.latent_norm.from_diffusion(
                x + tau * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        return z

    def noise_generator(self, device) -> Optional[torch.Generator]:
        """Under a Trainer, a generator seeded by (seed, rank, micro-batch of the run): the noise of a batch does
        not depend on what ran before, so a resumed run draws what the uninterrupted one drew. Else None (the
        global RNG)."""
        if self._trainer is None:
            return None
        if self._noise is None or self._noise.device != torch.device(device):
            self._noise = torch.Generator(device)
        return self._noise.manual_seed(seed_of(self.seed, NOISE_STREAM, self.global_rank,
                                               self.trainer.fit_loop.total_batch_idx))

    def inputs(self, batch):
        image, mask = batch["image"], batch["mask"]
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, mask

    def training_step(self, batch, batch_idx):
        image, mask = self.inputs(batch)
        step = self.global_step
        gan_on = self.loss_cfg.disc_weight > 0 and step >= self.loss_cfg.disc_start
        recon, features = self.decode_with_features(self.latent(batch, image), image, mask)
        recon32 = recon.float().detach().requires_grad_(True)  # losses in fp32; grads flow back via `recon`
        terms = self.recon_terms(recon32, image, mask)
        scale = recon[0].numel()  # official reduction: sum over pixels, mean over batch (matters for Adam's eps)
        grad = torch.autograd.grad(terms["nll"] * scale, recon32)[0]
        if gan_on:
            g_loss = generator_loss(self.discriminator(recon32))
            grad_g = torch.autograd.grad(g_loss, recon32)[0]
            d_weight = adaptive_weight_from_output_grads(self.vae.decoder.conv_out, features, grad, grad_g)
            grad = grad + self.loss_cfg.disc_weight * d_weight * grad_g
            d_loss = discriminator_loss(self.discriminator(image), self.discriminator(recon32.detach()),
                                        self.loss_cfg.disc_loss)
            terms.update(g_loss=g_loss.detach(), d_weight=d_weight, d_loss=d_loss.detach())
        # one backward: the decoder receives grad (L1 + LPIPS + weighted GAN), the discriminator d_loss only
        surrogate = (recon.float() * grad).sum() + (d_loss if gan_on else 0.0)
        self.optimizer_update(surrogate / self.optim_cfg.accumulate_grad_batches, gan_on, terms)
        # No host sync for logging: device tensors go to the logger, which reads them every log_every_n_steps;
        # what Lightning reads every batch (the progress bar) or would copy to the device (a Python number:
        # torch.tensor(x, device=...) waits for the queue) is a CPU tensor.
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False)
        self.log("train/skipped_nonfinite", torch.tensor(float(self.nonfinite.skipped)))
        self.log("train/loss", terms["nll"].detach())
        if self.nonfinite.loss is not None:
            self.log("loss", torch.tensor(self.nonfinite.loss), prog_bar=True, logger=False)

    def decode_with_features(self, z, image, mask):
        """Decoder forward that also returns conv_out's input (for the adaptive GAN weight)."""
        captured = []
        handle = self.vae.decoder.conv_out.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            recon = self.vae.decode(z, image, mask, check=False)
        finally:
            handle.remove()
        return recon, captured[-1]

    def recon_terms(self, recon, image, mask):
        c = self.loss_cfg
        return reconstruction_losses(recon, image, mask, self.perceptual, l1_weight=c.l1_weight,
                                     l2_weight=c.l2_weight, perceptual_weight=c.perceptual_weight,
                                     hole_weight=c.hole_weight, known_weight=c.known_weight)

    def completes_a_step(self) -> bool:
        """Whether the current micro-batch is the last of its optim.accumulate_grad_batches, so steps the optimisers
        (micro-batches counted over the whole run: batch_idx restarts each epoch)."""
        return (self.trainer.fit_loop.epoch_loop.total_batch_idx + 1) % self.optim_cfg.accumulate_grad_batches == 0

    def optimizer_update(self, loss, gan_on, terms):
        """Backward once, then step the decoder (counted as the global step) and, once on, the discriminator.

        A step whose loss terms or gradients are not finite changes no weights and is counted. With fused Adam
        (the default) and no GradScaler the device decides (Adam's `found_inf`: weights, moments and Adam's step
        count stay), so the step never waits for the device; the host reads the check once it has arrived,
        usually a step later, and the step still counts for global_step and the lr schedule, as with fp16's
        loss scaling. Otherwise (optim.fused=false, 16-mixed) the host waits for the check and skips the step.
        """
        opt_g, opt_d = self.optimizers()
        if not self.completes_a_step():  # DDP reduces the last micro-batch's gradients only
            with getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)():
                self.manual_backward(loss)
            return
        self.manual_backward(loss)
        # with a GradScaler (16-mixed) inf gradients are routine: the scaler skips those steps itself
        grads = [p.grad for p in self.parameters() if p.grad is not None] if self.grad_scaler() is None else []
        distributed = self.trainer.world_size > 1
        bad, check, names = self.nonfinite.check(terms, grads, distributed)
        on_device = self.skips_on_device(opt_g, opt_d)
        if on_device:
            opt_g.optimizer.found_inf = opt_d.optimizer.found_inf = bad
        self.nonfinite.queue(check, names, wait=not on_device, distributed=distributed)
        if not on_device and self.nonfinite.streak:  # this step was the non-finite one
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            return
        if self.optim_cfg.grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
            if gan_on:
                self.clip_gradients(opt_d, gradient_clip_val=self.optim_cfg.grad_clip,
                                    gradient_clip_algorithm="norm")
        if gan_on:  # not through LightningOptimizer: global_step counts decoder steps only
            scaler = self.grad_scaler()
            if scaler is None:
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            else:  # 16-mixed: one scaler.update() per backward, in opt_g.step() below, which sees both
                scaler.step(opt_d.optimizer)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        sched_g, sched_d = self.lr_schedulers()
        sched_g.step()
        if gan_on:
            sched_d.step()  # counts discriminator steps: its warm-up starts at disc_start

    def grad_scaler(self):
        """The precision plugin's GradScaler (16-mixed), else None."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def skips_on_device(self, *optimizers) -> bool:
        """Whether non-finite steps can be skipped by the device: fused Adam takes `found_inf`; a GradScaler
        (16-mixed) sets its own, and unfused Adam has none."""
        if self.grad_scaler() is not None:
            return False
        return all(g.get("fused") for opt in optimizers for g in opt.optimizer.param_groups)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx):
        """Decodes the posterior mean (deterministic, as the paper's evaluation) and, with val_latent_noise > 0, also
        the mean plus val_latent_noise * n in the diffusion model's latents (as latent_noise), n fixed per validation
        image (fixed_noise): the known region's metrics there are logged as val/noisy_<metric>."""
        image, mask = self.inputs(batch)
        z = self.vae.encode(image).mode()
        recon = self.vae.decode(z, image, mask, check=False).float().clamp(-1, 1)
        values = region_metrics(recon, image.float(), mask.float(), self.perceptual)
        values["l1"] = (recon - image).abs().mean(dim=(1, 2, 3))
        if self.val_latent_noise > 0:  # the noise where the diffusion model works, as latent_noise
            x = self.vae.latent_norm.to_diffusion(z)
            n = self.fixed_noise(batch, batch_idx, x)
            noisy = self.vae.decode(self.vae.latent_norm.from_diffusion(x + self.val_latent_noise * n), image, mask,
                                    check=False).float().clamp(-1, 1)
            known = region_metrics(noisy, image.float(), mask.float(), self.perceptual)
            values.update({f"noisy_{k}": known[k] for k in NOISY_METRICS if k in known})
        for name, v in values.items():  # NaN (an empty region) is left out of the mean
            total, count = self.val_sums.get(name, (0.0, 0))
            self.val_sums[name] = (total + torch.nansum(v.float()), count + (~v.isnan()).sum())
        if batch_idx == 0:
            self.val_example = (image[:8].detach(), recon[:8].detach(), mask[:8].detach())

    def fixed_noise(self, batch, batch_idx, z) -> torch.Tensor:
        """N(0, I) of z's shape, each sample's drawn from (seed, its validation index): the same whatever the batching,
        ranks or workers. The index is the batch's "index" (data.ImageMaskVal), else its position in the loop."""
        index = batch.get("index")
        if index is None:
            index = torch.arange(len(z)) + batch_idx * len(z)
        noise = [torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
            seed_of(self.seed, VAL_NOISE_STREAM, i))) for i in index.tolist()]
        return torch.stack(noise).to(z)

    def on_validation_epoch_start(self):
        self.val_sums = {}  # metric name -> (sum, count) of per-sample values on this rank

    def on_validation_epoch_end(self):
        strategy = self.trainer.strategy
        names = sorted(self.val_sums)  # same order on every rank: the reductions pair up
        if self.trainer.world_size > 1:  # a rank without validation images has none: rank 0's (it has image 0)
            names = strategy.broadcast(names, src=0)
        for name in names:
            total, count = (strategy.reduce(torch.as_tensor(t, device=self.device, dtype=torch.float64),
                                            reduce_op="sum") for t in self.val_sums.get(name, (0.0, 0)))
            self.log(f"val/{name}", (total / count).float() if count > 0 else torch.tensor(float("nan")),
                     rank_zero_only=True)

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        o = self.optim_cfg
        world = self.trainer.world_size if self._trainer is not None else 1
        lr = o.base_lr * world * self.batch_size * o.accumulate_grad_batches  # never typed in by hand
        groups = self.decoder_param_groups(lr)
        fused = o.fused if o.fused is not None else self.device.type in ("cuda", "cpu")  # one kernel per step
        opt_g = torch.optim.Adam(groups, lr=lr, betas=tuple(o.betas), fused=fused)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=tuple(o.betas), fused=fused)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 10**9
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(o.warmup_steps, total, o.min_lr_ratio))
        d_total = max(1, total - self.loss_cfg.disc_start)  # the discriminator trains from disc_start to the end
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(o.warmup_steps, d_total, o.min_lr_ratio))
        return [opt_g, opt_d], [sched_g, sched_d]

    def decoder_param_groups(self, lr):
        """The decoder optimiser's groups: fresh weights at lr, then (if any) those warm-started from SD at
        lr x optim.warm_start_lr_scale."""
        warm, new = [], []
        for name, p in self.vae.named_parameters():
            if p.requires_grad:
                (warm if name in self.warm_start_keys else new).append(p)
        groups = [{"params": new, "lr": lr}]
        if warm:
            groups.append({"params": warm, "lr": lr * self.optim_cfg.warm_start_lr_scale})
        return groups

    def on_save_checkpoint(self, checkpoint):
        self.nonfinite.read()  # the count saved is exact
        checkpoint["config"] = self.run_config  # runs describe themselves: export/eval rebuild from this
        checkpoint["skipped_nonfinite"] = self.nonfinite.skipped

    def on_load_checkpoint(self, checkpoint):
        self.nonfinite.skipped = checkpoint.get("skipped_nonfinite", 0)
