"""The latent normalisation (ldm/latent_norm.py): each family's own formula, by hand and against diffusers'
pipelines' arithmetic; how a base's null statistics are filled from the VAE file; old checkpoints' keys."""
import math

import pytest
import torch

from ldm import AsymmetricAutoencoderKL
from ldm.latent_norm import LatentNorm, agree, fill, upgrade

TINY = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)


def test_scalar_factors_are_sd_and_flux1s_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 4, 6, generator=g, dtype=torch.float64)
    norm = LatentNorm.from_factors(0.3611, 0.1159)
    latents = norm.to_diffusion(z)
    assert torch.equal(latents, (z - 0.1159) * 0.3611)  # what FLUX.1's pipelines feed the transformer
    assert torch.equal(norm.from_diffusion(latents), latents / 0.3611 + 0.1159)  # what they give vae.decode
    assert torch.allclose(norm.from_diffusion(latents), z, atol=1e-12)


def test_per_channel_statistics_are_qwen_images_formula():
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(16, dtype=torch.float64).tolist(), (torch.rand(16, dtype=torch.float64) + 0.5).tolist()
    z = torch.randn(1, 16, 3, 5, generator=g, dtype=torch.float64)
    norm = LatentNorm.from_mean_std(mean, std)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    assert torch.allclose(norm.to_diffusion(z), (z - m) / s, rtol=1e-14, atol=0)
    assert torch.allclose(norm.from_diffusion(norm.to_diffusion(z)), z, atol=1e-12)
    assert norm.channels == 16 and "16 channels" in norm.describe()


def test_batch_norm_over_2x2_patches_is_flux2s_formula():
    """FLUX.2: patchify (c, dy, dx) -> c*4 + dy*2 + dx, then a frozen BatchNorm2d(128, affine=False) in eval."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 32, 6, 4, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(128, affine=False, eps=1e-4).double().eval()
    bn.running_mean.copy_(torch.randn(128, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(128, generator=g, dtype=torch.float64) + 0.1)
    patched = z.view(2, 32, 3, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 128, 3, 2)  # written out by index
    norm = LatentNorm.from_batch_norm(bn.running_mean, bn.running_var, bn.eps, patch_size=2)
    with torch.no_grad():
        assert torch.allclose(norm.to_diffusion(z), bn(patched), rtol=1e-12, atol=1e-12)
    assert torch.allclose(norm.from_diffusion(norm.to_diffusion(z)), z, atol=1e-12)
    assert norm.scale[5] == 1 / math.sqrt(bn.running_var[5].item() + 1e-4)


def test_statistics_of_the_wrong_width_are_refused_naming_both():
    norm = LatentNorm.from_mean_std([0.0] * 16, [1.0] * 16)
    with pytest.raises(ValueError, match=r"latent_norm.shift has 16 values, the latents 4 channels"):
        norm.to_diffusion(torch.zeros(1, 4, 2, 2))


def test_a_bases_null_statistics_come_from_the_vae_file_and_stated_ones_must_agree():
    configured = {"patch_size": 2, "shift": None, "scale": None}
    stated = {"patch_size": 2, "shift": [0.5] * 128, "scale": [2.0] * 128}
    assert fill(configured, stated) == stated
    assert fill(configured, None) == configured  # no file: null, the identity
    assert LatentNorm.from_config(configured) == LatentNorm(patch_size=2)  # the identity
    assert agree(configured, stated) and not agree({"patch_size": 1}, stated)
    assert agree({"scale": [0.18215]}, {"scale": [0.18215 + 1e-9]})
    assert not agree({"scale": [0.18215]}, {"scale": [0.13025]})


def test_the_model_carries_its_normalisation_and_never_applies_it():
    norm = {"patch_size": 1, "shift": [0.1159], "scale": [0.3611]}
    torch.manual_seed(0)
    a = AsymmetricAutoencoderKL(**TINY, z_channels=16, embed_dim=16, use_quant_conv=False, latent_norm=norm).eval()
    torch.manual_seed(0)
    b = AsymmetricAutoencoderKL(**TINY, z_channels=16, embed_dim=16, use_quant_conv=False).eval()
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z))
    assert a.config["latent_norm"] == norm and a.latent_norm == LatentNorm((0.1159,), (0.3611,))


def test_checkpoints_saved_with_scalar_factors_read_as_latent_norm():
    kw = upgrade({"z_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "base": "flux"})
    assert kw == {"z_channels": 16, "base": "flux",
                  "latent_norm": {"patch_size": 1, "shift": [0.1159], "scale": [0.3611]}}
    assert upgrade({"latent_norm": None}) == {"latent_norm": None}
