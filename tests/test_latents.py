"""Which latent the decoder sees: training decodes a posterior sample (mean + exp(logvar / 2) * eps), by formula and
as diffusers' DiagonalGaussianDistribution draws it, from the encoder or a latent cache; the latent-noise lever adds
tau * n on top; validation decodes the posterior mean, and with the robustness check also the mean perturbed by
fixed noise per image."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import harness  # noqa: E402
from test_train import TINY  # noqa: E402

diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.vae")


@pytest.fixture(scope="module")
def build():
    """build(*overrides) -> (system, cfg), the GAN on from step 0 (harness.load); one untrained LPIPS for all (lpips
    builds a whole VGG16 each time)."""
    import ldm.training.run
    shared = {}

    def perceptual(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in shared:
            shared[key] = real(**kwargs)
        return shared[key]

    real = ldm.training.run.PerceptualLoss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.training.run, "PerceptualLoss", perceptual)

        def make(*overrides):
            cfg = harness.load([], [*TINY, "loss.perceptual_weight=0", *overrides])  # LPIPS: validation only
            torch.manual_seed(0)
            return harness.build_ours(cfg), cfg
        yield make


def watch(system):
    """Records each latent vae.decode receives and the state of each generator noise_generator hands out."""
    seen = {"z": [], "generator": []}
    decode, make = system.vae.decode, system.noise_generator

    def recording_decode(z, *args, **kwargs):
        seen["z"].append(z.detach().clone())
        return decode(z, *args, **kwargs)

    def recording_generator(device):
        generator = make(device)
        seen["generator"].append(generator.get_state())
        return generator
    system.vae.decode, system.noise_generator = recording_decode, recording_generator
    return seen


def generator(state):
    return torch.Generator().set_state(state)


def batch(cfg, seed=0):
    return harness.make_batch(cfg, torch.device("cpu"), seed=seed)


@pytest.mark.parametrize("source", ["encoder", "cache"])
def test_training_decodes_mean_plus_std_times_eps_as_diffusers_samples(build, source):
    """The cache's logvar is log 4 (std 2, variance 4): a variance or exp(logvar) in place of the std is off by 2x;
    the random encoder's logvar is about -0.2 (std 0.9, variance 0.8)."""
    system, cfg = build()
    image, mask = batch(cfg)
    with torch.no_grad():
        posterior = system.vae.encode(image)
    mean, logvar = posterior.mean, posterior.logvar
    extra = None
    if source == "cache":
        mean, logvar = mean + 0.5, torch.full_like(logvar, math.log(4.0))
        extra = {"mean": mean, "logvar": logvar}
    seen = watch(system)
    harness.fit_ours(system, cfg, image, mask, steps=1, extra=extra)
    (z,), (state,) = seen["z"], seen["generator"]
    eps = torch.randn(mean.shape, generator=generator(state))
    want = mean.double() + torch.exp(0.5 * logvar.double()) * eps.double()
    torch.testing.assert_close(z.double(), want, rtol=0, atol=1e-5)
    theirs = diffusers_vae.DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).sample(generator(state))
    torch.testing.assert_close(z, theirs, rtol=0, atol=1e-6)
    assert (z - mean).abs().mean() > 0.3  # a sample, not the mean


def test_without_sampling_training_decodes_the_mean(build):
    system, cfg = build("model.sample_posterior=false")
    image, mask = batch(cfg)
    seen = watch(system)
    harness.fit_ours(system, cfg, image, mask, steps=1)
    with torch.no_grad():
        torch.testing.assert_close(seen["z"][0], system.vae.encode(image).mean, rtol=0, atol=1e-6)


def test_latent_noise_adds_tau_times_noise_with_tau_per_sample_up_to_its_maximum(build):
    """model.latent_noise=0.4: z = mean + std * eps + tau * n / 0.18215 (SD's latent_norm: the noise is added to the
    diffusion model's latents), tau = 0.4 * U(0, 1) per sample, eps, tau, n drawn in that order from the step's
    generator (the resume test pins that generator to the run's micro-batch)."""
    system, cfg = build("model.latent_noise=0.4", "data.batch_size=4")
    assert system.latent_noise == 0.4 and system.vae.latent_norm.scale == (0.18215,)
    image, mask = batch(cfg)
    with torch.no_grad():
        posterior = system.vae.encode(image)
    seen = watch(system)
    harness.fit_ours(system, cfg, image, mask, steps=1)
    (z,), (state,) = seen["z"], seen["generator"]
    g = generator(state)
    eps = torch.randn(z.shape, generator=g)
    tau = 0.4 * torch.rand(z.shape[0], 1, 1, 1, generator=g)
    n = torch.randn(z.shape, generator=g)
    want = posterior.mean.double() + posterior.std.double() * eps.double() + tau.double() * n.double() / 0.18215
    torch.testing.assert_close(z.double(), want, rtol=0, atol=1e-5)
    residual = (z - posterior.sample(generator(state))).flatten(1).std(1) * 0.18215  # about tau, one per sample
    assert residual.max() > 2 * residual.min() and residual.max() < 0.4 * 1.5, residual


def test_validation_decodes_the_mean_and_the_robustness_check_a_fixed_perturbation(build):
    """Validation decodes the posterior mean (the paper's evaluation), never a sample. With model.val_latent_noise=0.5
    it also decodes mean + 0.5 * n / 0.18215 (SD's latent_norm), n standard normal and fixed per validation image (the
    same in another batch), and reports the known region's metrics there as noisy_*."""
    system, cfg = build("model.val_latent_noise=0.5")
    image, mask = batch(cfg)
    system.eval()
    seen = watch(system)
    with torch.no_grad():
        mean = system.vae.encode(image).mean
        system.on_validation_epoch_start()
        system.validation_step({"image": image, "mask": mask, "index": torch.tensor([3, 8])}, 0)
        system.validation_step({"image": image[1:], "mask": mask[1:], "index": torch.tensor([8])}, 1)
    clean, noisy, clean_alone, noisy_alone = seen["z"]
    torch.testing.assert_close(clean, mean, rtol=0, atol=1e-6)
    n = (noisy - mean) * 0.18215 / 0.5
    assert n.std().item() == pytest.approx(1.0, abs=0.15) and abs(n.mean().item()) < 0.15  # 128 draws
    torch.testing.assert_close(noisy_alone[0], noisy[1], rtol=0, atol=1e-5)  # image 8's noise, whatever its batch
    assert not torch.allclose(n[0], n[1], atol=0.1)
    sums = system.val_sums
    assert {"noisy_psnr_known", "noisy_lpips_known", "noisy_pre_error", "noisy_de2000_known"} <= set(sums)
    assert not any(k.startswith("noisy_") and "hole" in k for k in sums)
    assert sums["noisy_psnr_known"][0] != sums["psnr_known"][0]

    plain, _ = build()
    plain.eval()
    seen = watch(plain)
    with torch.no_grad():
        plain.on_validation_epoch_start()
        plain.validation_step({"image": image, "mask": mask, "index": torch.tensor([3, 8])}, 0)
    assert len(seen["z"]) == 1 and not any(k.startswith("noisy_") for k in plain.val_sums)  # off by default
