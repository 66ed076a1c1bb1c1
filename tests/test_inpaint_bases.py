"""ldm/decoding/pipelines.py and scripts/inpaint.py end to end on CPU with a tiny random pipeline of every kind they drive
(tests/tiny_pipelines.py, no hub), on a non-square image."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import build_autoencoder

diffusers = pytest.importorskip("diffusers")
import tiny_pipelines  # noqa: E402
from ldm.decoding import pipelines  # noqa: E402
from probe_utils import load_script  # noqa: E402
from test_bases import TINY, base_kwargs, family_config, family_vae, their_decode  # noqa: E402
from test_interop import jitter  # noqa: E402

# each pipeline class ldm/decoding/pipelines.py drives -> the base whose VAE it runs on (configs/bases/<base>.yaml)
BASE = {"StableDiffusionInpaintPipeline": "sd1", "StableDiffusionXLInpaintPipeline": "sdxl",
        "StableDiffusion3InpaintPipeline": "sd3", "FluxFillPipeline": "flux", "FluxInpaintPipeline": "flux",
        "FluxKontextInpaintPipeline": "flux", "ChromaInpaintPipeline": "flux", "ZImageInpaintPipeline": "flux",
        "Flux2KleinInpaintPipeline": "flux2", "QwenImageInpaintPipeline": "qwenimage",
        "QwenImageEditInpaintPipeline": "qwenimage"}
QWEN = [cls for cls in BASE if BASE[cls] == "qwenimage"]  # one-frame latents, per-channel statistics: their own test
SIZE = (64, 96)  # the input (H, W): not square, not the decode size
# (h, w) of the decode for a 64 x 64 px budget at 96:64, by the multiple the pipeline takes: 8 px (a latent pixel
# of the tiny VAEs; the tiny SD3 has patch size 1) or 16 px (2x2 latent patches)
DECODE = {8: (56, 80), 16: (48, 80)}
# --compare checked once, as its code is the same for every pipeline: on SD3, whose diffusers pipeline decodes
# without the VAE's shift factor (README), so the pipeline VAE's decode here is not the pipeline's own
COMPARED = "StableDiffusion3InpaintPipeline"


def pixels(x):
    """(1,3,H,W) in [-1, 1] -> (H,W,3) uint8, as inpaint.py writes it."""
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def read(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """{base: (our tiny decoder of that base, its diffusers export; Qwen-Image's: its decoder export, as diffusers'
    AutoencoderKLQwenImage holds no branch)}, shared."""
    export, folder, out = load_script("export"), tmp_path_factory.mktemp("decoders"), {}
    for seed, base in enumerate(("sd1", "sdxl", "sd3", "flux", "flux2", "qwenimage")):
        kw = {**base_kwargs(base), "ch": 32, "num_res_blocks": 1, "encoder_ch": 32, "encoder_num_res_blocks": 1}
        torch.manual_seed(seed)
        out[base] = (jitter(build_autoencoder(**kw), seed), folder / base)
        (export.save_decoder if base == "qwenimage" else export.save_diffusers)(out[base][0], folder / base)
    return out


def inputs(folder, size=SIZE, seed=2):
    """A random image and a mask with a hole, saved as PNGs: ((1,3,H,W) in [-1,1], (1,1,H,W), paths)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.from_numpy(pixels(torch.rand(1, 3, *size, generator=g) * 2 - 1)).permute(2, 0, 1)[None]
    image = image.float() / 127.5 - 1  # exactly what the PNG holds
    mask = torch.zeros(1, 1, *size)
    mask[..., size[0] // 4:size[0] * 5 // 8, size[1] // 3:size[1] * 3 // 4] = 1
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(image)).save(folder / "img.png")
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L").save(folder / "mask.png")
    return image, mask, (folder / "img.png", folder / "mask.png")


def test_the_first_pipelines_of_the_table_are_tested_here():  # the others: test_inpaint_variants.py
    assert [p.cls for p in pipelines.PIPELINES][:len(BASE)] == list(BASE)


