"""The Qwen-Image family (ldm/modules/qwenimage/autoencoder.py) beyond what tests/test_bases.py covers for every base (one-frame
parity with diffusers from a folder and a Wan single file, training, resume, DDP, the latent cache): the widths
of the presets, tiled decoding, the clamp's gradient and the diffusers export."""
import json
from pathlib import Path

import pytest
import torch

from ldm import PRESETS, build_autoencoder, load_autoencoder
from ldm.training.config import load_config
from ldm import CheckpointError

diffusers = pytest.importorskip("diffusers")
from probe_utils import load_script  # noqa: E402
from test_bases import base_kwargs, qwen_files as write_qwen_files, their_decode, their_mean  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)  # base_dim 24


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset, base_dim, decoder, branch", [
    ("x1", 96, 27_442_563, 2_150_880),
    ("x1.5", 144, 75_502_083, 4_836_816),
    ("x2", 192, 183_289_347, 8_596_416),
])
def test_parameter_counts_of_the_presets_and_the_width_rule(preset, base_dim, decoder, branch):
    """`-c configs/x1_5.yaml -c configs/bases/qwenimage.yaml` builds the x1.5 Qwen-Image decoder: the presets' ch
    (128 / 192 / 256) is read as base_dim = ch x 96 / 128, num_res_blocks as given; the frozen encoder stays the
    released one (base_dim 96, 2 blocks). Counts with the masked-image branch, on the meta device."""
    files = {"x1": "x1.yaml", "x1.5": "x1_5.yaml", "x2": "x2.yaml"}[preset]
    cfg = load_config(ROOT / "configs" / "base.yaml", [ROOT / "configs" / files, ROOT / "configs" / "bases" /
                                                        "qwenimage.yaml"])
    assert {k: cfg.model.autoencoder[k] for k in PRESETS[preset]} == PRESETS[preset]
    with torch.device("meta"):
        vae = build_autoencoder(**cfg.model.autoencoder)
    assert vae.decoder.conv_out.in_channels == base_dim and vae.encoder.conv_in.out_channels == 96
    assert len(vae.decoder.up_blocks[0].resnets) == PRESETS[preset]["num_res_blocks"] + 1
    assert count(vae.decoder) == decoder and count(vae.decoder.encoder) == branch
    assert count(vae.encoder) + count(vae.quant_conv) == 19_307_648  # one frame's: test_bases, against diffusers


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory):
    return write_qwen_files(tmp_path_factory.mktemp("qwenimage"))


def inputs(b, height, width, seed=0):
    """(latent, image, mask) with holes crossing tile borders (tests/tiling_probe.py's, 16 channels)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 16, height // 8, width // 8, generator=g)
    image = torch.rand(b, 3, height, width, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, height, width)
    mask[..., height // 5:height // 2, width // 6:width // 2] = 1
    mask[..., -height // 4:, -width // 3:] = 1
    return z, image, mask


def test_tiled_decode_equals_untiled_without_whole_image_statistics(monkeypatch):
    """RMS norm is per pixel, so each tile runs its up path at once (no GroupNorm rounds): with context covering
    the up path's and the branch's receptive field (about 6.5 latent px at these widths) the tiles give the
    untiled numbers; with none they do not, so the tiles are really decoded apart. The attention runs once,
    over the whole latent."""
    import ldm.modules.tiling as tiling
    torch.manual_seed(0)  # ch_mult (1,1,1,1), one residual block per level: small receptive field, fast
    vae = build_autoencoder(family="qwenimage", **{**TINY, "ch_mult": (1, 1, 1, 1), "num_res_blocks": 0}).eval()
    z, image, mask = inputs(1, 128, 128)
    calls = []
    up_path = vae.decoder.up_path
    monkeypatch.setattr(vae.decoder, "up_path", lambda h, *a: calls.append(h.shape) or up_path(h, *a))
    monkeypatch.setattr(tiling, "_normalise", None)  # never called: no whole-image statistics
    with torch.no_grad():
        for cond in ((image, mask), ()):
            ref = vae.decode(z, *cond)
            calls.clear()
            out = vae.decode(z, *cond, tile=8, tile_overlap=7)
            assert len(calls) == 4 and max(s[-1] for s in calls) < 16  # 2 x 2 tiles, each smaller than z
            assert (out - ref).abs().max() < 1e-5
        assert (vae.decode(z, tile=8, tile_overlap=0) - ref).abs().max() > 1e-3


def test_the_clamp_keeps_diffusers_values_and_passes_the_gradient():
    """decode clamps to [-1, 1] exactly as diffusers; in training the gradient of the clamped output reaches
    conv_out as if unclamped (straight-through), so the adaptive GAN weight's formula, which reads conv_out's
    gradient off the output's (tests/test_adaptive_weight.py), stays exact."""
    torch.manual_seed(0)
    vae = build_autoencoder(family="qwenimage", **TINY, use_condition=False)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(50)
    z = torch.randn(1, 16, 4, 4)
    out = vae.decode(z)
    raw = vae.decoder(vae.post_quant_conv(z))
    assert torch.equal(out, raw.clamp(-1, 1)) and (raw.abs() > 1).any()
    grad, = torch.autograd.grad((out * raw.detach()).sum(), vae.decoder.conv_out.weight)
    ref, = torch.autograd.grad((raw * raw.detach()).sum(), vae.decoder.conv_out.weight)
    torch.testing.assert_close(grad, ref, rtol=0, atol=0)


