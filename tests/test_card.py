"""scripts/export.py's model card (README.md beside the weights): its usage snippet, extracted and run as written
against the export (a tiny SD 1.x inpainting pipeline, offline; the pipe.vae form for a diffusers export, our Python
API for a decoder export), and its figures: the checkpoint's config and step, the model's parameter counts, the run's
last validation row at or before that step (metrics.csv)."""
import csv
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
import tiny_pipelines  # noqa: E402
from ldm import AsymmetricAutoencoderKL  # noqa: E402
from ldm.training.config import load_config, to_container  # noqa: E402
from probe_utils import load_script  # noqa: E402
from test_bases import TINY, family_config  # noqa: E402
from test_interop import jitter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
export = load_script("export")
# the run's departures from the paper's recipe (base.yaml: x1 over sd1)
DEPARTURES = ["model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1", "model.autoencoder.encoder_ch=32",
              "model.autoencoder.encoder_num_res_blocks=1", "data.resolution=64", "data.batch_size=2",
              "loss.disc_start=3", "perceptual.pretrained=false", "trainer.max_steps=6"]
NOT_RECIPE = ["run.log_dir=elsewhere", "data.num_workers=0", "trainer.accelerator=cpu"]


def write_metrics(path):
    """metrics.csv as Lightning's CSVLogger writes it (0-based steps): train rows, validations after steps 2, 4, 6."""
    rows = [{"epoch": 0, "step": s, "train/loss": 0.5 - s / 20} for s in range(6)]
    rows += [{"epoch": 0, "step": s, "val/l1": 0.4 - s / 50, "val/lpips_whole": 0.15 + s / 1000,
              "val/psnr_known": 12.5 + s} for s in (1, 3, 5)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/loss", "val/l1", "val/lpips_whole", "val/psnr_known"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["step"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (checkpoint at step 4 of 6, metrics.csv) of a tiny SD 1.x decoder, and a tiny pipeline."""
    root = tmp_path_factory.mktemp("card")
    cfg = to_container(load_config(ROOT / "configs" / "base.yaml", [], [*DEPARTURES, *NOT_RECIPE]))
    torch.manual_seed(0)
    model = jitter(AsymmetricAutoencoderKL(**cfg["model"]["autoencoder"]), 0)
    ckpt = root / "run" / "checkpoints" / "step00000004.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in model.state_dict().items()}, "config": cfg,
                "global_step": 4}, ckpt)
    write_metrics(root / "run" / "metrics.csv")
    their_vae = jitter(diffusers.AutoencoderKL(**TINY, **family_config("sd1")), 1)
    _, pipeline = tiny_pipelines.build("StableDiffusionInpaintPipeline", their_vae, root)
    return ckpt, model, pipeline


def snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, card
    return blocks[0]


@pytest.mark.parametrize("fmt", ["diffusers", "decoder"])
def test_the_cards_snippet_runs_as_written_against_the_export(run, tmp_path, monkeypatch, fmt):
    ckpt, _, pipeline = run
    out = tmp_path / "export"
    assert export.main([str(ckpt), "--out", str(out), "--format", fmt, "--pipeline", str(pipeline)]) == 0
    code = snippet((out / "README.md").read_text())
    assert ("pipe.vae = AsymmetricAutoencoderKL.from_pretrained" in code) == (fmt == "diffusers")
    monkeypatch.chdir(tmp_path)
    cls, call = diffusers.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline.__call__
    # the snippet runs unchanged; its pipeline's 50 denoising steps (diffusers' default, ours) are cut to 2 here
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: call(self, *a, **{**k, "num_inference_steps": 2}))
    Image.new("RGB", (64, 48), (200, 120, 40)).save("image.png")
    mask = Image.new("L", (64, 48))
    mask.paste(255, (16, 8, 48, 40))
    mask.save("mask.png")
    exec(compile(code, str(out / "README.md"), "exec"), {"__name__": "__main__"})
    with Image.open("inpainted.png") as result:
        assert result.size == ((64, 48) if fmt == "decoder" else (64, 64))  # ours: the image's size; SD's: 64 px


def test_the_cards_figures_are_the_checkpoints_config_and_the_runs_last_validation(run, tmp_path):
    ckpt, model, _ = run
    paths = export.export(ckpt, tmp_path / "out", "decoder", configs=ROOT / "configs")
    card = (tmp_path / "out" / "README.md").read_text()
    assert paths[-1] == tmp_path / "out" / "README.md"
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card.split("---")[1]
    assert "- Steps: 4 of trainer.max_steps 6" in card  # step00000004.ckpt, not the run's last step
    assert "## Validation at step 4" in card  # the row of 0-based step 3: 4 steps done
    assert "| val/l1 | 0.34 |" in card and "| val/lpips_whole | 0.153 |" in card and "| val/psnr_known | 15.5 |" in card
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    assert (f"decoder {count(model.decoder, model.post_quant_conv):,} (its masked-image branch "
            f"{count(model.decoder.encoder):,}); encoder {count(model.encoder, model.quant_conv):,}") in card
    recipe = next(line for line in card.splitlines() if line.startswith("- Recipe:"))
    assert re.findall(r"`([^`]+)`", recipe) == DEPARTURES, recipe
