"""The bases (configs/bases/): import each family's VAE as diffusers saves it and as its original single file,
train on it, export it, and refuse a VAE of another family. Reference models are random, saved by diffusers.
Qwen-Image's (another layout: ldm/modules/qwenimage/autoencoder.py) decodes and encodes one frame; tests/test_qwenimage.py
has its own tests."""
import contextlib
import json
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm import PRESETS, AsymmetricAutoencoderKL, build_autoencoder, load_autoencoder
from ldm import CheckpointError
from ldm.modules.sd.keys import diffusers_to_ldm
from ldm.modules.qwenimage.keys import wan_keys
from ldm.latent_norm import LatentNorm

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers  # noqa: E402
from probe_utils import load_script
from test_interop import jitter

ROOT = Path(__file__).resolve().parents[1]
BASES = ("sd1", "sdxl", "sd3", "flux", "flux2", "qwenimage")
TOL = 1e-4
TINY = dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1)  # = encoder_ch 32, 1 block per level
# = encoder_ch 32 (base_dim 24), 2 blocks per level: diffusers' Wan converter knows no other count
QWEN_TINY = dict(base_dim=24, num_res_blocks=2)
BLOCKS = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def base_kwargs(base):
    """model.autoencoder of configs/bases/<base>.yaml over base.yaml."""
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "base.yaml"),
                          OmegaConf.load(ROOT / "configs" / "bases" / f"{base}.yaml"))
    return OmegaConf.to_container(cfg.model.autoencoder)


def factors(base):
    """(scaling_factor, shift_factor) of the base's latent_norm (one value each for these four)."""
    norm = base_kwargs(base)["latent_norm"]
    assert norm["patch_size"] == 1 and len(norm["scale"]) == len(norm["shift"]) == 1
    return norm["scale"][0], norm["shift"][0]


def family_config(base):
    """The diffusers AutoencoderKL arguments of a family with scalar factors (BASES.md), from the base's YAML."""
    kw, (scale, shift) = base_kwargs(base), factors(base)
    return dict(latent_channels=kw["z_channels"], use_quant_conv=kw["use_quant_conv"],
                use_post_quant_conv=kw["use_quant_conv"], scaling_factor=scale,
                shift_factor=shift or None, norm_num_groups=32, **BLOCKS)


def family_vae(base, **widths):
    """A random diffusers VAE of the family: AutoencoderKL, FLUX.2's AutoencoderKLFlux2 with random batch-norm
    statistics (its latent normalisation), or Qwen-Image's AutoencoderKLQwenImage (`widths`: its own)."""
    if base == "qwenimage":
        return diffusers.AutoencoderKLQwenImage(**widths)
    if base != "flux2":
        return diffusers.AutoencoderKL(**widths, **family_config(base))
    vae = diffusers.AutoencoderKLFlux2(**widths, **BLOCKS, latent_channels=base_kwargs(base)["z_channels"])
    if vae.bn.running_mean.device.type != "meta":
        g = torch.Generator().manual_seed(7)
        vae.bn.running_mean.copy_(torch.randn(128, generator=g))
        vae.bn.running_var.copy_(torch.rand(128, generator=g) + 0.5)
    return vae


def stated_norm(ref):
    """The latent_norm a family's VAE states, by the pipelines' formulas: its config's factors, FLUX.2's
    batch norm over 2x2 patches, (x - running_mean) / sqrt(running_var + eps), or Qwen-Image's (x - mean) / std."""
    if isinstance(ref, diffusers.AutoencoderKLQwenImage):
        return LatentNorm.from_mean_std(ref.config.latents_mean, ref.config.latents_std).as_config()
    if not hasattr(ref, "bn"):
        return LatentNorm.from_factors(ref.config.scaling_factor, ref.config.shift_factor).as_config()
    var, eps = ref.bn.running_var.double().tolist(), ref.config.batch_norm_eps
    return {"patch_size": 2, "shift": ref.bn.running_mean.double().tolist(),
            "scale": [1 / math.sqrt(v + eps) for v in var]}


