"""CUDA only (skipped without a GPU): mixed precision, channels_last and fused Adam on the real device."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm import AsymmetricAutoencoderKL
from ldm.training.callbacks import EMA
from test_train import TINY as CPU_TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SMALL = dict(ch=64, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)


def batch(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, h // 4:h // 2, w // 3:] = 1
    return image.cuda(), mask.cuda()


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def test_gpu_decode_matches_cpu_and_bf16_stays_close():
    torch.manual_seed(0)
    vae = AsymmetricAutoencoderKL(**SMALL).eval()
    image, mask = batch()
    z = vae.encode(image.cpu()).mode()
    ref = vae.decode(z, image.cpu(), mask.cpu())
    vae.cuda()
    out = vae.decode(z.cuda(), image, mask)
    assert (out.cpu() - ref).abs().max() < 1e-4
    vae.to(memory_format=torch.channels_last)
    out_cl = vae.decode(z.cuda(), image.contiguous(memory_format=torch.channels_last), mask)
    assert (out_cl.cpu() - ref).abs().max() < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = vae.decode(z.cuda(), image, mask)
    err = (out_bf16.float().cpu() - ref).norm() / ref.norm()
    assert err < 6e-2, err  # bf16 keeps ~3 significant digits; a wrong cast or layout gives O(1)


def test_gpu_gradient_checkpointing_gives_the_same_grads():
    torch.manual_seed(0)
    vae = AsymmetricAutoencoderKL(**SMALL).cuda()
    image, mask = batch()
    z = torch.randn(2, 4, 8, 12, device="cuda")
    grads = []
    for ckpt in (False, True):
        vae.zero_grad()
        vae.decoder.gradient_checkpointing = ckpt
        vae.decode(z, image, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.decoder.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_gpu_compiled_blocks_are_as_close_to_fp32_as_eager_bf16():
    """Inductor rounds fused GroupNorm + SiLU once instead of per op, so compiled bf16 differs from eager bf16
    by bf16 noise; both must stay as close to the fp32 result (a wrong layout or cast gives O(1) errors)."""
    import copy

    from ldm.models.asym_decoder import compile_blocks
    torch.manual_seed(0)
    eager = AsymmetricAutoencoderKL(**SMALL).cuda().to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    # decoder: mid (2 ResnetBlocks + AttnBlock), 4 levels x 2 ResnetBlocks, 3 Upsamples, Blend, norm_out
    assert compile_blocks(compiled.decoder) == 16
    assert compile_blocks(compiled.encoder) == 11  # 4 levels x 1 ResnetBlock, 3 Downsamples, mid, norm_out
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: keys unchanged
    image, mask = batch()
    image = image.contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 4, 8, 12, device="cuda")
    runs = {}
    for name, vae, bf16 in (("fp32", copy.deepcopy(eager), False), ("eager", eager, True),
                            ("compiled", compiled, True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():  # the frozen encoder, as in training
                mean = vae.encode(image).mean.float()
            out = vae.decode(z, image, mask).float()
        out.square().mean().backward()
        runs[name] = (out.detach(), torch.cat([p.grad.flatten() for p in vae.decoder.parameters()]), mean)
    for i in (0, 1, 2):  # output, decoder gradients, encoder output
        ref = runs["fp32"][i]
        err = {name: ((runs[name][i] - ref).norm() / ref.norm()).item() for name in ("eager", "compiled")}
        assert err["compiled"] < max(1.5 * err["eager"], 1e-2) and err["compiled"] < 0.1, err


def test_gpu_compiled_losses_match_eager():
    """model.compile compiles LPIPS (fp32) and the discriminator (bf16 autocast, BatchNorm in training mode)
    whole: the same LPIPS distance as eager, and loss, input gradient, discriminator gradients and BatchNorm
    statistics as close to an fp32 run as eager bf16's. (The discriminator's gradients differ from fp32 by
    about 10 % in bf16 either way, and compiled from eager by a few %: H200 and CPU, random weights.)"""
    import copy

    from ldm.modules.losses import NLayerDiscriminator, PerceptualLoss, generator_loss, hinge_d_loss
    torch.manual_seed(0)
    lpips_net = PerceptualLoss(pretrained=False).cuda().to(memory_format=torch.channels_last)
    disc_net = NLayerDiscriminator().cuda().to(memory_format=torch.channels_last)
    image, _ = batch(b=4, h=128, w=128)
    image = image.contiguous(memory_format=torch.channels_last)
    noise = 0.3 * torch.randn(image.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    runs = {}
    for name, bf16, compiled in (("fp32", False, False), ("eager", True, False), ("compiled", True, True)):
        lp, disc = copy.deepcopy(lpips_net), copy.deepcopy(disc_net)  # the same weights and BatchNorm state
        if compiled:
            lp.compile(dynamic=False)
            disc.compile(dynamic=False)
        recon = (image + noise).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            dist = lp(recon, image)
            g_loss = generator_loss(disc(recon))
            d_loss = hinge_d_loss(disc(image), disc(recon.detach()))
        grad = torch.autograd.grad(dist.mean() + g_loss, recon)[0]  # through LPIPS and the discriminator
        d_loss.backward()
        runs[name] = dict(dist=dist.detach(), grad=grad, d_loss=d_loss.detach().float(),
                          d_grads=torch.cat([p.grad.flatten().float() for p in disc.parameters()]),
                          stats=torch.cat([b.flatten().float() for b in disc.buffers()]))
    assert runs["eager"]["dist"].dtype == torch.float32  # LPIPS stays fp32 under autocast

    def rel(name, key):
        ref, out = runs["fp32"][key], runs[name][key]
        return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()

    dist_err = ((runs["compiled"]["dist"] - runs["eager"]["dist"]).norm() / runs["eager"]["dist"].norm()).item()
    assert dist_err < 1e-4, dist_err
    for key in runs["fp32"]:
        err = {name: rel(name, key) for name in ("eager", "compiled")}
        assert err["compiled"] < max(1.5 * err["eager"], 1e-3) and err["compiled"] < 0.3, (key, err)


TINY = [*CPU_TINY,  # tests/test_train.py's tiny model, on the GPU, with the GAN from step 2
        "trainer.accelerator=gpu", "data.resolution=64", "data.batch_size=4", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=6", "trainer.max_steps=6", "loss.disc_start=2", "model.channels_last=true",
        "ema.decay=0.9"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_gpu_training_runs_finite_in_each_precision(tmp_path, precision):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"trainer.precision={precision}",
           f"run.log_dir={tmp_path}", "--name", "run"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run = tmp_path / "run"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    weights = [float(r["train/d_weight"]) for r in rows if r.get("train/d_weight")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    assert weights and all(math.isfinite(v) and v >= 0 for v in weights), weights  # GAN on from step 2
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(g["fused"] for opt in ckpt["optimizer_states"] for g in opt["param_groups"])  # fused Adam on CUDA
    val = [r for r in rows if r.get("val/l1")]
    assert val and math.isfinite(float(val[-1]["val/l1"]))


def test_gpu_training_step_never_waits_for_the_device():
    """No host sync in a training step: the finite check's skip is fused Adam's found_inf on the device and the
    host reads the check (and the progress bar's loss) when its copy has arrived; logging and the GAN's adaptive
    weight add none, so the host queues the next step's work while the device runs this one. Counted over whole
    loop iterations (batch start to batch start: Lightning's per-batch metric reads too), with train.py's EMA."""
    import warnings

    import pytorch_lightning as pl
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness

    class SyncWindow(pl.Callback):  # syncs reported from the start of batch 2 to the start of batch 4
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("warn" if batch_idx in (2, 3) else "default")

    cfg = harness.load([], [*CPU_TINY, "data.resolution=64", "data.batch_size=4",
                              "trainer.precision=bf16-mixed", "model.channels_last=true"])
    system = harness.build_ours(cfg)
    image, mask = harness.make_batch(cfg, torch.device("cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            harness.fit_ours(system, cfg, image, mask, steps=5, callbacks=[SyncWindow(), EMA(decay=0.9)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert not syncs, syncs
    assert system.nonfinite.skipped == 0 and system.nonfinite.loss is not None  # the checks did arrive


def test_gpu_nonfinite_step_is_skipped_on_the_device_and_counted(monkeypatch):
    """A NaN loss at batch 2: fused Adam's found_inf leaves the CUDA weights and Adam's state alone, and the host
    counts the step once its check has arrived (nonfinite.read() waits for the rest)."""
    import pytorch_lightning as pl
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness
    from ldm.models.asym_decoder import AsymmetricDecoderTraining

    recon_terms = AsymmetricDecoderTraining.recon_terms

    def nan_at_batch_2(self, recon, image, mask):
        terms = recon_terms(self, recon, image, mask)
        if self.trainer.fit_loop.total_batch_idx == 2:
            terms["l1"] = terms["l1"] * float("nan")
            terms["nll"] = terms["nll"] + terms["l1"]
        return terms
    monkeypatch.setattr(AsymmetricDecoderTraining, "recon_terms", nan_at_batch_2)
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[batch_idx] = [p.detach().clone() for p in pl_module.vae.decoder.parameters()]

    cfg = harness.load([], [*CPU_TINY, "data.resolution=64", "data.batch_size=4",
                              "trainer.precision=bf16-mixed", "model.channels_last=true"])
    system = harness.build_ours(cfg)
    harness.fit_ours(system, cfg, *harness.make_batch(cfg, torch.device("cuda")), steps=4,
                       callbacks=[Snapshot()])
    system.nonfinite.read()
    assert system.nonfinite.skipped == 1 and system.nonfinite.streak == 0 and system.nonfinite.term == "l1"
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # the NaN step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # the next one trained
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_gpu_benchmark_marks_time_the_device_and_add_no_sync():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    from reference_steps import durations, mark
    device = torch.device("cuda")
    torch.cuda._sleep(1000)  # load the sleep kernel now: its first launch (lazy loading) left the device idle
    torch.cuda.synchronize()  # for milliseconds inside the first interval (H200: 8.2 ms against the long 5.1 ms)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(10**8)  # about 50 ms: the host queues all below while the device is still busy
        marks = [mark(device)]
        for cycles in (10**6, 10**7):  # about 0.5 ms, then 5 ms of device time
            torch.cuda._sleep(cycles)
            marks.append(mark(device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    short, long = durations(marks)
    assert 0 < short < long and 5 < long / short < 20, (short, long)
