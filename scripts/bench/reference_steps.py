"""Reference training steps in plain PyTorch, timed against ours by scripts/bench/benchmark.py.

- `OfficialStep`: what the paper's code (ldm AutoencoderKL + LPIPSWithDiscriminator under PL 1.4 with two
  optimisers) does per batch: the whole forward for the decoder step, the adaptive weight from two extra
  partial backward passes (autograd.grad of nll and g w.r.t. conv_out.weight), backward, Adam step; then
  the WHOLE forward again (encoder + decoder) for the discriminator step. PL 1.4's `toggle_optimizer`
  freezes the other optimiser's parameters in each half, as here.
- `NaiveStep`: the single-forward loop a user would write around `diffusers.AsymmetricAutoencoderKL`,
  `lpips.LPIPS` and a PatchGAN (taming's adaptive weight copied verbatim), fp32-style, no layout tricks.

Both take the batch as tensors on the device and return their loss values (0-dim tensors, no sync).
"""
import contextlib
import time

import torch

from ldm import build_autoencoder
from ldm.training.config import to_container
from ldm.modules.losses import NLayerDiscriminator, adaptive_weight, generator_loss, hinge_d_loss

# Lightning precision -> autocast dtype (None: fp32, no autocast); ours (cached encoder timing) and the references
PRECISIONS = {"32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
              "16": torch.float16, "16-mixed": torch.float16}
REFERENCE_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")  # no GradScaler in the reference loops: no fp16


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a Lightning precision string (32-true: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mark(device):
    """Now, for timing steps: a CUDA event recorded on the current stream (no host sync), else the host clock.
    Timed by events, a step is the device's time from the previous step's end to its own: the idle time its
    own host syncs cause counts, and the timing adds none."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def mark_step_end(device, marks, after_warmup=None):
    """Append the mark of a step's end to `marks` (marks[0]: the start); `after_warmup` (n, fn): fn() once n
    steps have ended."""
    marks.append(mark(device))
    if after_warmup and len(marks) == after_warmup[0] + 1:
        after_warmup[1]()


def durations(marks):
    """Seconds between consecutive marks (CUDA: waits once, for the last event)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


def adam(params, lr):
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))


class OfficialStep:
    """The official recipe per batch: two full forwards, adaptive weight by two extra partial backwards."""

    def __init__(self, vae, discriminator, perceptual, lr=1e-4, disc_weight=0.8, sample_posterior=True,
                 precision="32-true"):
        self.vae, self.disc, self.perceptual = vae, discriminator, perceptual
        self.disc_weight, self.sample_posterior, self.precision = disc_weight, sample_posterior, precision
        vae.freeze_all_but_decoder()
        self.gen_params = list(vae.decoder.parameters())
        self.opt_g = adam(self.gen_params, lr)
        self.opt_d = adam(discriminator.parameters(), lr)
        vae.train()
        vae.encoder.eval()
        discriminator.train()

    def forward(self, image, mask):
        """ldm AutoencoderKL.forward: encode, sample, decode (the encoder is frozen, so builds no graph)."""
        posterior = self.vae.encode(image)
        z = posterior.sample() if self.sample_posterior else posterior.mode()
        return self.vae.decode(z, image, mask, check=False)

    def step(self, image, mask):
        device = image.device
        # optimizer_idx 0: the discriminator is toggled off (PL's toggle_optimizer)
        self.disc.requires_grad_(False)
        with autocast_for(self.precision, device):
            recon = self.forward(image, mask)
            logits_fake = self.disc(recon.contiguous())
        recon = recon.float()
        # ldm: rec_loss = |x - x_rec| + w * LPIPS per pixel, nll = sum / batch (LPIPS in fp32 here)
        rec = (image.float() - recon).abs() + self.perceptual(image.float(), recon).view(-1, 1, 1, 1)
        nll = rec.sum() / rec.shape[0]
        g_loss = generator_loss(logits_fake)
        d_weight = adaptive_weight(nll, g_loss, self.vae.decoder.conv_out.weight) * self.disc_weight
        self.opt_g.zero_grad(set_to_none=True)
        (nll + d_weight * g_loss).backward()
        self.opt_g.step()
        self.disc.requires_grad_(True)
        # optimizer_idx 1: the generator is toggled off; the whole forward runs again
        for p in self.gen_params:
            p.requires_grad_(False)
        with autocast_for(self.precision, device):
            recon = self.forward(image, mask)
            logits_real = self.disc(image.contiguous().detach())
            logits_fake = self.disc(recon.contiguous().detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        for p in self.gen_params:
            p.requires_grad_(True)
        return dict(nll=nll.detach(), g_loss=g_loss.detach(), d_weight=d_weight.detach() / self.disc_weight,
                    d_loss=d_loss.detach())


def naive_lpips():
    """lpips.LPIPS(vgg) as a user builds it; random trunk (pnet_rand) so nothing downloads."""
    import warnings

    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)