@contextlib.contextmanager
def no_diffusers_warnings():
    """Fails if diffusers logs a warning (its own logger, which does not propagate) or Python warns meanwhile."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not said, said


def test_base_configs_state_the_families_of_bases_md():
    want = {"sd1": (4, True, 0.18215, 0.0), "sdxl": (4, True, 0.13025, 0.0), "sd3": (16, False, 1.5305, 0.0609),
            "flux": (16, False, 0.3611, 0.1159)}
    for base in BASES:
        kw = base_kwargs(base)
        assert kw["embed_dim"] == kw["z_channels"] and kw["base"] == base
        if base in want:
            assert (kw["z_channels"], kw["use_quant_conv"], *factors(base)) == want[base]
    assert (base_kwargs("flux2")["z_channels"], base_kwargs("flux2")["use_quant_conv"]) == (32, True)
    assert base_kwargs("flux2")["latent_norm"] == {"patch_size": 2, "shift": None, "scale": None}  # the file's
    assert base_kwargs("sd1") == OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "base.yaml")
                                                        .model.autoencoder)  # sd1 is the default
    named = {base: base_kwargs(base)["family"] for base in BASES}
    assert named == {**{b: "sd" for b in BASES}, "qwenimage": "qwenimage"}
    kw = base_kwargs("qwenimage")  # the released model's statistics: diffusers' AutoencoderKLQwenImage defaults
    with torch.device("meta"):
        released = diffusers.AutoencoderKLQwenImage().config
    assert (kw["z_channels"], kw["use_quant_conv"]) == (released.z_dim, True)
    assert LatentNorm.from_config(kw["latent_norm"]) == LatentNorm.from_mean_std(released.latents_mean,
                                                                               released.latents_std)


def qwen_reference(seed):
    """A random diffusers AutoencoderKLQwenImage: its RMS norms' gammas and biases perturbed, its output conv
    scaled so that the decode's clamp to [-1, 1] acts."""
    torch.manual_seed(seed)
    ref = jitter(family_vae("qwenimage", **QWEN_TINY), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".gamma"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        ref.decoder.conv_out.weight.mul_(4)
    return ref


def their_decode(ref, z):
    """The family's diffusers decode of latents (B, C, h, w): Qwen-Image's as one frame (B, C, 1, h, w)."""
    if isinstance(ref, diffusers.AutoencoderKLQwenImage):
        return ref.decode(z[:, :, None]).sample[:, :, 0]
    return ref.decode(z).sample


def their_mean(ref, image):
    if isinstance(ref, diffusers.AutoencoderKLQwenImage):
        return ref.encode(image[:, :, None]).latent_dist.mean[:, :, 0]
    return ref.encode(image).latent_dist.mean


def qwen_files(folder: Path):
    """A random AutoencoderKLQwenImage saved by diffusers (as a pipeline folder's vae/) and as the Wan-layout single
    file (qwen_image_vae.safetensors), which diffusers' own converter reads back exactly."""
    ref = qwen_reference(BASES.index("qwenimage"))
    ref.save_pretrained(folder / "pipeline" / "vae")
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    state = {k: v.contiguous() for k, v in wan_keys(ref.state_dict(), to_wan=True).items()}
    back = convert_wan_vae_to_diffusers(dict(state))
    assert back.keys() == ref.state_dict().keys() and "decoder.middle.0.residual.0.gamma" in state
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    save_file(state, folder / "qwen_image_vae.safetensors")
    return ref, folder / "pipeline", folder / "qwen_image_vae.safetensors"


def family_files(base, folder: Path):
    """A random diffusers VAE of the family saved by diffusers (as a pipeline folder's vae/) and as its original
    single file: SD1 ldm .ckpt, sdxl_vae.safetensors, a full SD3 checkpoint, BFL's FLUX ae.safetensors, BFL's
    FLUX.2 VAE file (ldm keys and bn.*, as diffusers' scripts/convert_flux2_to_diffusers.py reads it), Qwen-Image's
    Wan-layout file."""
    if base == "qwenimage":
        return qwen_files(folder)
    torch.manual_seed(BASES.index(base))
    ref = jitter(family_vae(base, **TINY), BASES.index(base))
    ref.save_pretrained(folder / "pipeline" / "vae")
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    state = diffusers_to_ldm(ref.state_dict())
    # the single file is in the layout diffusers' own converter reads: it gives back exactly the weights
    back = convert_ldm_vae_checkpoint(state, dict(ref.config))
    assert back.keys() == {k for k in ref.state_dict() if not k.startswith("bn.")}
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in ref.state_dict().items() if k in back)
    assert any(k.startswith("quant_conv.") for k in state) == (base in ("sd1", "sdxl", "flux2"))
    single = {"sd1": "kl-f8.ckpt", "sdxl": "sdxl_vae.safetensors", "sd3": "sd3_medium.safetensors",
              "flux": "ae.safetensors", "flux2": "flux2-vae.safetensors"}[base]
    if base == "sd1":
        torch.save({"state_dict": state}, folder / single)
    elif base == "sd3":  # a full checkpoint: first_stage_model.* beside the diffusion model
        save_file({**{f"first_stage_model.{k}": v.contiguous() for k, v in state.items()},
                   "model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2)}, folder / single)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / single)
    return ref, folder / "pipeline", folder / single


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {base: family_files(base, tmp_path_factory.mktemp(base)) for base in BASES}


@pytest.mark.parametrize("base", BASES)
def test_each_family_imports_as_folder_and_single_file_equal_to_diffusers(families, base):
    """Qwen-Image's: our 2D decoder and encoder on one frame equal diffusers' causal 3D ones, the clamp included."""
    ref, pipeline, single = families[base]
    g = torch.Generator().manual_seed(0)
    kw = base_kwargs(base)
    image = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    z = torch.randn(1, kw["z_channels"], 8, 6, generator=g)
    with torch.no_grad():
        mean, dec = their_mean(ref, image), their_decode(ref, z)
    if base == "flux2":  # diffusers 0.42 has no single-file loader for BFL's FLUX.2 VAE, so neither have we
        with pytest.raises(CheckpointError, match=r"flux2-vae.safetensors: batch-norm latent statistics .* give a "
                                                  r"diffusers AutoencoderKLFlux2 folder"):
            load_autoencoder(single)
    for path in (pipeline, single) if base != "flux2" else (pipeline,):  # a pipeline folder reads its vae/
        vae = load_autoencoder(path)
        assert vae.config["family"] == kw["family"] and vae.config["z_channels"] == kw["z_channels"]
        assert vae.config["use_quant_conv"] == kw["use_quant_conv"]
        assert hasattr(vae.quant_conv, "weight") == kw["use_quant_conv"]
        with torch.no_grad():  # x1 layout: the decoder core warm-starts from the family's decoder
            assert (vae.encode(image).mean - mean).abs().max() < TOL, (base, path)
            assert (vae.decode(z) - dec).abs().max() < TOL, (base, path)
        assert vae.load_report.fresh and all(k.startswith("decoder.encoder.") for k in vae.load_report.fresh)
    folder_vae = load_autoencoder(pipeline)  # config.json states the factors; FLUX.2's weights its statistics
    assert folder_vae.config["latent_norm"] == stated_norm(ref)
    if base == "qwenimage":  # a test that can fail: the clamp acts, and the 3D kernels' first taps are not zero
        assert (dec.abs() == 1).any() and (dec.abs() < 1).any()
        assert ref.decoder.up_blocks[0].resnets[0].conv1.weight[:, :, 0].abs().min() > 0
    if base != "flux2":
        assert folder_vae.config["latent_norm"] == kw["latent_norm"]
        return
    # FLUX.2's pipelines: patchify 2x2, then the VAE's frozen BatchNorm; back again before vae.decode
    from diffusers import Flux2KleinInpaintPipeline as Klein
    z = z.double()
    bn = ref.bn.double()
    with torch.no_grad():
        latents = bn(Klein._patchify_latents(z))
        assert torch.allclose(folder_vae.latent_norm.to_diffusion(z), latents, rtol=1e-12, atol=1e-12)
        std = (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1)
        back = Klein._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1))
        assert torch.allclose(folder_vae.latent_norm.from_diffusion(latents), back, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", BASES)
def test_x1_decoder_is_the_familys_diffusers_decoder_plus_the_branch(base):
    """Qwen-Image's as its one-frame weights: each 3D kernel's last temporal slice, no time_convs (temporal
    resampling: never run on one frame); its branch's count is tests/test_qwenimage.py's."""
    kw = base_kwargs(base)
    sd = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    with torch.device("meta"):
        ours = build_autoencoder(**kw)
        family = family_vae(base, **(sd if base != "qwenimage" else {}))  # Qwen-Image's released widths: base_dim 96
        asym = diffusers.AsymmetricAutoencoderKL(**BLOCKS, down_block_out_channels=sd["block_out_channels"],
                                                 up_block_out_channels=sd["block_out_channels"],
                                                 layers_per_down_block=2, layers_per_up_block=2,
                                                 latent_channels=kw["z_channels"])

    def count(m):
        return sum(p[:, :, -1].numel() if p.ndim == 5 else p.numel() for n, p in m.named_parameters()
                   if ".time_conv." not in n)
    assert count(ours.decoder) - count(ours.decoder.encoder) == count(family.decoder)
    if base != "qwenimage":
        assert count(ours.decoder.encoder) == count(asym.decoder.condition_encoder)
    assert count(ours.encoder) + count(ours.quant_conv) == count(family.encoder) + count(family.quant_conv or
                                                                                         torch.nn.Identity())


def test_a_flux2_vae_with_another_decoder_width_warm_starts_only_a_decoder_of_those_widths(tmp_path, caplog):
    """BFL's small FLUX.2 decoder (decoder_block_out_channels): the decoder's widths are read as the file's, not the
    encoder's; the encoder always loads, the decoder core only into a decoder of exactly its widths. A folder that
    lacks its batch-norm statistics is refused, naming the missing buffer."""
    from ldm import load_into
    torch.manual_seed(0)
    ref = jitter(family_vae("flux2", block_out_channels=[64, 128, 256, 256], layers_per_block=1,
                            decoder_block_out_channels=[32, 64, 128, 128]), 0)
    ref.save_pretrained(tmp_path / "vae")
    vae = load_autoencoder(tmp_path / "vae")
    assert (vae.config["encoder_ch"], vae.config["ch"]) == (64, 32)
    g = torch.Generator().manual_seed(0)
    image, z = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1, torch.randn(1, 32, 4, 6, generator=g)
    with torch.no_grad():
        assert (vae.encode(image).mean - ref.encode(image).latent_dist.mean).abs().max() < TOL
        assert (vae.decode(z) - ref.decode(z).sample).abs().max() < TOL
    kw = {**base_kwargs("flux2"), "encoder_ch": 64, "encoder_num_res_blocks": 1, "num_res_blocks": 1}
    for ch, warm in ((32, True), (64, False)):  # the decoder of the file's widths, and one of the encoder's
        model = AsymmetricAutoencoderKL(**{**kw, "ch": ch})
        with caplog.at_level(logging.WARNING, logger="ldm.formats.convert"):
            caplog.clear()
            report = load_into(model, tmp_path / "vae")
        assert any(k.startswith("encoder.") for k in report.loaded)
        assert any(k.startswith("decoder.up.") for k in report.loaded) == warm
        assert ("decoder not loaded, widths differ" in caplog.text) != warm
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"  # a folder without its latent statistics
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("bn.")}, weights)
    with pytest.raises(CheckpointError, match=r"safetensors: batch-norm latent statistics without bn.running_mean$"):
        load_autoencoder(tmp_path / "vae")


