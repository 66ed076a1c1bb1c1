"""Decode cost: latency and peak memory of ours against diffusers, and the decoder's share of an inpainting call.

    python scripts/bench/benchmark_decode.py --flops
    python scripts/bench/benchmark_decode.py --latency [--presets vanilla x1 x1.5 x2] [--sizes 512 1024 2048] [--repeats 3]

--latency: one subprocess per row (decoder, px, implementation); the median decode time of --repeats after
--warmup decodes (1; on a CPU, where one decode takes minutes at 1024 px, 0 halves a row's time), the time of
the first decode (with the compiled implementation, compiling), and the process's peak memory
(torch.cuda.max_memory_allocated on a GPU; on a CPU ru_maxrss, the process's peak resident memory, weights and
torch included). A holed mask, batch 1, random weights (seed 0), the same in every implementation of a decoder:
  ours        fp32, eager, untiled
  tiled       ours in latent tiles of --tile (8 overlap), rows above 8 x --tile px (scripts/eval.py decodes in
              tiles of 64 above 1024 px); the tile states wait in host memory on a GPU, in files on a CPU
  diffusers   diffusers' AsymmetricAutoencoderKL with our weights (vanilla: its AutoencoderKL), fp32
  bf16        ours under bf16 autocast, channels_last (the GPU settings of docs/performance.md)
  compiled    bf16 and channels_last with the decoder's blocks compiled (inductor; the warm-up compiles)
Default --impls: ours tiled diffusers on a CPU, all five on a GPU.

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
from ldm.cli import at_least, multiple_of_8, script_main  # noqa: E402
from ldm import PRESETS, AsymmetricAutoencoderKL  # noqa: E402
from ldm.modules.tiling import OVERLAP  # noqa: E402

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


IMPLS = ("ours", "tiled", "diffusers", "bf16", "compiled")


def build_diffusers(vae):
    """diffusers' model of our decoder, the class an export names: SD's AutoencoderKL for the vanilla decoder (no
    branch), else AsymmetricAutoencoderKL."""
    import diffusers
    config, _ = vae.diffusers_form()
    return getattr(diffusers, config["_class_name"]).from_config(config)


def decode_fn(preset, px, impl, device, tile=64):
    """() -> the decoded image of one row's decode: the same random weights (seed 0), latent and holed mask for
    every implementation of a decoder."""
    if impl not in IMPLS:
        raise ValueError(f"implementation {impl!r}: one of {', '.join(IMPLS)}")
    torch.manual_seed(0)
    vanilla = preset == "vanilla"
    with device:  # built where it runs: a random init of x2 on the host takes longer than its decode on a GPU
        vae = AsymmetricAutoencoderKL(**(dict(use_condition=False) if vanilla else PRESETS[preset])).eval()
    z = torch.randn(1, 4, px // 8, px // 8, device=device)
    image, mask = torch.rand(1, 3, px, px, device=device) * 2 - 1, torch.zeros(1, 1, px, px, device=device)
    mask[..., px // 4:3 * px // 4, px // 4:3 * px // 4] = 1
    cond = () if vanilla else (image, mask)
    if impl == "diffusers":
        with device:
            ref = build_diffusers(vae)
        ref.load_state_dict(vae.diffusers_form()[1])
        del vae
        ref.eval()
        kwargs = {} if vanilla else dict(image=image, mask=mask)  # keywords: its second argument is a generator
        return lambda: ref.decode(z, **kwargs).sample
    if impl in ("ours", "tiled"):
        return lambda: vae.decode(z, *cond, tile=tile if impl == "tiled" else None)
    from ldm.models.asym_decoder import compile_blocks
    vae.to(memory_format=torch.channels_last)
    if impl == "compiled":
        compile_blocks(vae.decoder)

    def fn():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return vae.decode(z, *cond)
    return fn


def row(preset, px, impl, repeats, tile=64, warmup=1) -> dict:
    """One measurement, in this process: {"s": median seconds of the decodes after `warmup`, "first_s": the first
    decode's seconds, "peak_gib": peak memory, "device"}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn = decode_fn(preset, px, impl, device, tile)
    times = []
    with torch.no_grad():
        for _ in range(warmup + repeats):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    first, times = times[0], sorted(times[warmup:])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"s": times[len(times) // 2], "first_s": first, "peak_gib": peak / 2 ** 30, "device": name}


def latency_table(presets, sizes, impls, repeats, tile, warmup=1) -> None:
    print(f"| decoder | px | implementation | decode s (median of {repeats} after {warmup} warm-up) | first decode s "
          "| peak memory GiB | device |")
    print("|---|---:|---|---:|---:|---:|---|")
    for preset in presets:
        for px in sizes:
            for impl in impls:
                if impl == "tiled" and px <= 8 * tile:
                    continue
                cmd = [sys.executable, __file__, "--row", preset, str(px), impl, str(repeats), str(tile), str(warmup)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                    print(f"| {preset} | {px} | {impl} | failed: {why} | | | |", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {preset} | {px} | {impl} | {r['s']:.2f} | {r['first_s']:.2f} | {r['peak_gib']:.2f} "
                      f"| {r['device']} |", flush=True)


@script_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flops", action="store_true", help="the FLOP shares")
    p.add_argument("--latency", action="store_true", help="the latency / peak memory table")
    p.add_argument("--presets", nargs="+", default=["vanilla", *PRESETS], choices=["vanilla", *PRESETS])
    p.add_argument("--sizes", nargs="+", type=multiple_of_8, default=[512, 1024, 2048])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="implementations to time (default: ours tiled diffusers on a CPU, all on a GPU)")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed decodes before the timed ones")
    p.add_argument("--tile", type=at_least(OVERLAP + 1), default=64, help="latent tile side of the tiled rows")
    p.add_argument("--row", nargs=6, default=None, help=argparse.SUPPRESS)  # the subprocess of one row
    args = p.parse_args(argv)
    if args.row:
        preset, px, impl, repeats, tile, warmup = args.row
        print(json.dumps(row(preset, int(px), impl, int(repeats), int(tile), int(warmup))))
        return 0
    if not (args.flops or args.latency):
        p.error("give --flops and/or --latency")
    if args.latency:
        impls = args.impls or (IMPLS if torch.cuda.is_available() else ("ours", "tiled", "diffusers"))
        latency_table(args.presets, args.sizes, impls, args.repeats, args.tile, args.warmup)
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
