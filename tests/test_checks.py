"""Every config value out of its domain (ldm/training/checks.py) and every bad script argument stops the run before
anything is built: one line naming the key (or flag), exit code 2, no traceback."""
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.training.checks import ANY_VALUE_OF_ITS_TYPE, RULES, leaves, pointless
from ldm.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))  # profile_step, benchmark_data

# (overrides, the key the error names); the first four are the issue's (17), then one per rule of RULES
BAD = [
    (["data.resolution=60"], "data.resolution"),  # the datamodule's ValueError
    (["model.autoencoder.ch=100"], "model.autoencoder.ch"),  # GroupNorm's "divisible by num_groups"
    (["data.batch_size=0"], "data.batch_size"),  # a ZeroDivisionError
    (["data.masks.p_full=1.5"], "data.masks.p_full"),
    (["seed=-1"], "seed"),
    (["model.vae_ckpt=3"], "model.vae_ckpt"),
    (["model.autoencoder.family=sdxl"], "model.autoencoder.family"),
    (["model.autoencoder.encoder_ch_mult=[1,0,4,4]"], "model.autoencoder.encoder_ch_mult"),
    (["model.autoencoder.ch_mult=[1,2,4]"], "model.autoencoder.ch_mult"),  # upsamples twice, the encoder 3 times
    (["model.autoencoder.ch=0"], "model.autoencoder.ch"),
    (["model.autoencoder.encoder_ch=-32"], "model.autoencoder.encoder_ch"),
    (["model.autoencoder.encoder_ch=48"], "model.autoencoder.encoder_ch"),  # 48 x 1 is not a multiple of 32
    (["model.autoencoder.num_res_blocks=0"], "model.autoencoder.num_res_blocks"),
    (["model.autoencoder.encoder_num_res_blocks=0"], "model.autoencoder.encoder_num_res_blocks"),
    (["model.autoencoder.z_channels=0"], "model.autoencoder.z_channels"),
    (["model.autoencoder.embed_dim=0"], "model.autoencoder.embed_dim"),
    (["model.autoencoder.use_quant_conv=false", "model.autoencoder.embed_dim=8"], "model.autoencoder.embed_dim"),
    (["model.autoencoder.latent_norm.scale=[0]"], "model.autoencoder.latent_norm.scale"),
    (["model.autoencoder.latent_norm.shift=[.inf]"], "model.autoencoder.latent_norm.shift"),
    (["model.autoencoder.latent_norm.scale=[1,2]"], "model.autoencoder.latent_norm.scale"),  # 1 or 4 values
    (["model.autoencoder.latent_norm.patch_size=0"], "model.autoencoder.latent_norm.patch_size"),
    (["model.autoencoder.base=' '"], "model.autoencoder.base"),
    (["model.compile=3"], "model.compile"),
    (["model.latent_noise=-0.1"], "model.latent_noise"),
    (["model.val_latent_noise=-1"], "model.val_latent_noise"),
    (["data.source=''"], "data.source"),
    (["data.val_source=5"], "data.val_source"),
    (["data.val_size=0"], "data.val_size"),
    (["data.resolution=16"], "data.resolution"),  # the discriminator's 3 halvings leave no patch at disc_start
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.seed=-3"], "data.seed"),
    (["data.epoch_length=0"], "data.epoch_length"),
    (["data.crop_min_scale=0"], "data.crop_min_scale"),
    (["data.shuffle_buffer=-1"], "data.shuffle_buffer"),
    (["data.aspect_ratios=[1.0,1.01]"], "data.aspect_ratios"),  # the same bucket twice
    (["data.masks.mix.thick=0", "data.masks.mix.medium=0", "data.masks.mix.thin=0"], "data.masks.p_full"),
    (["data.masks.presets.thick.boxes.weight=-0.3"], "data.masks.presets.thick.boxes.weight"),
    (["data.masks.presets.thin.strokes.min_times=0"], "data.masks.presets.thin.strokes.min_times"),
    (["data.masks.presets.medium.strokes.max_times=3"], "data.masks.presets.medium.strokes.max_times"),
    (["data.masks.presets.thick.strokes.max_width=0"], "data.masks.presets.thick.strokes.max_width"),
    (["data.masks.presets.thick.strokes.max_len=0"], "data.masks.presets.thick.strokes.max_len"),
    (["data.masks.presets.thick.strokes.max_angle=0"], "data.masks.presets.thick.strokes.max_angle"),
    (["data.masks.presets.medium.boxes.min_times=0"], "data.masks.presets.medium.boxes.min_times"),
    (["data.masks.presets.thick.boxes.max_times=0"], "data.masks.presets.thick.boxes.max_times"),
    (["data.masks.presets.thick.boxes.min_size=0"], "data.masks.presets.thick.boxes.min_size"),
    (["data.masks.presets.thick.boxes.max_size=20"], "data.masks.presets.thick.boxes.max_size"),  # < min_size 30
    (["data.masks.presets.thick.boxes.margin=60"], "data.masks.presets.thick.boxes.margin"),  # 150 + 120 > 256
    (["data.masks.presets.outpaint.outpaint.min_pad=-0.1"], "data.masks.presets.outpaint.outpaint.min_pad"),
    (["data.masks.presets.outpaint.outpaint.max_pad=0.01"], "data.masks.presets.outpaint.outpaint.max_pad"),
    (["data.masks.presets.outpaint.outpaint.p_side=2"], "data.masks.presets.outpaint.outpaint.p_side"),
    (["data.masks.mix.medium=-1"], "data.masks.mix.medium"),
    (["data.masks.presets.thin.strokes.weight=0"], "data.masks.mix.thin"),  # a ZeroDivisionError in the generator
    (["loss.l1_weight=-1"], "loss.l1_weight"),
    (["loss.l2_weight=-1"], "loss.l2_weight"),
    (["loss.perceptual_weight=-1"], "loss.perceptual_weight"),
    (["loss.l1_weight=0", "loss.perceptual_weight=0"], "loss.perceptual_weight"),
    (["loss.hole_weight=-1"], "loss.hole_weight"),
    (["loss.known_weight=-2"], "loss.known_weight"),
    (["loss.hole_weight=0", "loss.known_weight=0"], "loss.known_weight"),
    (["loss.disc_weight=-0.8"], "loss.disc_weight"),
    (["loss.disc_start=-1"], "loss.disc_start"),
    (["loss.disc_loss=hing"], "loss.disc_loss"),  # a ValueError at disc_start, hours in
    (["perceptual.net=alex"], "perceptual.net"),
    (["discriminator.ndf=0"], "discriminator.ndf"),
    (["discriminator.n_layers=0"], "discriminator.n_layers"),
    (["optim.base_lr=-1e-5"], "optim.base_lr"),
    (["optim.betas=[0.5,1.0]"], "optim.betas"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
    (["optim.warm_start_lr_scale=-0.1"], "optim.warm_start_lr_scale"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.accumulate_grad_batches=0"], "optim.accumulate_grad_batches"),
    (["optim.fused=3"], "optim.fused"),
    (["ema.decay=1.0"], "ema.decay"),
    (["run.log_dir=''"], "run.log_dir"),
    (["run.logger=neptune"], "run.logger"),
    (["run.wandb_project=''"], "run.wandb_project"),
    (["run.checkpoint_every_n_steps=0"], "run.checkpoint_every_n_steps"),
    (["run.keep_last_k=-2"], "run.keep_last_k"),
    (["run.max_nonfinite_steps=-1"], "run.max_nonfinite_steps"),
    (["run.sample_images=0"], "run.sample_images"),
    (["trainer.max_steps=-1"], "trainer.max_steps"),
    (["trainer.accelerator=gpus"], "trainer.accelerator"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
    (["trainer.strategy=3"], "trainer.strategy"),
    (["trainer.precision=bf61"], "trainer.precision"),
    (["trainer.benchmark=fast"], "trainer.benchmark"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches"),
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps"),
    (["trainer.enable_progress_bar=1"], "trainer.enable_progress_bar"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_value_out_of_its_domain_is_one_line_naming_the_key_and_exit_2(overrides, key, tmp_path, capsys):
    import train
    code = train.main([f"run.log_dir={tmp_path}", *overrides, "--name", "bad"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {key}: ") and ", got " in lines[0], lines[0]
    given = leaves(OmegaConf.to_container(OmegaConf.from_dotlist(overrides)))
    if key in given:  # the key set: its value is quoted back
        assert lines[0].endswith(f", got {given[key]!r}"), lines[0]
    assert not (tmp_path / "bad").exists()  # nothing built, nothing written


def test_every_rule_is_exercised_and_every_base_leaf_has_a_rule_or_none_is_needed():
    """A key added to configs/base.yaml needs a line in ldm/training/checks.py RULES (or ANY_VALUE_OF_ITS_TYPE), and a
    bad value here."""
    base = leaves(OmegaConf.to_container(OmegaConf.load(BASE)))
    patterns = [p for p, _ in RULES]
    assert [k for k in base if not any(fnmatchcase(k, p) for p in patterns) and k not in ANY_VALUE_OF_ITS_TYPE] == []
    assert [p for p in patterns if not any(fnmatchcase(k, p) for k in base)] == []  # no rule for a gone key
    named = {key for _, key in BAD}
    assert [p for p in patterns if not any(fnmatchcase(k, p) for k in named)] == []


def test_good_edge_values_pass():
    cfg = load_config(BASE, [], ["data.resolution=16", "loss.disc_weight=0", "data.masks.p_full=1",
                                 "data.masks.mix.thick=0", "data.masks.mix.medium=0", "data.masks.mix.thin=0",
                                 "optim.betas=[0,0.999]", "ema.decay=0", "trainer.precision=bf16",
                                 "trainer.devices=[0,1]", "run.keep_last_k=-1", "model.autoencoder.ch=96",
                                 "model.autoencoder.ch_mult=[1,2,4,4]", "data.masks.presets.thin.strokes.weight=0",
                                 "data.masks.mix.thin=0", "trainer.limit_val_batches=0.5"])
    assert cfg.data.resolution == 16  # the GAN never runs (disc_weight 0): only LPIPS bounds the size


def test_values_that_do_nothing_in_this_run_are_named():
    cfg = load_config(BASE, [ROOT / "configs" / "x1.yaml"], ["trainer.max_steps=30"])
    notes = pointless(cfg)
    assert any(n.startswith("loss.disc_start=50001 >= trainer.max_steps=30") for n in notes), notes
    assert any(n.startswith("optim.warmup_steps=5000 > trainer.max_steps=30") for n in notes), notes
    assert any("never validates" in n for n in notes), notes
    assert pointless(load_config(BASE, [ROOT / "configs" / "demo.yaml"])) == []


SCRIPTS = [  # (module, argv, the flag and what it must be)
    ("eval", ["--decoder", "vanilla", "--data", "sample", "--masks", "thin", "--out", "o", "--resolution", "60"],
     "--resolution: 60: must be a positive multiple of 8"),
    ("eval", ["--decoder", "vanilla", "--data", "sample", "--masks", "thin", "--out", "o", "--max-area", "1.5"],
     "--max-area: 1.5: must be in [0, 1]"),
    ("eval", ["--decoder", "vanilla", "--data", "sample", "--masks", "thin", "--out", "o", "--vae", "/nowhere"],
     "--vae: /nowhere: no such file or folder"),
    ("eval", ["--decoder", "vanilla", "--data", "sample", "--masks", "thin", "--out", "o", "--aspect-ratios", "1,5"],
     "--aspect-ratios: '1,5': want comma-separated width/height ratios in [0.25, 4]"),
    ("export", ["/nowhere.ckpt", "--out", "o", "--format", "diffusers"], "checkpoint: /nowhere.ckpt: no such file"),
    ("inpaint", ["--vae", ".", "--pipeline", ".", "--image", "/nowhere.png", "--mask", "README.md", "--prompt", "p",
                 "--out", "o"], "--image: /nowhere.png: no such file or folder"),  # before the pipeline loads
    ("inpaint", ["--vae", ".", "--pipeline", ".", "--image", "README.md", "--mask", "README.md", "--prompt", "p",
                 "--out", "o", "--steps", "0"], "--steps: 0: must be at least 1"),
    ("make_shards", ["/nowhere", "out"], "src: /nowhere: no such folder"),
    ("make_shards", [".", "out", "--shard-size", "0"], "--shard-size: 0: must be at least 1"),
    ("eval", ["--decoder", "vanilla", "--data", "sample", "--masks", "thin", "--out", "o", "--tile", "8"],
     "--tile: 8: must be 0 (never) or larger than the overlap, 8 latent px"),
    ("inpaint", ["--vae", ".", "--pipeline", ".", "--image", "README.md", "--mask", "README.md", "--prompt", "p",
                 "--out", "o", "--tile", "1"], "--tile: 1: must be 0 (never) or larger than the overlap"),
    ("benchmark_decode", ["--tile", "8"], "--tile: 8: must be at least 9"),
    ("cache_latents", ["--out", "o", "--crops-per-image", "0"], "--crops-per-image: 0: must be at least 1"),
    ("cache_latents", ["--out", "o", "--workers", "x"], "--workers: 'x' is not an integer"),
    ("profile_step", ["-c", "configs/demo.yaml", "--warmup", "0"], "--warmup: 0: must be at least 1"),
    ("benchmark_data", ["--resolution", "100"], "--resolution: 100: must be a positive multiple of 8"),
]


@pytest.mark.parametrize("module,argv,message", SCRIPTS, ids=[f"{m} {' '.join(a[-2:])}" for m, a, _ in SCRIPTS])
def test_a_bad_script_argument_is_a_usage_error_naming_the_flag(module, argv, message, monkeypatch, capsys):
    import importlib
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])  # benchmark_data reads sys.argv
    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as stop:
        if module == "benchmark_data":
            script.main()
        else:
            (getattr(script, "parse_args", None) or script.main)(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err, err


# the issue's command (29): overrides before a flag and after it; every script that takes key=value overrides
INTERMIXED = [("train", ["-c", "configs/demo.yaml", "trainer.max_steps=2", "--name", "run1", "data.batch_size=2"]),
              ("ablate", ["-c", "configs/demo.yaml", "trainer.max_steps=2", "--variant", "no_gan", "data.batch_size=2"]),
              ("cache_latents", ["-c", "configs/demo.yaml", "trainer.max_steps=2", "--out", "o", "data.batch_size=2"]),
              ("benchmark", ["-c", "configs/demo.yaml", "trainer.max_steps=2", "--steps", "1", "data.batch_size=2"]),
              ("profile_step", ["-c", "configs/demo.yaml", "trainer.max_steps=2", "--steps", "1", "data.batch_size=2"])]


@pytest.mark.parametrize("module,argv", INTERMIXED, ids=[m for m, _ in INTERMIXED])
def test_overrides_stand_before_and_after_the_flags(module, argv, monkeypatch):
    import importlib
    monkeypatch.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    args = importlib.import_module(module).parse_args(argv)
    assert args.config == ["configs/demo.yaml"]
    assert (args.items if module == "ablate" else args.overrides) == ["trainer.max_steps=2", "data.batch_size=2"]


def test_the_issues_command_runs_as_typed(tmp_path):
    """`python train.py -c configs/demo.yaml trainer.max_steps=2 --name run1 data.batch_size=2` (with
    --print-run-dir: the parse is what was refused, 'unrecognized arguments: data.batch_size=2', exit 2)."""
    import subprocess
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "demo.yaml"), "trainer.max_steps=2",
           "--name", "run1", "data.batch_size=2", "--print-run-dir"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["logs/run1"], proc.stderr[-2000:]
