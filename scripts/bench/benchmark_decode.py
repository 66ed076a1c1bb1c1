"""Decode cost: latency and peak memory of ours against diffusers, and the decoder's share of an inpainting call.

    python scripts/bench/benchmark_decode.py --flops
    python scripts/bench/benchmark_decode.py --latency [--presets vanilla x1 x1.5 x2] [--sizes 512 1024 2048] [--repeats 3]

--latency: one subprocess per row (preset, px, implementation: ours eager, ours tiled (tiles of 64),
diffusers' AsymmetricAutoencoderKL with the same random weights; vanilla: ours without the branch only);
the median decode time of --repeats after one warm-up, and the process's peak memory (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on a GPU). A holed mask, batch 1, fp32.

--flops:
For each denoiser (SD 1.5 inpainting UNet at 512 px, SDXL inpainting UNet and FLUX.1 Fill transformer at
1024 px, their published configs written out below) the FLOPs of one call x the pipeline's default steps
(x2 with classifier-free guidance), against one decode by the vanilla SD decoder and by x1, x1.5 and x2 with
the masked-image branch. torch.utils.flop_counter counts matmuls, convolutions and attention (not norms or
elementwise ops). The text encoders and the VAE encoder run once and are left out of both sides.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ldm.modules.autoencoder import PRESETS, AsymmetricAutoencoderKL  # noqa: E402

# the published model configs (diffusers' config.json of each), the parts that set the compute
SD15_UNET = dict(in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SDXL_UNET = dict(in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
FLUX_FILL = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(config, px, text_len, text_dim, xl=False) -> int:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        net = UNet2DConditionModel(**config)
        x = torch.randn(1, config["in_channels"], px // 8, px // 8)
        text = torch.randn(1, text_len, text_dim)
        extra = {}
        if xl:  # SDXL's pooled text embedding and size/crop conditioning
            extra = dict(added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})
        return count(lambda: net(x, torch.tensor([500.0]), text, **extra))


def flux_flops(config, px, text_len=512) -> int:
    from diffusers import FluxTransformer2DModel
    seq = (px // 16) ** 2  # 2x2 patches of the 16-channel latent
    with torch.device("meta"):
        net = FluxTransformer2DModel(**config)
        args = dict(hidden_states=torch.randn(1, seq, config["in_channels"]),
                    encoder_hidden_states=torch.randn(1, text_len, 4096), pooled_projections=torch.randn(1, 768),
                    timestep=torch.tensor([0.5]), guidance=torch.tensor([30.0]), img_ids=torch.zeros(seq, 3),
                    txt_ids=torch.zeros(text_len, 3))
        return count(lambda: net(**args))


def decoder_flops(preset, px) -> int:
    with torch.device("meta"):
        if preset == "vanilla":
            vae = AsymmetricAutoencoderKL(use_condition=False)
            return count(lambda: vae.decode(torch.randn(1, 4, px // 8, px // 8)))
        vae = AsymmetricAutoencoderKL(**PRESETS[preset])
        z, image, mask = torch.randn(1, 4, px // 8, px // 8), torch.randn(1, 3, px, px), torch.ones(1, 1, px, px)
        return count(lambda: vae.decode(z, image, mask, check=False))


def row(preset, px, impl, repeats) -> dict:
    """One measurement, in this process: {"s": median seconds, "peak_gib": peak memory}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    kw = dict(use_condition=False) if preset == "vanilla" else PRESETS[preset]
    vae = AsymmetricAutoencoderKL(**kw).eval()
    z = torch.randn(1, 4, px // 8, px // 8, device=device)
    image, mask = torch.rand(1, 3, px, px, device=device) * 2 - 1, torch.zeros(1, 1, px, px, device=device)
    mask[..., px // 4:3 * px // 4, px // 4:3 * px // 4] = 1
    cond = () if preset == "vanilla" else (image, mask)
    if impl == "diffusers":
        from diffusers import AsymmetricAutoencoderKL as Reference
        from ldm.keys import diffusers_config, ldm_to_diffusers
        config = {k: v for k, v in diffusers_config(vae.config).items() if not k.startswith("_")}
        ref = Reference(**config).eval()
        ref.load_state_dict(ldm_to_diffusers(vae.state_dict()))
        del vae
        ref.to(device)
        fn = lambda: ref.decode(z, image, mask).sample  # noqa: E731
    else:
        tile = 64 if impl == "tiled" else None
        vae.to(device)
        fn = lambda: vae.decode(z, *cond, tile=tile)  # noqa: E731
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    times = sorted(times[1:])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"s": times[len(times) // 2], "peak_gib": peak / 2 ** 30, "device": str(device)}


def latency_table(presets, sizes, repeats) -> None:
    print("| decoder | px | implementation | decode s (median) | peak memory GiB | device |")
    print("|---|---:|---|---:|---:|---|")
    for preset in presets:
        for px in sizes:
            for impl in (("ours",) if preset == "vanilla" else ("ours", "diffusers")) + ("tiled",) * (px > 512):
                cmd = [sys.executable, __file__, "--row", preset, str(px), impl, str(repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {preset} | {px} | {impl} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {preset} | {px} | {impl} | {r['s']:.2f} | {r['peak_gib']:.2f} | {r['device']} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flops", action="store_true", help="the FLOP shares")
    p.add_argument("--latency", action="store_true", help="the latency / peak memory table")
    p.add_argument("--presets", nargs="+", default=["vanilla", *PRESETS], choices=["vanilla", *PRESETS])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row", nargs=4, default=None, help=argparse.SUPPRESS)  # the subprocess of one row
    args = p.parse_args(argv)
    if args.row:
        preset, px, impl, repeats = args.row
        print(json.dumps(row(preset, int(px), impl, int(repeats))))
        return 0
    if not (args.flops or args.latency):
        p.error("give --flops and/or --latency")
    if args.latency:
        latency_table(args.presets, args.sizes, args.repeats)
    if not args.flops:
        return 0
    denoisers = [  # name, px, FLOPs of one call, calls (steps x guidance batches)
        ("SD 1.5 inpainting UNet", 512, lambda: unet_flops(SD15_UNET, 512, 77, 768), 50 * 2),
        ("SDXL inpainting UNet", 1024, lambda: unet_flops(SDXL_UNET, 1024, 77, 2048, xl=True), 50 * 2),
        ("FLUX.1 Fill transformer", 1024, lambda: flux_flops(FLUX_FILL, 1024), 50),
    ]
    print("| denoiser | px | denoiser TFLOPs (calls) | " + " | ".join(
        f"{d} decode TFLOPs (share)" for d in ("vanilla", *PRESETS)) + " |")
    print("|---|---:|---:|" + "---:|" * (1 + len(PRESETS)))
    for name, px, fn, calls in denoisers:
        total = fn() * calls
        cells = []
        for preset in ("vanilla", *PRESETS):
            d = decoder_flops(preset, px)
            cells.append(f"{d / 1e12:.2f} ({d / (d + total):.1%})")
        print(f"| {name} | {px} | {total / 1e12:.0f} ({calls}) | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
