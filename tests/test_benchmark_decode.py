"""scripts/bench/benchmark_decode.py: every implementation it times decodes the same image, its FLOP counts are
those of the networks users run (diffusers' own), and its latency table has a timed row per implementation."""
import re

import pytest
import torch

from probe_utils import load_script

bench = load_script("bench/benchmark_decode")
CPU = torch.device("cpu")


@pytest.mark.parametrize("preset", ["vanilla", "x1"])
def test_every_implementation_decodes_the_same_image(preset):
    """The rows time the same work: diffusers with our weights (vanilla: its AutoencoderKL), our tiled decode and
    our bf16 decode give our fp32 decode's image (full x1 widths, 64 px)."""
    ours = bench.decode_fn(preset, 64, "ours", CPU)()
    assert ours.shape == (1, 3, 64, 64)
    with torch.no_grad():
        diffusers = bench.decode_fn(preset, 64, "diffusers", CPU)()
        tiled = bench.decode_fn(preset, 64, "tiled", CPU, tile=9)()  # one tile (> the overlap, 8): tiled path
        bf16 = bench.decode_fn(preset, 64, "bf16", CPU)()
    assert (diffusers - ours).abs().max() < 1e-4
    assert (tiled - ours).abs().max() < 1e-4  # whole-image GroupNorm statistics: the untiled decode
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - ours).norm() / ours.norm()) < 0.06


def test_decoder_flops_are_those_of_diffusers_decoders():
    """The FLOP shares count our vanilla decoder as diffusers' AutoencoderKL decode (SD's VAE) and x1 with its
    branch as diffusers' AsymmetricAutoencoderKL decode."""
    from ldm import PRESETS, AsymmetricAutoencoderKL
    with torch.device("meta"):
        sd = bench.build_diffusers(AsymmetricAutoencoderKL(use_condition=False))
        asym = bench.build_diffusers(AsymmetricAutoencoderKL(**PRESETS["x1"]))
        assert (type(sd).__name__, type(asym).__name__) == ("AutoencoderKL", "AsymmetricAutoencoderKL")
        z, image, mask = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 128, 128), torch.ones(1, 1, 128, 128)
        theirs_sd = bench.count(lambda: sd.decode(z))
        theirs_x1 = bench.count(lambda: asym.decode(z, image=image, mask=mask))  # its 2nd argument: a generator
    assert bench.decoder_flops("vanilla", 128) == theirs_sd > 0
    assert bench.decoder_flops("x1", 128) == theirs_x1 > theirs_sd  # the branch costs FLOPs
    assert bench.decoder_flops("x2", 128) > bench.decoder_flops("x1.5", 128) > theirs_x1


def test_bad_arguments_are_usage_errors_naming_them(capsys):
    for argv, named in ((["--latency", "--sizes", "100"], "--sizes"), (["--latency", "--repeats", "0"], "--repeats"),
                        (["--latency", "--impls", "fast"], "--impls"),
                        (["--latency", "--warmup", "-1"], "--warmup"), ([], "--flops and/or --latency")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2 and named in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="implementation 'fast'"):
        bench.decode_fn("x1", 64, "fast", CPU)


@pytest.mark.slow
def test_latency_table_times_each_implementation_in_its_own_process(capsys):
    """One decoder's rows (a process each, ~7 s: torch and diffusers imported anew); that every implementation
    decodes the same image, for every decoder, is test_every_implementation_decodes_the_same_image's."""
    assert bench.main(["--latency", "--presets", "x1", "--sizes", "80", "--repeats", "1", "--tile", "9"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if re.match(r"\| x1 ", line)]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [("x1", impl) for impl in ("ours", "tiled", "diffusers")]
    for r in rows:
        seconds, first, peak = float(r[3]), float(r[4]), float(r[5])  # a failed row would read "failed: ..."
        assert 0 < seconds < 60 and 0 < first < 60 and 0.1 < peak < 20, r
    cold = bench.row("x1", 64, "ours", repeats=1, warmup=0)  # without a warm-up the one decode timed is the first
    assert cold["s"] == cold["first_s"] > 0