@pytest.mark.parametrize("cls", [cls for cls in BASE if cls not in QWEN])
def test_inpaint_decodes_the_pipelines_final_latents_with_our_conditioned_decoder_at_the_inputs_shape(
        cls, decoders, tmp_path):
    inpaint = load_script("inpaint")
    torch.manual_seed(0)
    their_vae = jitter(family_vae(BASE[cls], **TINY), 0)  # FLUX.2's: random batch-norm statistics
    pipe, folder = tiny_pipelines.build(cls, their_vae, tmp_path)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls
    ours, ours_folder = decoders[BASE[cls]]
    image, mask, (image_file, mask_file) = inputs(tmp_path)
    out, compare = tmp_path / "out.png", cls == COMPARED
    assert inpaint.main(["--vae", str(ours_folder), "--pipeline", str(folder), "--image", str(image_file),
                         "--mask", str(mask_file), "--prompt", "a cat", "--steps", "2", "--size", "64",
                         "--device", "cpu", "--out", str(out)] + ["--compare"] * compare) == 0
    got = read(out)
    assert got.shape == (*SIZE, 3)

    # by hand: the input resized to the decode size, the pipeline's final latents there (diffusers' own unpacking),
    # its VAE's factors (FLUX.2 Klein: undone by the pipeline itself), our decoder with the image and mask, resized
    # back to the input's size
    klein = cls == "Flux2KleinInpaintPipeline"
    h, w = DECODE[16 if hasattr(pipe, "_unpack_latents") or cls == "ZImageInpaintPipeline" or klein else 8]
    x = F.interpolate(image, (h, w), mode="bicubic", antialias=True).clamp(-1, 1)
    m = (F.interpolate(mask, (h, w), mode="bilinear", antialias=True) > 0.5).float()
    with torch.no_grad():
        latents = pipe(prompt=["a cat"], image=(x + 1) / 2, mask_image=m, height=h, width=w,
                       num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                       **({"_auto_resize": False} if cls == "FluxKontextInpaintPipeline" else {})).images
        if hasattr(pipe, "_unpack_latents"):
            assert latents.shape == (1, h * w // 256, 64)  # packed: (B, (h/2)(w/2), 4C) at 8 px a latent pixel
            latents = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        z = latents if klein else latents / their_vae.config.scaling_factor + (their_vae.config.shift_factor or 0.0)
        assert z.shape == (1, ours.config["embed_dim"], h // 8, w // 8)
        want = pixels(F.interpolate(ours.decode(z, x, m), SIZE, mode="bicubic", antialias=True)).astype(int)
        assert np.abs(got - want).max() <= 1, np.abs(got - want).max()  # rounding of an fp32 decode to 8 bits
        if compare:  # the pipeline VAE's decode beside ours, resized the same way
            plain, theirs = (pixels(F.interpolate(y, SIZE, mode="bicubic", antialias=True)).astype(int)
                             for y in (ours.decode(z), their_vae.decode(z).sample))
            assert np.abs(read(tmp_path / "out_pipeline.png") - theirs).max() <= 1
            assert np.abs(got - theirs).mean() > 10  # ours is not the pipeline VAE's decode
            assert np.abs(got - plain).mean() > 10  # nor our plain decode: the branch saw the image and the mask


@pytest.mark.parametrize("cls", QWEN)
def test_qwen_image_pipelines_decode_one_frame_with_our_conditioned_decoder(cls, decoders, tmp_path, monkeypatch):
    """Qwen-Image's latents come back packed and normalised per channel, of one frame; Qwen-Image-Edit picks its own
    size (its image's aspect at 1024^2 px: cut to 96^2 here, for a CPU) and reads its image as a PIL image. The
    pipeline VAE's plain decode (--compare) decodes one frame too. The pipeline's VAE is tinier than ours."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as edit_module
    dimensions = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: dimensions(96 * 96, ratio))
    inpaint, edit = load_script("inpaint"), cls == "QwenImageEditInpaintPipeline"
    torch.manual_seed(0)
    their_vae = jitter(family_vae("qwenimage", base_dim=8, num_res_blocks=1), 0)
    pipe, folder = tiny_pipelines.build(cls, their_vae, tmp_path)
    ours, ours_folder = decoders["qwenimage"]
    image, mask, (image_file, mask_file) = inputs(tmp_path)
    out = tmp_path / "out.png"
    assert inpaint.main(["--vae", str(ours_folder), "--pipeline", str(folder), "--image", str(image_file), "--mask",
                         str(mask_file), "--prompt", "a cat", "--steps", "2", "--device", "cpu", "--out", str(out),
                         "--compare", *([] if edit else ["--size", "64"])]) == 0
    got = read(out)
    assert got.shape == (*SIZE, 3)

    # by hand: the decode size (Edit's: its own, which maps onto itself), the image and mask resized (Edit's as 8-bit
    # PIL images), diffusers' unpacking to one frame, (latents x std + mean), our decoder with the image and mask
    h, w = (64, 128) if edit else DECODE[16]  # Edit's: 96:64 -> 128:64, which maps onto itself
    assert not edit or edit_module.calculate_dimensions(0, w / h)[:2] == (w, h)
    x = F.interpolate(image, (h, w), mode="bicubic", antialias=True).clamp(-1, 1)
    m = (F.interpolate(mask, (h, w), mode="bilinear", antialias=True) > 0.5).float()
    given = dict(image=(x + 1) / 2, mask_image=m)
    if edit:
        given = dict(image=Image.fromarray(pixels(x)), mask_image=Image.fromarray(m[0, 0].byte().numpy() * 255))
        x = torch.from_numpy(pixels(x)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe(prompt=["a cat"], **given, height=h, width=w, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
        assert latents.shape == (1, h * w // 256, 64)
        latents = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        assert latents.shape == (1, 16, 1, h // 8, w // 8)  # one frame
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (their_vae.config.latents_mean,
                                                                  their_vae.config.latents_std))
        z = latents[:, :, 0] * std + mean
        want = pixels(F.interpolate(ours.decode(z, x, m), SIZE, mode="bicubic", antialias=True)).astype(int)
        theirs = pixels(F.interpolate(their_decode(their_vae, z), SIZE, mode="bicubic", antialias=True)).astype(int)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()  # rounding of an fp32 decode to 8 bits
    assert np.abs(read(tmp_path / "out_pipeline.png") - theirs).max() <= 1
    assert np.abs(got - theirs).mean() > 10  # ours is not the pipeline VAE's decode


def test_batch_mode_runs_every_row_with_one_pipeline_load_and_pastes_at_full_size(decoders, tmp_path, monkeypatch):
    inpaint = load_script("inpaint")
    loads = []
    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: loads.append(a) or pipelines.load_pipeline(*a))
    torch.manual_seed(0)
    _, folder = tiny_pipelines.build("StableDiffusionXLInpaintPipeline", jitter(
        diffusers.AutoencoderKL(**TINY, **family_config("sdxl")), 0), tmp_path)
    rows = [inputs(tmp_path / "a", (64, 96), seed=3), inputs(tmp_path / "b", (72, 40), seed=4)]
    (tmp_path / "list.csv").write_text('image,mask,prompt,out\n'
                                       'a/img.png,a/mask.png,"a cat, a dog",out/a.png\n\n'
                                       f'{tmp_path}/b/img.png, b/mask.png, the dog, out/b.jpg\n')
    assert inpaint.main(["--vae", str(decoders["sdxl"][1]), "--pipeline", str(folder), "--batch",
                         str(tmp_path / "list.csv"), "--steps", "2", "--size", "48", "--paste", "--device", "cpu"]) == 0
    assert len(loads) == 1
    for (image, mask, _), name in zip(rows, ("a.png", "b.jpg")):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.format == ("PNG" if name.endswith("png") else "JPEG")
        got, known = read(tmp_path / "out" / name), mask[0, 0].numpy() == 0
        assert got.shape == (*image.shape[-2:], 3)
        if name.endswith("png"):  # the known region is the input's own pixels, the hole is decoded
            assert (got[known] == pixels(image)[known]).all()
            assert np.abs(got[~known] - pixels(image)[~known]).mean() > 10


FLUX_VAE = {"latent_channels": 16, "use_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159}
QWEN_VAE = {"_class_name": "AutoencoderKLQwenImage", "z_dim": 16, "latents_mean": [0.1] * 16, "latents_std": [2.0] * 16}
REFUSED = {  # what is wrong: (model_index.json, vae/config.json, --vae of base, the message)
    "no pipeline folder": (None, FLUX_VAE, "flux", "nowhere: no such folder with model_index.json"),
    "foreign pipeline": ({"_class_name": "KandinskyV22Pipeline"}, FLUX_VAE, "flux",
                         "model_index.json names 'KandinskyV22Pipeline'; supported: StableDiffusionPipeline"),
    "decoder of another width": ({"_class_name": "FluxPipeline"}, FLUX_VAE, "sd1",
                                 "a decoder for 4 latent channels, quant convs, scaling_factor 0.18215, "
                                 "shift_factor 0 (base sd1); the pipeline's VAE has 16 latent channels"),
    "decoder of another family": ({"_class_name": "FluxPipeline"}, FLUX_VAE, "sd3",
                                  "scaling_factor 1.5305, shift_factor 0.0609 (base sd3); the pipeline's VAE has "
                                  "16 latent channels, no quant convs, scaling_factor 0.3611, shift_factor 0.1159: "
                                  "train on that pipeline's VAE"),
    "decoder of another layout": ({"_class_name": "QwenImageEditPipeline"}, QWEN_VAE, "flux",
                                  "(base flux); the pipeline's VAE has 16 latent channels, quant convs, per-channel "
                                  "latent statistics (16 channels): train on that pipeline's VAE"),
    "batch row": ({"_class_name": "FluxPipeline"}, FLUX_VAE, "flux",
                  "list.csv:2: 3 columns, want 4: image, mask, prompt, out"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inpaint_refuses_before_loading_the_pipeline_in_one_line(case, decoders, tmp_path, capsys, monkeypatch):
    inpaint = load_script("inpaint")
    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("loaded"))
    index, vae, base, message = REFUSED[case]
    folder = tmp_path / ("nowhere" if index is None else "pipeline")
    if index is not None:
        (folder / "vae").mkdir(parents=True)
        (folder / "vae" / "config.json").write_text(json.dumps(vae))
        (folder / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "list.csv").write_text("x.png,y.png,p,o.png\nx.png,y.png,p\n")
    for name in ("x.png", "y.png"):
        (tmp_path / name).touch()
    args = ["--vae", str(decoders[base][1]), "--pipeline", str(folder)]
    args += (["--batch", str(tmp_path / "list.csv")] if case == "batch row" else
             ["--image", str(tmp_path / "x.png"), "--mask", str(tmp_path / "y.png"), "--prompt", "p",
              "--out", str(tmp_path / "o.png")])
    assert inpaint.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
