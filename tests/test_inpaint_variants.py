"""The ControlNet, Control and PAG inpainting pipelines and the editing pipelines (ldm/decoding/table.py), each end
to end on a tiny random pipeline (tests/tiny_variants.py, no hub) through scripts/inpaint.py and the Python API, on
a non-square image; their inputs (control image, control mode, --extra) and refusals; and an edit whose kept region
our decoder keeps closer to the original than the pipeline VAE's decode of the same latents."""
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import tiny_pipelines  # noqa: E402
import tiny_variants  # noqa: E402
from ldm import build_autoencoder  # noqa: E402
from ldm.decoding import pipelines  # noqa: E402
from probe_utils import load_script  # noqa: E402
from test_bases import TINY, base_kwargs, family_config, family_vae  # noqa: E402
from test_inpaint_bases import SIZE, decoders, inputs, pixels, read  # noqa: E402,F401  (decoders: a fixture)
from test_interop import jitter  # noqa: E402

BASE = {"StableDiffusionControlNetInpaintPipeline": "sd1", "StableDiffusionControlNetPAGInpaintPipeline": "sd1",
        "StableDiffusionPAGInpaintPipeline": "sd1", "StableDiffusionXLControlNetInpaintPipeline": "sdxl",
        "StableDiffusionXLControlNetUnionInpaintPipeline": "sdxl", "StableDiffusionXLPAGInpaintPipeline": "sdxl",
        "StableDiffusion3ControlNetInpaintingPipeline": "sd3", "FluxControlInpaintPipeline": "flux",
        "FluxControlNetInpaintPipeline": "flux", "QwenImageControlNetInpaintPipeline": "qwenimage",
        "ZImageControlNetInpaintPipeline": "flux", "FluxKontextPipeline": "flux",
        "QwenImageEditPipeline": "qwenimage", "QwenImageEditPlusPipeline": "qwenimage",
        "Flux2KleinPipeline": "flux2"}
