"""scripts/bench/benchmark.py: its output format, and the official reference loop against ours at step 0."""
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import benchmark  # noqa: E402
import harness  # noqa: E402
from reference_steps import OfficialStep  # noqa: E402

TINY = [
    "model.vae_ckpt=null", "perceptual.pretrained=false",
    "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
    "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1",
    "discriminator.ndf=8", "discriminator.n_layers=2", "data.batch_size=2", "trainer.accelerator=cpu",
]


def test_benchmark_prints_figures_and_speedups():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "benchmark.py"), "-c", str(ROOT / "configs" / "x1.yaml"),
           *TINY, "data.resolution=16", "--steps", "2", "--warmup", "1",
           "--reference", "official", "--reference", "naive", "--cached-latents"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core machine: no thread oversubscription
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    for name in ("ours", "ours-cached", "official", "naive"):
        rate = re.search(rf"^{name}\s+images/s=([0-9.]+)\s+s/step=([0-9.]+)", out, re.M)
        assert rate and float(rate.group(1)) > 0 and float(rate.group(2)) > 0, out
    assert "GAN on from step 0 (loss.disc_start=0)" in out  # the loaded config's value
    assert re.search(r"^latent cache: ours [0-9.]+ images/s -> ours-cached [0-9.]+ images/s", out, re.M), out
    share = re.search(r"^encoder alone: [0-9.]+ s per batch = ([0-9.]+) % of our step", out, re.M)
    assert share and 0 < float(share.group(1)) < 100, out
    assert re.search(r"decoder model FLOPs per step .*: [0-9.]+ TFLOP", out)
    last = out.strip().splitlines()[-2:]
    assert re.fullmatch(r"speedup vs official: [0-9]+\.[0-9]+x", last[0]), last
    assert re.fullmatch(r"speedup vs naive: [0-9]+\.[0-9]+x", last[1]), last


def test_the_warmup_hook_runs_once_between_warmup_and_timed_steps():
    """measure() resets CUDA's peak memory there: the peak reported is that of the timed steps."""
    from reference_steps import run_reference
    cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, "data.resolution=16"])
    image, mask = harness.make_batch(cfg, torch.device("cpu"))
    for name, run in (("ours", lambda hook: benchmark.run_ours(cfg, image, mask, 3, after_warmup=hook)[0]),
                      ("naive", lambda hook: run_reference("naive", cfg, image, mask, 3, "32-true", hook))):
        calls = []
        times = run((2, lambda: calls.append(name)))
        assert len(times) == 3 and calls == [name], name


def capture_grads(optimizer, into: list):
    """Record the gradients an optimiser is about to apply (a step pre-hook)."""
    def hook(opt, args, kwargs):
        into.extend(p.grad.detach().clone() for group in opt.param_groups for p in group["params"])
    optimizer.register_step_pre_hook(hook)


