"""Tiled and sliced decoding (ldm/tiling.py) against the untiled decode, on a tiny-width decoder."""
import copy
import math

import pytest
import torch
from torch import nn

from ldm.modules.autoencoder import AsymmetricAutoencoderKL
from ldm.tiling import auto_tile, spans

MIN_PSNR_DB = 80.0  # tiled vs untiled (float32); measured 106-130 dB (README, Decoding at any resolution)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    # ch 32 at every level, one ResnetBlock per level: a 1024 px decode in seconds, every part of the real one
    return AsymmetricAutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, encoder_ch=32,
                                   encoder_num_res_blocks=1).eval()


def inputs(b, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, height // 8, width // 8, generator=g)
    image = torch.rand(b, 3, height, width, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, height, width)
    mask[..., height // 5:height // 2, width // 6:width // 2] = 1  # holes crossing tile borders
    mask[..., -height // 4:, -width // 3:] = 1
    return z, image, mask


def psnr(a, b):
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * math.log10(4 / mse) if mse else math.inf


def largest_activation(vae, fn):
    """(output, the largest tensor a decoder convolution read or wrote, in elements): the compute device's
    working set, counted by hooks (a stub that decodes untiled reports the full image)."""
    seen = [0]

    def hook(_, args, out):
        seen[0] = max(seen[0], args[0].numel(), out.numel())
    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            return fn(), seen[0]
    finally:
        for h in handles:
            h.remove()


def known_psnr(out, image, mask):
    known = (1 - mask).expand_as(image).bool()
    return psnr(out[known], image[known])


@pytest.mark.parametrize("size, tile", [pytest.param((1024, 1024), 40, marks=pytest.mark.slow), ((328, 200), 16)])
def test_tiled_decode_matches_untiled_with_a_tile_sized_working_set(vae, size, tile):
    z, image, mask = inputs(1, *size)
    ref, full = largest_activation(vae, lambda: vae.decode(z, image, mask))
    out, tiled = largest_activation(vae, lambda: vae.decode(z, image, mask, tile=tile, tile_overlap=8))
    assert out.shape == ref.shape == (1, 3, *size)
    assert psnr(out, ref) > MIN_PSNR_DB
    cores = [[b - a for a, b, _, _ in spans(n // 8, tile, 8)] for n in size]
    assert max(cores[0]) < tile and sum(cores[0]) == size[0] // 8  # cores of any size, covering the latent
    # the largest tile (core + 2 x 8 context) at full resolution, 32 channels, against the whole image
    widest = [max(b - a for _, _, a, b in spans(n // 8, tile, 8)) * 8 for n in size]
    assert tiled == 32 * widest[0] * widest[1] and full == 32 * size[0] * size[1]
    if size == (1024, 1024):
        assert tiled / full < 0.15  # (48 / 128)^2 = 0.14
    # the known region stays as close to the input as untiled
    assert known_psnr(out, image, mask) == pytest.approx(known_psnr(ref, image, mask), abs=0.01)


def test_per_tile_statistics_would_show(vae, monkeypatch):
    """The whole-image GroupNorm statistics are what makes the tiles agree: per-tile ones do not."""
    import ldm.tiling as tiling
    z, image, mask = inputs(1, 256, 256)
    with torch.no_grad():
        ref = vae.decode(z, image, mask)
        monkeypatch.setattr(tiling, "_normalise", lambda norm, x, mean, var: norm(x))  # the tile's own statistics
        per_tile = vae.decode(z, image, mask, tile=12, tile_overlap=8)
    assert psnr(per_tile, ref) < 40


def test_tiling_and_slicing_agree(vae):
    """The same tiles, batched or one sample at a time, give the same numbers: compared in float64 (in float32
    the batched and per-sample kernels round differently, by CPU)."""
    vae = copy.deepcopy(vae).double()
    z, image, mask = (t.double() for t in inputs(2, 160, 128, seed=1))
    with torch.no_grad():
        batched = vae.decode(z, image, mask, tile=8, tile_overlap=6)
        sliced = vae.decode(z, image, mask, tile=8, tile_overlap=6, slice_batch=True)
        plain = vae.decode(z, image, mask, slice_batch=True)
        untiled = vae.decode(z, image, mask)
        broadcast = vae.decode(z, image[:1], mask[:1], slice_batch=True)  # batch-1 image and mask, as decode
        plain_tiled = vae.decode(z, tile=8, tile_overlap=6)
        plain_untiled = vae.decode(z)
    torch.testing.assert_close(sliced, batched, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain, untiled, rtol=0, atol=1e-10)
    torch.testing.assert_close(broadcast[0], untiled[0], rtol=0, atol=1e-10)
    assert not torch.allclose(batched[0], batched[1])  # two samples, each with its own statistics
    assert psnr(batched, untiled) > MIN_PSNR_DB and psnr(plain_tiled, plain_untiled) > MIN_PSNR_DB


def test_tile_arguments():
    assert auto_tile(None, 1024) is None and auto_tile(None, 2048) == 64 and auto_tile(0, 4096) is None
    assert auto_tile(32, 256) == 32
    with pytest.raises(ValueError, match="--tile"):
        auto_tile(-1, 256)
    assert spans(10, 4, 2) == [(0, 3, 0, 5), (3, 7, 1, 9), (7, 10, 5, 10)]
