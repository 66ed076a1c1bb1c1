"""The tiling tests' tiny decoder and holed inputs; and, as `python tiling_probe.py PX TILE`, one decode of it at
PX x PX per mode in this fresh process, each with its peak resident memory over the memory resident before it
(Linux: VmHWM, reset through /proc/self/clear_refs). Prints one JSON line: MiB per mode, and whether the modes
agree."""
import ctypes
import gc
import json
import sys

import torch

from probe_utils import ROOT  # noqa: F401  (puts the repository on sys.path)
from ldm.modules.sd.autoencoder import AsymmetricAutoencoderKL
from ldm.modules.tiling import tiled_decode


def tiny_vae() -> AsymmetricAutoencoderKL:
    """ch 32 at every level, one ResnetBlock per level: a 1024 px decode in seconds, every part of the real one."""
    torch.manual_seed(0)
    return AsymmetricAutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, encoder_ch=32,
                                   encoder_num_res_blocks=1).eval()


def inputs(b, height, width, seed=0):
    """(latent, image, mask) with holes crossing tile borders."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, height // 8, width // 8, generator=g)
    image = torch.rand(b, 3, height, width, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, height, width)
    mask[..., height // 5:height // 2, width // 6:width // 2] = 1
    mask[..., -height // 4:, -width // 3:] = 1
    return z, image, mask


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_over_resident(fn):
    """(fn(), bytes of its peak resident memory over the resident memory before it). The memory an earlier mode
    freed goes back to the system first (glibc's malloc_trim): reused, it would not count as this mode's peak."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS:")
    out = fn()
    return out, status("VmHWM:") - before


def main(px: int, tile: int) -> dict:
    vae = tiny_vae()
    z, image, mask = inputs(1, px, px)
    h, cond = vae.post_quant_conv(z), ((1 - mask) * image, mask)
    modes = {"files": lambda: tiled_decode(vae.decoder, h, *cond, tile=tile),  # the CPU default
             "memory": lambda: tiled_decode(vae.decoder, h, *cond, tile=tile, store=torch.device("cpu")),
             "untiled": lambda: vae.decoder(h, *cond)}
    outs, mib = {}, {}
    with torch.no_grad():
        tiled_decode(vae.decoder, h[..., :16, :16], *(t[..., :128, :128] for t in cond), tile=9)  # warm-up
        for name, fn in modes.items():
            outs[name], peak = peak_over_resident(fn)
            mib[name] = peak / 2 ** 20
    mse = (outs["files"].double() - outs["untiled"].double()).pow(2).mean().item()
    return {**mib, "stores_equal": torch.equal(outs["files"], outs["memory"]), "mse_vs_untiled": mse}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