def test_diffusers_export_holds_the_branch_off_x1_decoder_and_refuses_the_rest(qwen_files, tmp_path):
    """AutoencoderKLQwenImage.from_pretrained reads the export with no missing, unexpected or mismatched keys
    and decodes and encodes as ours; with the branch, or other decoder widths than the encoder's, the export is
    refused saying why. A decoder export (any widths, the branch) loads back in load_autoencoder."""
    export = load_script("export")
    _, pipeline, _ = qwen_files
    ours = load_autoencoder(pipeline, autoencoder_kwargs={"use_condition": False})
    export.save_diffusers(ours, tmp_path / "diffusers")
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert config["latents_mean"] == pytest.approx(base_kwargs("qwenimage")["latent_norm"]["shift"], abs=1e-12)
    theirs, info = diffusers.AutoencoderKLQwenImage.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    z, image, mask = inputs(2, 48, 64)
    with torch.no_grad():
        assert (their_decode(theirs.eval(), z) - ours.decode(z)).abs().max() < 1e-5
        assert (their_mean(theirs, image) - ours.encode(image).mean).abs().max() < 1e-5
    assert load_autoencoder(tmp_path / "diffusers").config["latent_norm"] == ours.config["latent_norm"]
    with torch.device("meta"):  # refused on their configs
        branch, wide = (build_autoencoder(**{**ours.config, **kw}) for kw in ({"use_condition": True}, {"ch": 48}))
    with pytest.raises(CheckpointError, match="has no masked-image branch"):
        export.save_diffusers(branch, tmp_path / "branch")
    with pytest.raises(CheckpointError, match="one width for encoder and decoder"):
        export.save_diffusers(wide, tmp_path / "wide")
    with pytest.raises(CheckpointError, match="official holds 4-channel VAEs"):
        export.save_official(ours, tmp_path / "official")
    torch.manual_seed(3)
    branch = build_autoencoder(**{**base_kwargs("qwenimage"), **TINY}).eval()
    export.save_decoder(branch, tmp_path / "decoder")
    with pytest.warns(UserWarning, match="ENCODER AND quant_conv ARE RANDOM"):
        back = load_autoencoder(tmp_path / "decoder")
    assert back.config["family"] == "qwenimage" and back.load_report.format == "decoder"
    with torch.no_grad():
        assert torch.equal(back.decode(z, image, mask), branch.decode(z, image, mask))


@pytest.mark.slow
def test_a_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(qwen_files, tmp_path):
    """A tiny Qwen-Image run (the GAN on from step 1, EMA, validation) stopped by SIGUSR1 at step 2 of 4 and resumed
    ends with the weights of the run never stopped, bit for bit: the live ones (discriminator too) and the EMA.
    (DDP, compile and a resume to a later max_steps: tests/test_bases.py.)"""
    import signal

    import train
    from fault_probe import SignalSelf
    from test_bases import _train_args
    from test_train import _equal
    _, pipeline, _ = qwen_files
    args = _train_args("qwenimage", pipeline, tmp_path, "trainer.max_steps=4")
    assert train.main([*args, "--name", "run"], extra_callbacks=[SignalSelf(signal.SIGUSR1, 2)]) == 0
    stopped = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == 2 and stopped["config"]["model"]["autoencoder"]["family"] == "qwenimage"
    assert train.main([*args, "--name", "run", "--resume", "auto"]) == 0
    assert train.main([*args, "--name", "whole"]) == 0
    resumed, whole = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                 weights_only=False) for name in ("run", "whole"))
    assert resumed["global_step"] == whole["global_step"] == 4
    for key in ("current_model_state", "state_dict"):
        assert _equal(resumed[key], whole[key]), key
    assert not _equal(stopped["state_dict"], whole["state_dict"])  # steps 3 and 4 changed the weights
