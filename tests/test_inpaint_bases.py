"""scripts/inpaint.py end to end on CPU with tiny random SD 1.x, SDXL, SD3 and FLUX.1 Fill pipelines (no hub)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import AsymmetricAutoencoderKL

diffusers = pytest.importorskip("diffusers")
import tiny_pipelines  # noqa: E402
from test_bases import TINY, base_kwargs, family_config  # noqa: E402
from test_interop import jitter  # noqa: E402
from probe_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"sd1": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
             "sd3": "StableDiffusion3InpaintPipeline", "flux": "FluxFillPipeline"}


def pixels(x):
    """(1,3,H,W) in [-1, 1] -> (H,W,3) uint8, as inpaint.py writes it."""
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("base", list(PIPELINES))
def test_inpaint_decodes_the_pipelines_final_latents_with_our_conditioned_decoder(base, tmp_path, capsys):
    inpaint, export = load_script("inpaint"), load_script("export")
    torch.manual_seed(0)
    their_vae = jitter(diffusers.AutoencoderKL(**TINY, **family_config(base)), 0)
    pipeline = tiny_pipelines.build(base, their_vae, tmp_path)
    assert json.loads((pipeline / "model_index.json").read_text())["_class_name"] == PIPELINES[base]
    kw = {**base_kwargs(base), "ch": 32, "num_res_blocks": 1, "encoder_ch": 32, "encoder_num_res_blocks": 1}
    torch.manual_seed(1)
    ours = jitter(AsymmetricAutoencoderKL(**kw), 1)
    export.save_diffusers(ours, tmp_path / "ours")
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1)
    Image.fromarray(pixels(image)).save(tmp_path / "img.png")
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:48] = 1
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["--vae", str(tmp_path / "ours"), "--pipeline", str(pipeline), "--image", str(tmp_path / "img.png"),
            "--mask", str(tmp_path / "mask.png"), "--prompt", "a cat", "--steps", "2", "--size", "64",
            "--device", "cpu", "--out", str(out), "--compare"]
    assert inpaint.main(args) == 0
    got, got_pipeline = (np.asarray(Image.open(p).convert("RGB")).astype(int)
                         for p in (out, tmp_path / "out_pipeline.png"))

    # the same run, by hand: the pipeline's final latents, its VAE's factors, our decoder with image and mask
    pipe = getattr(diffusers, PIPELINES[base]).from_pretrained(
        pipeline, local_files_only=True, **({"text_encoder_3": None, "tokenizer_3": None} if base == "sd3" else {}))
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float32)).permute(2, 0, 1)[None]
    x = x / 127.5 - 1
    with torch.no_grad():
        latents = pipe("a cat", image=Image.open(tmp_path / "img.png"), mask_image=Image.open(tmp_path / "mask.png"),
                       height=64, width=64, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(0)).images
        if base == "flux":
            assert latents.shape == (1, 16, 64)  # packed: (B, (h/2)(w/2), 4C)
            latents = pipe._unpack_latents(latents, 64, 64, pipe.vae_scale_factor)
        z = latents / their_vae.config.scaling_factor + (their_vae.config.shift_factor or 0.0)
        assert z.shape == (1, kw["z_channels"], 8, 8)
        want = pixels(ours.decode(z, x, mask)).astype(int)
        plain = pixels(ours.decode(z)).astype(int)
        theirs = pixels(their_vae.decode(z).sample).astype(int)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()  # rounding of an fp32 decode to 8 bits
    assert np.abs(got_pipeline - theirs).max() <= 1
    assert np.abs(got - theirs).mean() > 10  # not the pipeline VAE's decode
    assert np.abs(got - plain).mean() > 10  # nor our plain decode: the branch saw the image and the mask

    if base == "flux":  # a 4-channel decoder for a 16-channel pipeline: refused, naming both widths
        sd1 = AsymmetricAutoencoderKL(**{**kw, **{k: base_kwargs("sd1")[k] for k in ("z_channels", "embed_dim",
                                                                                      "use_quant_conv")}})
        export.save_diffusers(sd1, tmp_path / "sd1")
        args[1] = str(tmp_path / "sd1")
        capsys.readouterr()
        assert inpaint.main(args) == 2
        assert "4 latent channels" in capsys.readouterr().err


def test_inpaint_refuses_a_pipeline_of_another_kind(tmp_path, capsys):
    inpaint = load_script("inpaint")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    for name in ("x.png", "y.png"):  # argparse checks they exist; the pipeline's kind is refused before they load
        (tmp_path / name).touch()
    args = ["--vae", str(tmp_path), "--pipeline", str(tmp_path), "--image", str(tmp_path / "x.png"),
            "--mask", str(tmp_path / "y.png"), "--prompt", "p", "--out", str(tmp_path / "o.png")]
    assert inpaint.main(args) == 2
    err = capsys.readouterr().err
    assert "names 'KandinskyV22Pipeline'; supported: StableDiffusionXL*" in err and "FluxFill*" in err