class NaiveStep:
    """One forward, taming's loss (adaptive weight by autograd.grad), backward, step; disc on the detached output.
    Autocast around the forwards only; the discriminator is frozen for the generator's backward."""

    def __init__(self, autoencoder: dict, ndf=64, n_layers=3, lr=1e-4, disc_weight=0.8, precision="32-true",
                 device="cpu"):
        from diffusers import AsymmetricAutoencoderKL as DiffusersAsymKL
        with torch.device("meta"):  # only its config.json: the same as an export's
            config, _ = build_autoencoder(**autoencoder).diffusers_form()
        self.vae = DiffusersAsymKL.from_config(config).to(device)
        self.lpips = naive_lpips().to(device)
        self.disc = NLayerDiscriminator(ndf=ndf, n_layers=n_layers).to(device)
        self.disc_weight, self.precision = disc_weight, precision
        self.vae.requires_grad_(False)
        self.vae.decoder.requires_grad_(True)  # diffusers' MaskConditionDecoder
        self.opt_g = adam(self.vae.decoder.parameters(), lr)
        self.opt_d = adam(self.disc.parameters(), lr)
        self.vae.train()
        self.disc.train()

    def step(self, image, mask):
        self.disc.requires_grad_(False)  # generator half: gradients reach the decoder, none the PatchGAN's weights
        with autocast_for(self.precision, image.device):
            with torch.no_grad():
                z = self.vae.encode(image).latent_dist.sample()
            recon = self.vae.decode(z, image=image, mask=mask).sample
            rec_loss = (image - recon).abs() + self.lpips(image, recon)  # taming: per-pixel, then the mean
            nll = rec_loss.mean()
            g_loss = -self.disc(recon).mean()
        d_weight = self.adaptive_weight(nll, g_loss) * self.disc_weight
        self.opt_g.zero_grad()
        (nll + d_weight * g_loss).backward()
        self.opt_g.step()
        self.disc.requires_grad_(True)
        with autocast_for(self.precision, image.device):
            logits_real = self.disc(image)
            logits_fake = self.disc(recon.detach())
            d_loss = 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        return dict(nll=nll.detach(), g_loss=g_loss.detach(), d_loss=d_loss.detach())

    def adaptive_weight(self, nll, g_loss):
        """taming's calculate_adaptive_weight, w.r.t. the decoder's last layer."""
        last_layer = self.vae.decoder.conv_out.weight
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach()


# ----------------------------------------------------------------------------- driven by benchmark.py


def build_reference(name, cfg, precision, device):
    """The reference loop `name` (official | naive) for the run's config, seeded like ours."""
    from ldm.training.run import build_system
    torch.manual_seed(cfg.seed)
    lr = cfg.optim.base_lr * cfg.data.batch_size
    if name == "naive":
        return NaiveStep(to_container(cfg.model.autoencoder), ndf=cfg.discriminator.ndf,
                         n_layers=cfg.discriminator.n_layers, lr=lr, disc_weight=cfg.loss.disc_weight,
                         precision=precision, device=device)
    system = build_system(cfg).to(device)  # the same networks as ours, driven by the official loop ...
    system.to(memory_format=torch.contiguous_format)  # ... in the official layout (model.channels_last is ours)
    return OfficialStep(system.vae, system.discriminator, system.perceptual, lr=lr,
                        disc_weight=cfg.loss.disc_weight, sample_posterior=cfg.model.sample_posterior,
                        precision=precision)


def run_reference(name, cfg, image, mask, n_steps, precision, after_warmup=None):
    """Seconds of each of n_steps reference steps (between marks, see `mark`); `after_warmup` (n, fn): fn() once
    n steps have ended."""
    step = build_reference(name, cfg, precision, image.device)
    sync(image.device)
    marks = [mark(image.device)]
    for _ in range(n_steps):
        step.step(image, mask)
        mark_step_end(image.device, marks, after_warmup)
    return durations(marks)