def test_flux2_decoder_parameter_counts():
    """configs/bases/flux2.yaml with each width preset, branch on (DESIGN.md's table at 32 latent channels: only
    conv_in differs); the frozen encoder and quant convs are the FLUX.2 VAE's."""
    def count(m):
        return sum(p.numel() for p in m.parameters())
    for preset, decoder in (("x1", 60_405_251), ("x1.5", 160_330_371), ("x2", 372_224_515)):
        with torch.device("meta"):
            vae = AsymmetricAutoencoderKL(**{**base_kwargs("flux2"), **PRESETS[preset]})
        assert count(vae.decoder) == decoder, preset
        assert (count(vae.encoder), count(vae.quant_conv), count(vae.post_quant_conv)) == (34_421_696, 4160, 1056)


def tiny_widths(base):
    """The tiny widths of the family files' encoders (QWEN_TINY, TINY), and a tiny decoder."""
    return ["model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1", "model.autoencoder.encoder_ch=32",
            f"model.autoencoder.encoder_num_res_blocks={2 if base == 'qwenimage' else 1}"]


def _train_args(base, vae_ckpt, log_dir, *extra):
    return ["-c", str(ROOT / "configs" / "x1.yaml"), "-c", str(ROOT / "configs" / "bases" / f"{base}.yaml"),
            f"model.vae_ckpt={vae_ckpt}", *tiny_widths(base),
            "perceptual.pretrained=false", "discriminator.ndf=8", "discriminator.n_layers=2",
            "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_size=2",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "trainer.max_steps=2",
            "optim.warmup_steps=1", "loss.disc_start=1", "ema.decay=0.9", f"run.log_dir={log_dir}", *extra]


