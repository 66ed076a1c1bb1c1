"""Tier 2: every YAML under configs/ merges over the base strictly and builds its model."""
from pathlib import Path

import pytest
import torch

from ldm import build_autoencoder
from ldm.training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"
# configs/ablations/sets/ hold ablation sets (scripts/ablate.py; tests/test_ablate.py), not configs
ALL = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p != BASE and p.parent.name != "sets")


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(ROOT / "configs")) for p in ALL])
def test_every_config_loads_and_builds_its_autoencoder(path):
    cfg = load_config(BASE, [path])
    kw = cfg.model.autoencoder
    with torch.device("meta"):
        model = build_autoencoder(**kw)
    assert model.family == kw.family  # Qwen-Image's widths: ch x 96 / 128 (tests/test_qwenimage.py)
    assert model.decoder.conv_out.in_channels == kw.ch * kw.ch_mult[0] * (3 / 4 if kw.family == "qwenimage" else 1)
    blocks = [m for m in model.decoder.modules() if type(m).__name__ in ("ResnetBlock", "ResidualBlock")]
    assert len(blocks) == (kw.num_res_blocks + 1) * len(kw.ch_mult) + 2  # each level's, the mid block's two


REDUCED = ["model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1", "model.autoencoder.encoder_ch=32",
           "model.autoencoder.encoder_num_res_blocks=1", "perceptual.pretrained=false", "discriminator.ndf=8",
           "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_size=2",
           "model.vae_ckpt=null"]  # the SD weights are the user's file (and of full width)


@pytest.fixture(scope="module")
def one_lpips_per_setting():
    """LPIPS is frozen and the same for every config with the same `perceptual` settings: built once per setting
    (VGG16's features, about 0.7 s of CPU), not once per config."""
    import ldm.training.run
    real, built = ldm.training.run.PerceptualLoss, {}

    def shared(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = real(**kwargs)
        return built[key]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.training.run, "PerceptualLoss", shared)
        yield built


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(ROOT / "configs")) for p in ALL])
def test_every_config_instantiates_and_validates_at_reduced_size(path, one_lpips_per_setting):
    """The whole run of each YAML at reduced widths: system, data and masks, one validation batch with LPIPS."""
    from data import ImageMaskDataModule
    from ldm.training.run import build_system
    cfg = load_config(BASE, [path], REDUCED)
    torch.manual_seed(0)
    system = build_system(cfg)
    data = ImageMaskDataModule(**cfg.data)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    n, (h, w) = (2, (32, 32)) if len(data.buckets) == 1 else (1, data.buckets[0])  # multi-aspect: image 0's bucket
    assert batch["image"].shape == (n, 3, h, w) and batch["mask"].shape == (n, 1, h, w)
    system.eval()
    with torch.no_grad():
        system.on_validation_epoch_start()
        system.validation_step(batch, 0)
    assert {"l1", "psnr_hole", "lpips_whole"} <= set(system.val_sums)  # LPIPS reported whatever its loss weight
    assert system.vae.decoder.use_condition == cfg.model.autoencoder.use_condition
    assert system.perceptual is one_lpips_per_setting[tuple(sorted(cfg.perceptual.items()))]


@pytest.mark.parametrize("name,ch,blocks,params", [
    ("x1", 128, 2, 60_276_227), ("x1_5", 192, 3, 160_136_835), ("x2", 256, 5, 371_966_467)])
def test_width_presets_select_the_paper_widths(name, ch, blocks, params):
    cfg = load_config(BASE, [ROOT / "configs" / f"{name}.yaml"])
    assert (cfg.model.autoencoder.ch, cfg.model.autoencoder.num_res_blocks) == (ch, blocks)
    with torch.device("meta"):
        model = build_autoencoder(**cfg.model.autoencoder)
    assert sum(p.numel() for p in model.decoder.parameters()) == params


def test_later_files_and_overrides_win(tmp_path):
    delta = tmp_path / "delta.yaml"
    delta.write_text("model:\n  autoencoder:\n    ch: 64\n")
    cfg = load_config(BASE, [ROOT / "configs" / "x2.yaml", delta], ["model.autoencoder.num_res_blocks=1",
                                                                     "optim.base_lr=1e-4"])
    assert cfg.model.autoencoder.ch == 64 and cfg.model.autoencoder.num_res_blocks == 1
    assert cfg.optim.base_lr == 1e-4


@pytest.mark.parametrize("overrides,message", [
    (["model.autoencoder.chh=64"], "unknown config key 'model.autoencoder.chh'"),
    (["optimm.base_lr=1"], "unknown config key 'optimm'"),
    (["model.autoencoder.ch=wide"], "config key 'model.autoencoder.ch' expects int"),
    (["model.autoencoder.use_condition=1"], "config key 'model.autoencoder.use_condition' expects bool"),
    (["model.autoencoder=3"], "config key 'model.autoencoder' expects a section"),
    (["model.autoencoder.ch"], "not of the form key=value"),
    (["optim.base_lr=null"], r"config key 'optim.base_lr' cannot be null: it expects a value \(4\.5e-06\)"),
    (["model.autoencoder.ch_mult=null"], "config key 'model.autoencoder.ch_mult' cannot be null: it expects a list"),
    (["loss=null"], "config key 'loss' cannot be null: it expects a section"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE, [], overrides)


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("loss:\n  l1_wieght: 2.0\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'loss.l1_wieght'"):
        load_config(BASE, [bad])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(BASE, [tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config file .*broken.yaml"):
        load_config(BASE, [broken])


def test_null_overrides_only_null_and_nullable_keys():
    nulls = ["data.val_size=null", "ema.decay=null", "model.vae_ckpt=null", "model.compile=null",
             "trainer.limit_val_batches=null"]
    cfg = load_config(BASE, [ROOT / "configs" / "x1.yaml"], nulls)
    assert cfg.data.val_size is None and cfg.ema.decay is None and cfg.model.compile is None
    assert cfg.model.vae_ckpt is None  # null in base.yaml: nullable though x1.yaml sets it
    assert cfg.trainer.limit_val_batches is None  # Lightning checks its own arguments


def test_float_keys_accept_ints_and_merged_config_is_strict():
    cfg = load_config(BASE, [], ["optim.base_lr=1"])
    assert cfg.optim.base_lr == 1
    from omegaconf.errors import ConfigAttributeError
    with pytest.raises(ConfigAttributeError, match="Key 'nonexistent' is not in struct"):
        _ = cfg.optim.nonexistent
    with pytest.raises(ConfigAttributeError, match="Key 'nonexistent' is not in struct"):
        cfg.optim.nonexistent = 1.0  # a misspelt key set in code fails too
