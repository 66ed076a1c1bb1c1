"""The four bases (configs/bases/): import each family's VAE as diffusers saves it and as its original single
file, train on it, export it, and refuse a VAE of another family. Reference models are random, saved by diffusers."""
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm import AsymmetricAutoencoderKL, load_autoencoder
from ldm.convert import diffusers_to_ldm

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from probe_utils import load_script
from test_interop import jitter

ROOT = Path(__file__).resolve().parents[1]
BASES = ("sd1", "sdxl", "sd3", "flux")
TOL = 1e-4
TINY = dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1)  # = encoder_ch 32, 1 block per level
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
    """The diffusers AutoencoderKL arguments of the family (BASES.md), from the base's YAML."""
    kw, (scale, shift) = base_kwargs(base), factors(base)
    return dict(latent_channels=kw["z_channels"], use_quant_conv=kw["use_quant_conv"],
                use_post_quant_conv=kw["use_quant_conv"], scaling_factor=scale,
                shift_factor=shift or None, norm_num_groups=32, **BLOCKS)


def test_base_configs_state_the_families_of_bases_md():
    want = {"sd1": (4, True, 0.18215, 0.0), "sdxl": (4, True, 0.13025, 0.0), "sd3": (16, False, 1.5305, 0.0609),
            "flux": (16, False, 0.3611, 0.1159)}
    for base in BASES:
        kw = base_kwargs(base)
        assert (kw["z_channels"], kw["use_quant_conv"], *factors(base)) == want[base]
        assert kw["embed_dim"] == kw["z_channels"] and kw["base"] == base
    assert base_kwargs("sd1") == OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "base.yaml")
                                                        .model.autoencoder)  # sd1 is the default


def family_files(base, folder: Path):
    """A random diffusers AutoencoderKL of the family saved by diffusers (as a pipeline folder's vae/) and as its
    original single file: SD1 ldm .ckpt, sdxl_vae.safetensors, a full SD3 checkpoint, BFL's FLUX ae.safetensors."""
    torch.manual_seed(BASES.index(base))
    ref = jitter(diffusers.AutoencoderKL(**TINY, **family_config(base)), BASES.index(base))
    ref.save_pretrained(folder / "pipeline" / "vae")
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    state = diffusers_to_ldm(ref.state_dict())
    # the single file is in the layout diffusers' own converter reads: it gives back exactly the weights
    back = convert_ldm_vae_checkpoint(state, dict(ref.config))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in ref.state_dict().items())
    assert any(k.startswith("quant_conv.") for k in state) == (base in ("sd1", "sdxl"))
    single = {"sd1": "kl-f8.ckpt", "sdxl": "sdxl_vae.safetensors", "sd3": "sd3_medium.safetensors",
              "flux": "ae.safetensors"}[base]
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
    ref, pipeline, single = families[base]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, ref.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        mean, dec = ref.encode(image).latent_dist.mean, ref.decode(z).sample
    kw = base_kwargs(base)
    for path in (pipeline, single):  # a pipeline folder reads its vae/ (test_interop: a vae folder itself)
        vae = load_autoencoder(path)
        assert vae.config["z_channels"] == kw["z_channels"] and vae.config["use_quant_conv"] == kw["use_quant_conv"]
        assert hasattr(vae.quant_conv, "weight") == kw["use_quant_conv"]
        with torch.no_grad():  # x1 layout: the decoder core warm-starts from the family's decoder
            assert (vae.encode(image).mean - mean).abs().max() < TOL, (base, path)
            assert (vae.decode(z) - dec).abs().max() < TOL, (base, path)
        assert vae.load_report.fresh and all(k.startswith("decoder.encoder.") for k in vae.load_report.fresh)
    folder_vae = load_autoencoder(pipeline)  # config.json states the factors
    assert folder_vae.config["latent_norm"] == kw["latent_norm"]
    assert (folder_vae.latent_norm.scale, folder_vae.latent_norm.shift) == tuple((v,) for v in factors(base))


@pytest.mark.parametrize("base", BASES)
def test_x1_decoder_is_the_familys_diffusers_decoder_plus_the_branch(base):
    kw = base_kwargs(base)
    sd = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    with torch.device("meta"):
        ours = AsymmetricAutoencoderKL(**kw)
        family = diffusers.AutoencoderKL(**sd, **family_config(base))
        asym = diffusers.AsymmetricAutoencoderKL(**BLOCKS, down_block_out_channels=sd["block_out_channels"],
                                                 up_block_out_channels=sd["block_out_channels"],
                                                 layers_per_down_block=2, layers_per_up_block=2,
                                                 latent_channels=kw["z_channels"])

    def count(m):
        return sum(p.numel() for p in m.parameters())
    assert count(ours.decoder) == count(family.decoder) + count(asym.decoder.condition_encoder)
    assert count(ours.encoder) + count(ours.quant_conv) == count(family.encoder) + count(family.quant_conv or
                                                                                         torch.nn.Identity())


