"""`python tiling_probe.py PX TILE`: one decode of the tests' tiny decoder (ch 32) at PX x PX with holes per mode,
in this fresh process, and for each the peak resident memory over the memory resident before it (Linux: VmHWM,
reset through /proc/self/clear_refs). Prints one JSON line: MiB per mode, and whether the modes agree."""
import json
import sys

import torch

from probe_utils import ROOT  # noqa: F401  (puts the repository on sys.path)
from ldm.modules.autoencoder import AsymmetricAutoencoderKL
from ldm.tiling import tiled_decode


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_over_resident(fn):
    """(fn(), bytes of its peak resident memory over the resident memory before it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS:")
    out = fn()
    return out, status("VmHWM:") - before


def main(px: int, tile: int) -> dict:
    torch.manual_seed(0)
    vae = AsymmetricAutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, encoder_ch=32,
                                  encoder_num_res_blocks=1).eval()
    z, image = torch.randn(1, 4, px // 8, px // 8), torch.rand(1, 3, px, px) * 2 - 1
    mask = torch.zeros(1, 1, px, px)
    mask[..., px // 5:px // 2, px // 6:px // 2] = 1
    h, cond = vae.post_quant_conv(z), ((1 - mask) * image, mask)
    modes = {"files": lambda: tiled_decode(vae.decoder, h, *cond, tile=tile),  # the CPU default
             "memory": lambda: tiled_decode(vae.decoder, h, *cond, tile=tile, store=torch.device("cpu")),
             "untiled": lambda: vae.decoder(h, *cond)}
    outs, mib = {}, {}
    with torch.no_grad():
        tiled_decode(vae.decoder, h[..., :16, :16], *(t[..., :128, :128] for t in cond), tile=8)  # warm-up
        for name, fn in modes.items():
            outs[name], peak = peak_over_resident(fn)
            mib[name] = peak / 2 ** 20
    mse = (outs["files"].double() - outs["untiled"].double()).pow(2).mean().item()
    return {**mib, "stores_equal": torch.equal(outs["files"], outs["memory"]), "mse_vs_untiled": mse}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