EDITS = ["FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "Flux2KleinPipeline"]
# further flags some take: ControlNet-Union's mode comes from the batch file (below), PAG's scale through --extra
FLAGS = {"StableDiffusionPAGInpaintPipeline": ["--extra", "pag_scale=0.5"],
         "StableDiffusionXLPAGInpaintPipeline": ["--extra", "pag_scale=0.5"]}
SIDE = {"Flux2KleinPipeline": 80}  # FLUX.2 Klein's reference image: at least 64 px a side (diffusers' check)


def their_vae(base):
    torch.manual_seed(0)
    if base == "qwenimage":
        return jitter(family_vae(base, base_dim=8, num_res_blocks=1), 0)
    return jitter(family_vae(base, **TINY), 0)


@pytest.fixture
def qwen_edit_area(monkeypatch):
    """Qwen-Image-Edit's pipelines size their image at 1024^2 px: 96^2 here, for a CPU."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit, pipeline_qwenimage_edit_plus as plus
    for module in (edit, plus):
        dims = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio, dims=dims: dims(96 * 96, ratio))


def test_every_pipeline_of_the_table_is_tested_here_or_in_test_inpaint_bases():
    import test_inpaint_bases
    assert [p.cls for p in pipelines.PIPELINES] == list(test_inpaint_bases.BASE) + list(BASE)
    assert [p.cls for p in pipelines.PIPELINES if p.edit] == EDITS


@pytest.mark.parametrize("cls", list(BASE))
def test_each_pipeline_runs_from_the_command_line_and_the_api_at_the_inputs_shape(
        cls, decoders, tmp_path, monkeypatch, qwen_edit_area):
    inpaint = load_script("inpaint")
    calls = []  # what the script handed the Python API (ldm.decoding.pipelines.inpaint), which ran it
    monkeypatch.setattr(inpaint, "inpaint", lambda *a, **k: calls.append(k) or pipelines.inpaint(*a, **k))
    pipe, folder = tiny_pipelines.build(cls, their_vae(BASE[cls]), tmp_path)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls
    ours, ours_folder = decoders[BASE[cls]]
    image, mask, (image_file, mask_file) = inputs(tmp_path)
    control = -image  # a control image of the image's size (its negative)
    from PIL import Image
    Image.fromarray(pixels(control)).save(tmp_path / "control.png")
    takes_control = "control" in pipelines.entry(pipe).inputs
    size = [] if "QwenImageEdit" in cls else ["--size", str(SIDE.get(cls, 64))]
    common = ["--vae", str(ours_folder), "--pipeline", str(folder), "--steps", "2", "--device", "cpu", *size,
              *FLAGS.get(cls, []), *(["--edit"] if cls in EDITS else [])]
    out = tmp_path / "out" / "a.png"
    if cls == "StableDiffusionXLControlNetUnionInpaintPipeline":  # the batch file's control and control_mode
        (tmp_path / "list.csv").write_text("image,mask,prompt,out,control,control_mode\n"
                                           "img.png,mask.png,a cat,out/a.png,control.png,2\n")
        argv = common + ["--batch", str(tmp_path / "list.csv")]
    else:
        argv = common + ["--image", str(image_file), "--mask", str(mask_file), "--prompt", "a cat", "--out", str(out),
                         *(["--control", str(tmp_path / "control.png")] if takes_control else [])]
    assert inpaint.main(argv) == 0
    got = read(out)
    assert got.shape == (*SIZE, 3)  # the input's size
    assert (calls[0]["control"] is not None) == takes_control
    assert calls[0]["control_mode"] == (2 if "Union" in cls else None)
    assert calls[0]["extra"] == ({"pag_scale": 0.5} if cls in FLAGS else {})



REFUSED = {  # (model_index class, its VAE's base, --vae base, flags, the message): each before the pipeline loads
    "no control image": ("StableDiffusionControlNetInpaintPipeline", "sd1", "sd1", [],
                         "StableDiffusionControlNetInpaintPipeline takes a control image: give one (--control)"),
    "a control image it does not take": ("StableDiffusionPAGInpaintPipeline", "sd1", "sd1", ["--control", "{img}"],
                                         "StableDiffusionPAGInpaintPipeline takes no control image (--control)"),
    "a control mode it does not take": ("StableDiffusionXLControlNetInpaintPipeline", "sdxl", "sdxl",
                                        ["--control", "{img}", "--control-mode", "1"],
                                        "StableDiffusionXLControlNetInpaintPipeline takes no control_mode"),
    "an unknown --extra": ("FluxControlNetInpaintPipeline", "flux", "flux",
                           ["--control", "{img}", "--extra", "pag_scale=1"],
                           "FluxControlNetInpaintPipeline takes no pag_scale"),
    "an --extra inpaint.py sets": ("StableDiffusionPAGInpaintPipeline", "sd1", "sd1", ["--extra", "height=64"],
                                   "--extra height: set by inpainting itself"),
    "a strength an editing pipeline does not take": ("FluxKontextPipeline", "flux", "flux",
                                                     ["--edit", "--strength", "0.5"],
                                                     "FluxKontextPipeline takes no strength"),
    "an inpainting folder under --edit": ("FluxFillPipeline", "flux", "flux", ["--edit"],
                                          "model_index.json names 'FluxFillPipeline'; supported for editing "
                                          "(--edit): FluxKontextPipeline, QwenImageEditPipeline"),
    "an editing pipeline of another family": ("FluxKontextPipeline", "flux", "sd3", ["--edit"],
                                              "(base sd3); the pipeline's VAE has 16 latent channels, no quant "
                                              "convs, scaling_factor 0.3611, shift_factor 0.1159"),
    "a ControlNet pipeline of another family": ("QwenImageControlNetInpaintPipeline", "qwenimage", "flux", [],
                                                "(base flux); the pipeline's VAE has 16 latent channels, quant convs, "
                                                "per-channel latent statistics"),
}
QWEN_VAE = dict(_class_name="AutoencoderKLQwenImage", z_dim=16, latents_mean=[0.1] * 16, latents_std=[2.0] * 16)


@pytest.mark.parametrize("case", list(REFUSED))
def test_inputs_a_pipeline_does_not_take_are_refused_by_name_before_it_loads(case, decoders, tmp_path, capsys,
                                                                             monkeypatch):
    inpaint = load_script("inpaint")
    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("loaded"))
    cls, vae_base, base, flags, message = REFUSED[case]
    vae = QWEN_VAE if vae_base == "qwenimage" else family_config(vae_base)
    folder = tmp_path / "pipeline"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    for name in ("x.png", "y.png"):
        (tmp_path / name).touch()
    args = ["--vae", str(decoders[base][1]), "--pipeline", str(folder), "--image", str(tmp_path / "x.png"),
            "--mask", str(tmp_path / "y.png"), "--prompt", "p", "--out", str(tmp_path / "o.png")]
    assert inpaint.main(args + [f.format(img=tmp_path / "x.png") for f in flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_api_refuses_a_decoder_of_another_family_by_name_before_running_the_pipeline(decoders, tmp_path,
                                                                                         monkeypatch):
    pipe, _ = tiny_pipelines.build("FluxKontextPipeline", their_vae("flux"), tmp_path)
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("ran"))
    image, mask, _ = inputs(tmp_path)
    with pytest.raises(pipelines.PipelineError, match=r"a decoder for a FluxKontextPipeline: a decoder for 4 latent "
                                                      r"channels.*\(base sd1\)"):
        pipelines.inpaint(pipe, decoders["sd1"][0], image, mask, "a cat", steps=2, size=64)


def briefly_trained_flux_decoder(steps=20):
    """Our tiny FLUX.1-family decoder whose masked-image branch and output head were trained for a few steps to
    reproduce the known region (random latents, random smooth images and 8x8-block masks, 16 px), the rest as
    built."""
    torch.manual_seed(0)
    ours = build_autoencoder(**{**base_kwargs("flux"), "ch": 32, "num_res_blocks": 1, "encoder_ch": 32,
                                "encoder_num_res_blocks": 1})
    for name, p in ours.named_parameters():
        p.requires_grad_(name.startswith(("decoder.encoder.", "decoder.norm_out", "decoder.conv_out")))
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.nn.functional.interpolate(torch.rand(4, 3, 2, 2, generator=g) * 2 - 1, (16, 16), mode="bilinear")
        m = (torch.rand(4, 1, 2, 2, generator=g) > 0.5).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
        z = 3 * torch.randn(4, 16, 2, 2, generator=g)  # about a FLUX.1 pipeline's latents / 0.3611
        loss = ((ours.decode(z, x, m) - x).abs() * (1 - m)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ours.eval().requires_grad_(False)


def test_an_edit_keeps_the_region_outside_its_mask_closer_to_the_original_with_our_decoder(tmp_path):
    """FLUX.1 Kontext's edit decoded twice from the same final latents: by our decoder told the region the edit may
    change, and by the pipeline's VAE, which is our decoder without the branch (the same weights otherwise)."""
    from ldm.modules.sd.keys import ldm_to_diffusers
    ours = briefly_trained_flux_decoder()
    vae = diffusers.AutoencoderKL(**TINY, **family_config("flux"))
    vae.load_state_dict({k: v for k, v in ldm_to_diffusers(ours.state_dict()).items()
                         if not k.startswith("decoder.condition_encoder.")})
    pipe, _ = tiny_pipelines.build("FluxKontextPipeline", vae.eval(), tmp_path)
    image, mask, _ = inputs(tmp_path)
    mine, theirs = pipelines.inpaint(pipe, ours, image, mask, "make it red", compare=True, steps=2, size=64)
    kept = (1 - mask).expand_as(image).bool()
    error = {name: (y - image).abs()[kept].mean().item() for name, y in (("ours", mine), ("theirs", theirs))}
    assert error["ours"] < 0.9 * error["theirs"], error  # the same weights but the branch: equal without it