def test_official_loop_matches_ours_at_step_zero():
    """Same weights, same batch, GAN on: the same losses, adaptive weight and gradients for both networks, the
    adaptive weight as its formula gives it, and, at a nonzero lr, the same decoder weights after the step, as
    Adam's first step gives them.

    lr = 0 for the gradients, so that the official loop's second forward (after its decoder step) sees the weights
    ours used; the posterior mean replaces the sample so both loops decode the same latent.
    """
    import pytorch_lightning as pl

    def setup(lr):
        cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, "data.resolution=32", "model.sample_posterior=false",
                                                               f"optim.base_lr={lr}", "optim.warmup_steps=1"])
        torch.manual_seed(0)
        system = harness.build_ours(cfg)
        official = OfficialStep(*copy.deepcopy((system.vae, system.discriminator, system.perceptual)),
                                lr=lr * cfg.data.batch_size, disc_weight=cfg.loss.disc_weight, sample_posterior=False)
        return cfg, system, official

    cfg, system, official = setup(0.0)
    image, mask = harness.make_batch(cfg, torch.device("cpu"))
    d_weight = adaptive_weight_by_formula(copy.deepcopy(system.vae), system.discriminator, system.perceptual,
                                          image, mask)
    ours_g, ours_d, off_g, off_d, fused = [], [], [], [], []

    class Capture(pl.Callback):
        def __init__(self, g, d):
            self.g, self.d = g, d

        def on_train_start(self, trainer, pl_module):
            fused.extend(g["fused"] for opt in trainer.optimizers for g in opt.param_groups)
            capture_grads(trainer.optimizers[0], self.g)
            capture_grads(trainer.optimizers[1], self.d)

    metrics = harness.fit_ours(system, cfg, image, mask, 1, [Capture(ours_g, ours_d)]).callback_metrics
    capture_grads(official.opt_g, off_g)
    capture_grads(official.opt_d, off_d)
    values = official.step(image, mask)
    pixels = image[0].numel()  # ours logs the per-pixel mean; the official nll sums over pixels
    torch.testing.assert_close(metrics["train/nll"] * pixels, values["nll"], rtol=1e-4, atol=0)
    for name in ("g_loss", "d_weight", "d_loss"):
        torch.testing.assert_close(metrics[f"train/{name}"], values[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(metrics["train/d_weight"], d_weight, rtol=1e-4, atol=0)
    assert values["d_weight"] > 0
    assert fused and all(fused)  # ours: fused Adam on the CPU too (the reference loops keep torch's default)
    assert len(ours_g) == len(off_g) > 0 and len(ours_d) == len(off_d) > 0
    for ours, off in ((ours_g, off_g), (ours_d, off_d)):
        total = torch.cat([g.flatten() for g in off]).norm()
        for n, (a, b) in enumerate(zip(ours, off)):
            # conv biases before a GroupNorm have a zero gradient in exact maths: noise on both sides
            assert (a - b).norm() <= 1e-3 * max(b.norm(), 1e-2 * total), (n, (a - b).norm(), b.norm(), total)

    base_lr = 1e-3
    cfg, system, official = setup(base_lr)
    initial = [p.detach().clone() for p in system.vae.decoder.parameters()]
    harness.fit_ours(system, cfg, image, mask, 1)
    official.step(image, mask)
    lr = base_lr * cfg.data.batch_size  # world 1, accumulation 1, warm-up 1 step: the peak from step 0
    total = torch.cat([g.flatten() for g in off_g]).norm()
    for w0, ours, off, grad in zip(initial, system.vae.decoder.parameters(), official.vae.decoder.parameters(), off_g):
        if grad.norm() < 1e-2 * total:  # noise gradients (above): Adam's g / (|g| + eps) is then a coin toss
            continue
        adam = -lr * grad / (grad.abs() + 1e-8)  # Adam's first step: m / sqrt(v) = g / |g|, whatever the betas
        sure = grad.abs() > 1e-3 * grad.abs().max()  # elsewhere a gradient near 0 can flip sign between the loops
        assert sure.float().mean() > 0.5 and (ours - w0).abs().max() <= lr * (1 + 1e-5)
        torch.testing.assert_close((ours - w0)[sure], (off - w0)[sure], rtol=0, atol=1e-3 * lr)
        torch.testing.assert_close((ours - w0)[sure], adam[sure], rtol=0, atol=1e-3 * lr)


def adaptive_weight_by_formula(vae, discriminator, perceptual, image, mask):
    """DESIGN.md: ||grad nll|| / (||grad g|| + 1e-4) at decoder.conv_out.weight, clamped to [0, 1e4]; nll = (L1 + LPIPS
    per pixel) summed over pixels, mean over the batch; g = -mean D(recon)."""
    with torch.no_grad():
        z = vae.encode(image).mode()
    recon = vae.decode(z, image, mask)
    nll = ((recon - image).abs() + perceptual(recon, image).view(-1, 1, 1, 1)).sum() / image.shape[0]
    g = -copy.deepcopy(discriminator)(recon).mean()
    last = vae.decoder.conv_out.weight
    grad_nll, grad_g = (torch.autograd.grad(x, last, retain_graph=True)[0] for x in (nll, g))
    return (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4)


def test_max_batch_estimate_on_cpu_grows_with_gradient_checkpointing():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "benchmark.py"), "--max-batch", "model.vae_ckpt=null",
           "perceptual.pretrained=false", "--presets", "x1.5", "--resolutions", "256", "--memory-budget-gb", "80"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = {ckpt: (int(n), float(fixed), float(per)) for ckpt, n, fixed, per in re.findall(
        r"x1\.5\s+256 px\s+gradient_checkpointing=(\w+)\s+estimated max batch (\d+)\s+"
        r"\(fixed ([0-9.]+) GiB, per image ([0-9.]+) GiB\)", proc.stdout)}
    assert set(found) == {"false", "true"}, proc.stdout
    (n, fixed, per), (n_ckpt, fixed_ckpt, per_ckpt) = found["false"], found["true"]
    assert fixed == fixed_ckpt and per_ckpt < per and n_ckpt > n >= 1
    assert 0 <= (80 - fixed) / per - n < 1.01  # max batch = floor((budget - fixed) / per image), figures rounded


def test_largest_batch_search_brackets_the_limit_in_few_tries():
    from benchmark_memory import largest_fitting
    for limit in (0, 1, 2, 3, 7, 40, 100, 333):
        for guess in (3, limit // 2, limit, 2 * limit + 5):  # under, on and over the limit
            tried = []
            fits = lambda b: tried.append(b) or b <= limit  # noqa: E731
            lo, hi = largest_fitting(fits, lambda: guess)
            assert lo <= limit < hi and hi - lo <= max(1, int(0.05 * lo)), (limit, guess, lo, hi)
            assert lo == 0 or lo in tried and hi in tried  # both ends were really tried
            assert len(tried) <= 16, (limit, guess, tried)


def test_profile_step_accounts_for_the_profiled_time(capsys):
    import profile_step
    assert profile_step.main(["-c", str(ROOT / "configs" / "x1.yaml"), *TINY, "data.resolution=16",
                              "--steps", "2", "--warmup", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    wall = float(re.search(r"^profiled 2 steps: ([0-9.]+) ms/step wall", out, re.M).group(1))
    kinds = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"^(\S[^\n]*?)\s+([0-9.]+)\s+([0-9.]+)%$", out, re.M)}
    assert "convolution" in kinds and wall > 0, out
    assert abs(sum(share for _, share in kinds.values()) - 100.0) < 0.5, kinds  # every op counted once
    assert sum(ms for ms, _ in kinds.values()) <= wall * 1.01, (kinds, wall)  # CPU ops: within the wall time
    top = re.findall(r"^\s+[0-9.]+ ms/step\s+x\d+\s+.+$", out, re.M)
    assert len(top) == 5 and "aten::" in out, out
    phases = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (\S.*?)\s+([0-9.]+) ms\s+[0-9.]+%$", out, re.M)}
    for part in ("encoder (frozen", "decoder forward", "losses:", "backward:", "finite check"):
        assert any(name.startswith(part) and ms > 0 for name, ms in phases.items()), (part, phases)
    total = float(re.search(r"^  sum\s+([0-9.]+) ms$", out, re.M).group(1))
    assert abs(total - sum(phases.values())) < 0.05 and 0 < total < 3 * wall, (total, phases, wall)


def test_phase_marks_split_into_steps():
    import profile_step
    marks = profile_step.PhaseMarks(torch.device("cpu"), first_step=0)
    names = ["batch start", "encoder start", "encoder end", "batch end",  # step 1: 1 + 2 + 4, then 8 to the next
             "batch start", "encoder start", "encoder end", "batch end"]  # step 2: 16 + 32 + 64, no loop after it
    clock = [0, 1, 3, 7, 15, 31, 63, 127]
    marks.marks = [(n, t / 1e3) for n, t in zip(names, clock)]
    got = {phase: [round(ms, 6) for ms in v] for phase, v in marks.durations().items()}
    assert got == {"loop: batch into the step": [1, 16], "encoder (frozen, no grad)": [2, 32],
                   "encoder end -> batch end": [4, 64], "loop: between steps": [8]}, got


def test_decoder_flops_leave_out_the_gradient_checkpointing_recompute():
    """MFU counts model FLOPs: the same decoder forward + backward with and without recomputing."""
    counts = {ckpt: benchmark.decoder_flops(harness.load([ROOT / "configs" / "x1.yaml"], [
        *TINY, "data.resolution=16", f"model.autoencoder.gradient_checkpointing={ckpt}"]))
        for ckpt in ("false", "true")}
    assert counts["false"] > 0 and counts["true"] == counts["false"], counts


def naive_step(cfg, precision="32-true"):
    from ldm.training.config import to_container
    from reference_steps import NaiveStep
    return NaiveStep(to_container(cfg.model.autoencoder), ndf=cfg.discriminator.ndf,
                     n_layers=cfg.discriminator.n_layers, precision=precision)


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_naive_loop_trains_our_network_in_diffusers():
    """Our weights through the ldm -> diffusers key table decode the same in NaiveStep's model; the same
    parameters train (the decoder only) and the same PatchGAN."""
    from ldm.modules.sd.keys import ldm_to_diffusers
    cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, "data.resolution=16"])
    torch.manual_seed(0)
    system = harness.build_ours(cfg)
    naive = naive_step(cfg)
    naive.vae.load_state_dict(ldm_to_diffusers(system.vae.state_dict()))  # strict: every key has its pair
    image, mask = harness.make_batch(cfg, torch.device("cpu"))
    z = torch.randn(2, cfg.model.autoencoder.embed_dim, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = system.vae.eval().decode(z, image, mask)
        theirs = naive.vae.eval().decode(z, image=image, mask=mask).sample
    assert ours.shape == theirs.shape == image.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    decoder = sum(p.numel() for p in system.vae.decoder.parameters())
    assert trainable(naive.vae) == trainable(system.vae) == decoder > 0
    assert trainable(naive.disc) == trainable(system.discriminator) > 0


def test_naive_loop_backward_and_steps_outside_autocast_discriminator_frozen_for_the_generator():
    """A clean loop: no PatchGAN weight gradients from the generator's backward; backward and the optimiser
    steps run outside autocast (it covers the forwards)."""
    cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, "data.resolution=16"])
    torch.manual_seed(0)
    naive = naive_step(cfg, "bf16-mixed")
    seen = {}

    def before(name):
        def hook(opt, args, kwargs):
            seen[name] = (torch.is_autocast_enabled("cpu"), [p.grad for p in naive.disc.parameters()])
        return hook

    naive.opt_g.register_step_pre_hook(before("g"))
    naive.opt_d.register_step_pre_hook(before("d"))
    naive.step(*harness.make_batch(cfg, torch.device("cpu")))
    assert not seen["g"][0] and not seen["d"][0]  # the steps (after their backward) outside autocast
    assert all(g is None for g in seen["g"][1])  # the generator half left the discriminator alone ...
    assert all(g is not None for g in seen["d"][1])  # ... which its own half then trains


