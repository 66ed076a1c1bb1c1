"""Tiled and sliced decoding (ldm/modules/tiling.py) against the untiled decode, on a tiny-width decoder."""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import ldm.modules.tiling as tiling
from ldm.modules.tiling import auto_tile, open_store, spans, tiled_decode
from tiling_probe import inputs, tiny_vae

MIN_PSNR_DB = 80.0  # tiled vs untiled (float32); measured 106-130 dB (docs/decoding.md)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


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


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_cpu_decode_in_tiles_holds_a_tile_not_the_image():
    """Peak resident memory of a 1024 px decode in tiles of 40, in a fresh process (tests/tiling_probe.py):
    the tile states wait in files, so the process holds about a tile's share ((56/128)^2 = 0.19) of what the
    untiled decode holds; states kept in memory instead hold the image's (measured 223, 1002, 1042 MiB)."""
    done = subprocess.run([sys.executable, "tiling_probe.py", "1024", "40"], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    mib = json.loads(done.stdout.splitlines()[-1])
    assert mib["stores_equal"] and 10 * math.log10(4 / mib["mse_vs_untiled"]) > MIN_PSNR_DB
    assert mib["files"] < 0.3 * mib["untiled"], mib
    assert mib["memory"] > 0.6 * mib["untiled"], mib


def test_tile_states_wait_in_files_that_are_removed(vae, tmp_path, monkeypatch):
    z, image, mask = inputs(1, 200, 328)
    h, cond = vae.post_quant_conv(z), ((1 - mask) * image, mask)
    parked = []
    park = tiling._Files.park
    monkeypatch.setattr(tiling._Files, "park", lambda self, x: parked.append(x.nbytes) or park(self, x))
    with torch.no_grad():
        on_disk = tiled_decode(vae.decoder, h, *cond, tile=16, store=tmp_path)
        in_memory = tiled_decode(vae.decoder, h, *cond, tile=16, store=torch.device("cpu"))
    assert torch.equal(on_disk, in_memory)
    # every GroupNorm input and the branch features went through the files: far more than one activation
    assert sum(parked) > 10 * 32 * 200 * 328 * 4
    assert list(tmp_path.iterdir()) == []
    calls = []

    def fails_midway(*args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("interrupted")
        return tiling._normalise(*args)
    monkeypatch.setattr(tiling, "_normalise", fails_midway)
    with torch.no_grad(), pytest.raises(RuntimeError, match="interrupted"):
        tiled_decode(vae.decoder, h, *cond, tile=16, store=tmp_path)
    assert list(tmp_path.iterdir()) == []  # a failed decode leaves no files either
    with pytest.raises(ValueError, match="no-such-folder"):
        tiled_decode(vae.decoder, h, *cond, tile=16, store=tmp_path / "no-such-folder")


def test_the_default_store_is_files_on_a_cpu_and_host_memory_for_a_gpu():
    store = open_store(None, torch.device("cpu"))
    try:
        assert Path(store._dir.name).parent == Path(tempfile.gettempdir())
    finally:
        store.close()
    assert open_store(None, torch.device("cuda")).device == torch.device("cpu")