@pytest.mark.parametrize(("base", "other"), [("sd1", "flux"), ("flux", "sd1"), ("sdxl", "sd3"), ("flux2", "flux"),
                                           ("sd1", "flux2"), ("flux", "flux2"), ("flux", "qwenimage"),
                                           ("qwenimage", "sd3")])
def test_a_vae_of_another_family_is_refused_naming_both(families, base, other, tmp_path, capsys):
    import train
    _, pipeline, single = families[other]
    for path in (pipeline, single) if other != "flux2" else (pipeline,):
        assert train.main(_train_args(base, path, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: model.vae_ckpt"), err
        assert re.search(rf"a [\w ]*\b{other}\b[\w ]* VAE .* configured for {base} ", err), err
    assert not (tmp_path / "run").exists()


def test_sdxl_single_file_trains_in_an_sd1_or_sdxl_run_but_its_folder_only_in_sdxl(families, tmp_path, capsys):
    """sd1 and sdxl files have the same shapes: the configured base decides; config.json's factor does not lie."""
    import train
    from ldm.formats.bases import check_base, read_bases
    from ldm.formats.convert import read_checkpoint
    bases = read_bases(ROOT / "configs" / "bases")
    _, pipeline, single = families["sdxl"]
    for base in ("sd1", "sdxl"):
        check_base("x", read_checkpoint(single).config, base_kwargs(base), bases)
    check_base("x", read_checkpoint(pipeline).config, base_kwargs("sdxl"), bases)
    assert train.main(_train_args("sd1", pipeline, tmp_path)) == 2
    assert "a sdxl VAE (4 latent channels, quant convs, scaling_factor 0.13025" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("base", [b for b in BASES if b != "qwenimage"])  # Qwen-Image's: tests/test_qwenimage.py
def test_train_export_and_decode_in_diffusers_for_each_base(families, base, tmp_path):
    """A few steps (GAN, EMA, validation) with configs/bases/<base>.yaml on the family's VAE -> export
    diffusers -> from_pretrained (no diffusers warning) -> decode(z, image, mask) equals ours, with holes and with an
    all-ones mask. The latent normalisation the file states travels into the run's checkpoint and the export."""
    import train
    ref, pipeline, single = families[base]
    extra = ["trainer.precision=bf16-mixed"] if base == "flux" else []
    assert train.main([*_train_args(base, single if base == "sd3" else pipeline, tmp_path, *extra),
                       "--name", "run"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["config"]["model"]["autoencoder"]["base"] == base  # the run checkpoint names its base
    assert saved["config"]["model"]["autoencoder"]["latent_norm"] == stated_norm(ref)  # and what its decoder decodes
    ours = load_autoencoder(ckpt)
    assert ours.config["base"] == base and ours.load_report.ema
    export = load_script("export")
    export.export(ckpt, tmp_path / "diffusers", "diffusers")
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    kw = base_kwargs(base)
    assert (config["_base"], config["_latent_norm"], config["latent_channels"]) == (base, stated_norm(ref),
                                                                                    kw["z_channels"])
    assert config["scaling_factor"] == (ref.config.scaling_factor if base != "flux2" else 1.0)
    assert load_autoencoder(tmp_path / "diffusers").config["latent_norm"] == stated_norm(ref)
    with no_diffusers_warnings():  # low_cpu_mem_usage=False: else it warns that `accelerate` is not installed
        theirs, info = diffusers.AsymmetricAutoencoderKL.from_pretrained(
            tmp_path / "diffusers", low_cpu_mem_usage=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, kw["z_channels"], 8, 8, generator=g)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    holes = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    for mask in (holes, torch.ones_like(holes)):
        with torch.no_grad():
            d = (ours.decode(z, image, mask) - theirs.eval().decode(z, image=image, mask=mask).sample).abs().max()
        assert d < TOL, (base, d.item())
    if not kw["use_quant_conv"]:  # identity 1x1 convs: exact, and read back as "no quant convs"
        assert torch.equal(theirs.post_quant_conv(z), z)
        assert load_autoencoder(tmp_path / "diffusers").config["use_quant_conv"] is False
    export.export(ckpt, tmp_path / "decoder", "decoder")
    assert load_autoencoder(tmp_path / "decoder").config["base"] == base
    if kw["z_channels"] == 4:
        export.export(ckpt, tmp_path / "official", "official")
        assert load_autoencoder(tmp_path / "official" / "model.ckpt").config["base"] == base
    else:
        with pytest.raises(ValueError, match="official holds 4-channel VAEs"):
            export.export(ckpt, tmp_path / "official", "official")


def test_eval_takes_a_vae_of_any_family(families, tmp_path, capsys):
    """scripts/eval.py with FLUX's ae.safetensors as --vae: vanilla and a FLUX decoder; a 4-channel one refused."""
    evaluate = load_script("eval")
    tiny = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)
    export = load_script("export")
    for base in ("flux", "sd1"):
        torch.manual_seed(0)
        export.save_decoder(jitter(AsymmetricAutoencoderKL(**{**base_kwargs(base), **tiny}), 0), tmp_path / base)
    _, _, single = families["flux"]
    args = ["--decoder", str(tmp_path / "flux"), "--decoder", "vanilla", "--vae", str(single), "--data", "sample",
            "--masks", "medium", "--resolution", "32", "--num-images", "2", "--batch-size", "2", "--workers", "0",
            "--no-lpips-pretrained", "--out", str(tmp_path / "eval")]
    assert evaluate.main(args) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "vanilla" in json.dumps(results) and (tmp_path / "eval" / "grid.png").is_file()
    args[1] = str(tmp_path / "sd1")
    capsys.readouterr()
    assert evaluate.main(args) == 2
    assert "decodes 4 latent channels (base sd1), --vae" in capsys.readouterr().err


@pytest.mark.parametrize("base", BASES)
def test_latent_cache_of_each_base_holds_its_posterior(families, base, tmp_path):
    """scripts/cache_latents.py with configs/bases/<base>.yaml and the family's single file: (C, R/8, R/8)
    posteriors of its encoder (C = 4, 16 or 32), and train.py's datamodule takes the cache for that encoder."""
    import io
    import sys

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from data import ImageMaskDataModule
    from data.latents import encoder_fingerprint
    sys.path.insert(0, str(ROOT / "scripts"))
    import cache_latents
    _, pipeline, single = families[base]
    path = single if base != "flux2" else pipeline  # FLUX.2: a diffusers folder only
    args = ["-c", str(ROOT / "configs" / "x1.yaml"), "-c", str(ROOT / "configs" / "bases" / f"{base}.yaml"),
            f"model.vae_ckpt={path}", *tiny_widths(base), "data.resolution=32",
            "--out", str(tmp_path), "--workers", "0", "--limit", "2", "--batch-size", "2"]
    assert cache_latents.main(args) == 0
    shards = sorted(tmp_path.glob("*.tar"))
    samples = list(wds.tarfile_samples({"url": str(u)} for u in shards))
    assert len(samples) == 2
    vae = load_autoencoder(path)
    channels = base_kwargs(base)["z_channels"]
    for s in samples:
        mean = torch.from_numpy(np.load(io.BytesIO(s["mean.npy"])))
        assert mean.shape == (channels, 4, 4)
        crop = torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])), dtype=np.float32)).permute(2, 0, 1)
        with torch.no_grad():
            assert (vae.encode(crop[None] / 127.5 - 1).mean[0] - mean).abs().max() < 1e-4
    dm = ImageMaskDataModule(source=str(shards[0]), resolution=32, batch_size=2, num_workers=0, epoch_length=2,
                             flip=False, encoder_fingerprint=encoder_fingerprint(vae))
    batch = next(iter(dm.train_dataloader()))
    assert batch["mean"].shape == batch["logvar"].shape == (2, channels, 4, 4)