def _train_args(base, vae_ckpt, log_dir, *extra):
    return ["-c", str(ROOT / "configs" / "x1.yaml"), "-c", str(ROOT / "configs" / "bases" / f"{base}.yaml"),
            f"model.vae_ckpt={vae_ckpt}", "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
            "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1",
            "perceptual.pretrained=false", "discriminator.ndf=8", "discriminator.n_layers=2",
            "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_size=2",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "trainer.max_steps=2",
            "optim.warmup_steps=1", "loss.disc_start=1", "ema.decay=0.9", f"run.log_dir={log_dir}", *extra]


@pytest.mark.parametrize(("base", "other"), [("sd1", "flux"), ("flux", "sd1"), ("sdxl", "sd3")])
def test_a_vae_of_another_family_is_refused_naming_both(families, base, other, tmp_path, capsys):
    import train
    _, pipeline, single = families[other]
    for path in (pipeline, single):
        assert train.main(_train_args(base, path, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: model.vae_ckpt"), err
        assert re.search(rf"a [\w ]*\b{other}\b[\w ]* VAE .* configured for {base} ", err), err
    assert not (tmp_path / "run").exists()


def test_sdxl_single_file_trains_in_an_sd1_or_sdxl_run_but_its_folder_only_in_sdxl(families, tmp_path, capsys):
    """sd1 and sdxl files have the same shapes: the configured base decides; config.json's factor does not lie."""
    import train
    from ldm.bases import check_base, read_bases
    from ldm.convert import read_checkpoint
    bases = read_bases(ROOT / "configs" / "bases")
    _, pipeline, single = families["sdxl"]
    for base in ("sd1", "sdxl"):
        check_base("x", read_checkpoint(single).config, base_kwargs(base), bases)
    check_base("x", read_checkpoint(pipeline).config, base_kwargs("sdxl"), bases)
    assert train.main(_train_args("sd1", pipeline, tmp_path)) == 2
    assert "a sdxl VAE (4 latent channels, quant convs, scaling_factor 0.13025" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("base", BASES)
def test_train_export_and_decode_in_diffusers_for_each_base(families, base, tmp_path):
    """A few steps (GAN, EMA, validation) with configs/bases/<base>.yaml on the family's VAE -> export
    diffusers -> from_pretrained -> decode(z, image, mask) equals ours, with holes and with an all-ones mask."""
    import train
    _, pipeline, single = families[base]
    extra = ["trainer.precision=bf16-mixed"] if base == "flux" else []
    assert train.main([*_train_args(base, single if base == "sd3" else pipeline, tmp_path, *extra),
                       "--name", "run"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["config"]["model"]["autoencoder"]["base"] == base  # the run checkpoint names its base
    ours = load_autoencoder(ckpt)
    assert ours.config["base"] == base and ours.load_report.ema
    export = load_script("export")
    export.export(ckpt, tmp_path / "diffusers", "diffusers")
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    kw = base_kwargs(base)
    assert (config["_base"], config["scaling_factor"], config["_latent_norm"], config["latent_channels"]) == (
        base, factors(base)[0], kw["latent_norm"], kw["z_channels"])
    assert load_autoencoder(tmp_path / "diffusers").config["latent_norm"] == kw["latent_norm"]
    theirs, info = diffusers.AsymmetricAutoencoderKL.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
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
    posteriors of its encoder (C = 4 or 16), and train.py's datamodule takes the cache for that encoder."""
    import io
    import sys

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from data import ImageMaskDataModule
    from data.latents import encoder_fingerprint
    sys.path.insert(0, str(ROOT / "scripts"))
    import cache_latents
    _, _, single = families[base]
    args = ["-c", str(ROOT / "configs" / "x1.yaml"), "-c", str(ROOT / "configs" / "bases" / f"{base}.yaml"),
            f"model.vae_ckpt={single}", "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
            "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1", "data.resolution=32",
            "--out", str(tmp_path), "--workers", "0", "--limit", "2", "--batch-size", "2"]
    assert cache_latents.main(args) == 0
    shards = sorted(tmp_path.glob("*.tar"))
    samples = list(wds.tarfile_samples({"url": str(u)} for u in shards))
    assert len(samples) == 2
    vae = load_autoencoder(single)
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
def test_a_16_channel_base_compiles_resumes_and_trains_under_ddp(families, tmp_path):
    """FLUX's layout (16 channels, no quant convs) through the run's other features: model.compile (aot_eager),
    a resume to a later max_steps, and two DDP processes on the CPU (gloo, trainer.strategy=ddp) to the last step."""
    import subprocess
    import sys

    import train
    _, pipeline, _ = families["flux"]
    args = _train_args("flux", pipeline, tmp_path, "model.compile=aot_eager")
    assert train.main([*args, "--name", "run"]) == 0
    assert train.main([*args, "trainer.max_steps=4", "--name", "run", "--resume", "auto"]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["config"]["trainer"]["max_steps"] == 4
    ddp = [*_train_args("flux", pipeline, tmp_path), "trainer.devices=2", "trainer.strategy=ddp", "--name", "ddp"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *ddp], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["config"]["model"]["autoencoder"]["z_channels"] == 16
