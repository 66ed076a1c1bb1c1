"""The one-pass adaptive GAN weight equals the official two-pass definition."""
import math

import pytest
import torch

from ldm import build_autoencoder
from ldm.models.asym_decoder import lr_lambda
from ldm.modules.losses import NLayerDiscriminator, adaptive_weight, adaptive_weight_from_output_grads, generator_loss


@pytest.mark.parametrize("family", ["sd", "qwenimage"])
def test_output_grad_adaptive_weight_matches_official_definition(family):
    """The same number by two routes: in float64, so that the test holds whatever CPU kernels sum the float32
    gradients (their order differs between the routes). Qwen-Image's decode clamps its output: with conv_out
    scaled so that the clamp acts, its gradient must still pass (straight-through) for the routes to agree."""
    torch.manual_seed(0)
    vae = build_autoencoder(family=family, ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)
    vae = vae.double()
    z_channels = vae.config["z_channels"]
    if family == "qwenimage":
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(30)
    disc = NLayerDiscriminator(ndf=8, n_layers=2).double()
    image = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    mask = (torch.rand(2, 1, 32, 32) > 0.5).double()
    captured = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    recon = vae.decode(torch.randn(2, z_channels, 4, 4, dtype=torch.float64), image, mask)
    hook.remove()
    assert family == "sd" or (recon.abs() == 1).any()  # the clamp acts
    nll = (recon - image).abs().sum() / 2
    g = generator_loss(disc(recon))
    reference = adaptive_weight(nll, g, vae.decoder.conv_out.weight)
    grad_nll = torch.autograd.grad(nll, recon, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, recon, retain_graph=True)[0]
    ours = adaptive_weight_from_output_grads(vae.decoder.conv_out, captured[0], grad_nll, grad_g)
    assert reference > 0 and ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)


def test_adaptive_weight_is_zero_not_nan_on_overflow():
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    feats = torch.randn(1, 4, 8, 8)
    bad = torch.full((1, 3, 8, 8), float("inf"))
    w = adaptive_weight_from_output_grads(conv, feats, torch.randn(1, 3, 8, 8), bad)
    assert w.item() == 0.0


def test_lr_schedule_warmup_then_cosine():
    """Linear warm-up (s + 1) / warmup, then cosine (not linear) decay to min_ratio at total_steps, held there."""
    f = lr_lambda(warmup_steps=10, total_steps=110, min_ratio=0.0)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)], rel=1e-12)  # not a step
    # progress 1/4, 1/2, 3/4 of the decay: cosine 0.854, 0.5, 0.146 (linear would give 0.75, 0.5, 0.25)
    assert [f(s) for s in (10, 35, 60, 85, 110, 500)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.sqrt(0.5), 0.5, 0.5 - 0.5 * math.sqrt(0.5), 0.0, 0.0], abs=1e-12)
    floor = lr_lambda(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert [floor(s) for s in (35, 110, 500)] == pytest.approx([0.1 + 0.9 * (0.5 + 0.5 * math.sqrt(0.5)), 0.1, 0.1])