def test_bases_of_one_layout_train_the_same_network():
    """sdxl trains sd1's network and sd3 FLUX's: a base's scaling and shift factors are config values that
    export and inpaint read, never the training step, so the training tests of sd1 (tests/test_train.py) and of
    FLUX's layout (here) cover the other two."""
    def shapes(base):
        torch.manual_seed(0)
        vae = AsymmetricAutoencoderKL(**{**base_kwargs(base), "ch": 32, "num_res_blocks": 1, "encoder_ch": 32,
                                         "encoder_num_res_blocks": 1})
        return {k: v.shape for k, v in vae.state_dict().items()}, vae

    for base, same in (("sdxl", "sd1"), ("sd3", "flux")):
        (a, vae_a), (b, vae_b) = shapes(base), shapes(same)
        assert a == b and factors(base) != factors(same)
        z = torch.randn(1, base_kwargs(base)["z_channels"], 4, 4)
        with torch.no_grad():
            assert torch.equal(vae_a.decode(z), vae_b.decode(z))  # the same seed, the same numbers
    assert shapes("sd1")[0] != shapes("flux")[0]


@pytest.mark.slow
@pytest.mark.parametrize("base", ["flux2", "qwenimage"])
def test_16_and_32_channel_bases_train_under_ddp_and_resume(families, base, tmp_path):
    """FLUX.2's layout (32 channels, quant convs, 128 latent statistics) and Qwen-Image's (16 channels, another
    family) through the run's other features: two DDP processes on the CPU (gloo, trainer.strategy=ddp) to the last
    step, then a resume of that run to a later max_steps in one process (Qwen-Image's compiled, aot_eager).
    Qwen-Image's exact resume: tests/test_qwenimage.py; FLUX.1's layout (16 channels, no quant convs) trains in
    test_train_export_and_decode_in_diffusers_for_each_base; sd1's under DDP and resumed: tests/test_train.py."""
    import subprocess
    import sys

    import train
    _, pipeline, _ = families[base]
    args = _train_args(base, pipeline, tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "trainer.devices=2", "trainer.strategy=ddp",
                           "--name", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["config"]["model"]["autoencoder"]["z_channels"] == base_kwargs(base)[
        "z_channels"]
    compiled = ["model.compile=aot_eager"] if base == "qwenimage" else []  # its own blocks; SD's: tests/test_train.py
    assert train.main([*args, *compiled, "trainer.max_steps=4", "--name", "run", "--resume", "auto"]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["config"]["trainer"]["max_steps"] == 4