def test_the_benchmark_config_turns_the_gan_on_from_step_zero():
    """load() overrides any loss.disc_start: the discriminator trains and the adaptive weight is used at step 0."""
    cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, "data.resolution=16", "loss.disc_start=50001",
                                                          "optim.warmup_steps=0"])
    assert cfg.loss.disc_start == 0
    torch.manual_seed(0)
    system = harness.build_ours(cfg)
    before = [p.detach().clone() for p in system.discriminator.parameters()]
    metrics = harness.fit_ours(system, cfg, *harness.make_batch(cfg, torch.device("cpu")), 1).callback_metrics
    assert metrics["train/d_weight"] > 0 and metrics["train/d_loss"] > 0, metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, system.discriminator.parameters()))


BASE = ["-c", str(ROOT / "configs" / "x1.yaml"), *TINY, "data.resolution=16"]


def test_bad_arguments_and_config_values_are_usage_errors_naming_them(capsys):
    cases = [([*BASE, "--reference", "naive", "--reference-precision", "bf16mixed"],
              "--reference-precision: invalid choice: 'bf16mixed'"),
             ([*BASE, "trainer.precision=16-mixed", "--reference", "official"],
              "--reference-precision: not given, so ours: trainer.precision=16-mixed"),
             ([*BASE, "data.resolution=12"], "data.resolution: a multiple of 8"),  # load_config's checks
             ([*BASE, "data.batch_size=0"], "data.batch_size: an integer >= 1, got 0"),
             ([*BASE, "--batch-size", "0"], "--batch-size must be at least 1"),
             (["--max-batch", *BASE[:2], "--steps", "3"], "--max-batch takes none of --config, --steps"),
             ([*BASE, "--resolutions", "512", "--memory-budget-gb", "40"],
              "--resolutions, --memory-budget-gb: only with --max-batch")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            benchmark.parse_args(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err, (argv, err)
    import profile_step  # the same load(): the same errors
    with pytest.raises(SystemExit) as stop:
        profile_step.parse_args([*BASE, "data.resolution=12"])
    assert stop.value.code == 2 and "data.resolution: a multiple of 8" in capsys.readouterr().err
    args = benchmark.parse_args([*BASE, "trainer.precision=16-mixed", "--reference", "official",
                                 "--reference-precision", "bf16-mixed"])
    assert args.reference_precision == "bf16-mixed"


def test_a_failing_variant_is_named_and_exits_2(monkeypatch, capsys):
    def in_child(fn, variant, *args, preload=()):
        raise RuntimeError(f"out of memory in {variant}")
    monkeypatch.setattr(benchmark, "in_child", in_child)
    assert benchmark.main(BASE) == 2
    assert "error: ours: RuntimeError: out of memory in ours" in capsys.readouterr().err


def test_cpu_children_import_diffusers_only_for_the_naive_loop(monkeypatch):
    """diffusers is a dev extra: forking a child must not need it unless the naive loop runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # children forked
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing it raises ImportError
    assert harness.in_child(os.getpid) != os.getpid()
    preloads = {}
    monkeypatch.setattr(benchmark, "in_child", lambda fn, name, *a, preload: preloads.setdefault(name, preload))
    for reference in ("official", "naive"):
        benchmark.run_variant(reference, benchmark.parse_args([*BASE, "--reference", reference]), "32-true", 3)
    assert not any("diffusers" in m for m in preloads["official"]) and preloads["naive"], preloads


def test_kernel_kinds_tell_matmuls_from_convolutions_and_vector_norms_from_normalisation():
    from profile_step import kind_of
    kinds = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas":
             "matmul / attention",
             "ampere_sgemm_128x64_tn": "matmul / attention",
             "aten::bmm": "matmul / attention",
             "aten::addmm": "matmul / attention",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
             "sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
             "aten::convolution_backward": "convolution",
             "void cudnn::engines_precompiled::nchwToNhwcKernel<float>": "layout (cuDNN's own)",
             "aten::native_group_norm_backward": "normalisation",
             "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "normalisation",
             "void at::native::(anonymous namespace)::Compute1dBackwardFusedParamsCUDAKernel<float>": "normalisation",
             "aten::linalg_vector_norm": "reduction",
             "aten::sum": "reduction",
             "aten::add_": "elementwise",
             "triton_per_fused_native_group_norm_0": "compiled (inductor)"}
    assert {name: kind_of(name) for name in kinds} == kinds
