"""Tier 3: train.py end to end on tiny configs (CPU): it learns, resumes exactly, runs DDP on two processes."""
import contextlib
import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
    "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1",
    "perceptual.pretrained=false", "discriminator.ndf=8", "discriminator.n_layers=2",
    "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_size=4",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=1", "optim.warmup_steps=1", "optim.base_lr=1e-4", "run.overwrite=false",
]


def run_train(tmp_path, *overrides, name="run", resume=None, script="train.py", check=True, base=TINY):
    cmd = [sys.executable, str(ROOT / script), *base, f"run.log_dir={tmp_path}", *overrides, "--name", name]
    if resume:
        cmd += ["--resume", resume]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_here(tmp_path, *overrides, name="run", resume=None, callbacks=(), check=True, base=TINY):
    """run_train in this process (train.main, `callbacks` added to the trainer's): the same run without a process of
    its own, whose start-up (torch, Lightning, torchvision) costs about 11 s on 2 cores; for the tests that need no
    process (signals to a process group, kills and DDP do). stdout, stderr, Lightning's log lines and the warnings
    raised come back in the CompletedProcess, as a process's would."""
    import logging
    import warnings

    import train
    argv = [*base, f"run.log_dir={tmp_path}", *overrides, "--name", name, *(["--resume", resume] if resume else [])]
    out, err = io.StringIO(), io.StringIO()
    handler, lightning = logging.StreamHandler(err), logging.getLogger("pytorch_lightning")
    level = lightning.level  # another test may have quietened it (scripts/bench/harness.py: ERROR)
    lightning.addHandler(handler)
    lightning.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.ignore_known_warnings()  # as in a process of its own (pytest resets filters between tests)
            code = train.main(argv, extra_callbacks=list(callbacks))
    finally:
        lightning.removeHandler(handler)
        lightning.setLevel(level)
    warned = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)  # first: the last line stays the error
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), warned + err.getvalue())
    if check and code != 0:
        raise AssertionError(f"train.main failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def refused(tmp_path, *overrides, resume=None):
    """A run train.py must refuse (exit 2), run in this process."""
    return run_here(tmp_path, *overrides, resume=resume, check=False)


def val_rows(run_dir: Path):
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/l1")]
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


@pytest.mark.slow
def test_demo_sized_run_learns(tmp_path):
    """configs/demo.yaml's own recipe (lr, warm-up, EMA, masks, 64 px, batch 4) cut to 50 steps, the GAN on for the
    last 10: ~60 s, 2 cores."""
    run_here(tmp_path, "run.overwrite=false", "trainer.max_steps=50", "data.epoch_length=200",
             "trainer.val_check_interval=10", "loss.disc_start=40", "data.num_workers=0", "data.val_size=8",
             "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
             base=["-c", str(ROOT / "configs" / "demo.yaml")])
    run = tmp_path / "run"
    rows = val_rows(run)
    assert len(rows) == 5
    first, last = rows[0], rows[-1]
    # stated margins (first validation at step 10, the last at step 50; measured with the GAN off: L1 x0.63,
    # +5.6 dB): validation L1 at least 25 % lower, LPIPS lower, PSNR of the known region up by at least 3 dB
    assert last["val/l1"] < 0.75 * first["val/l1"], (first["val/l1"], last["val/l1"])
    assert last["val/lpips_whole"] < first["val/lpips_whole"], (first["val/lpips_whole"], last["val/lpips_whole"])
    assert last["val/psnr_known"] > first["val/psnr_known"] + 3.0, (first["val/psnr_known"], last["val/psnr_known"])
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "samples").glob("*.png"))) == 5


def test_resume_restores_every_state(tmp_path):
    common = ["trainer.val_check_interval=3", "run.checkpoint_every_n_steps=3", "loss.disc_start=1",
              "ema.decay=0.9"]
    run_here(tmp_path, "trainer.max_steps=3", *common)
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["config"]["model"]["autoencoder"]["ch"] == 32
    assert not any(k.startswith("perceptual.") for k in ckpt["state_dict"])
    bad = refused(tmp_path, "trainer.max_steps=5", *common, "model.autoencoder.num_res_blocks=2", resume="auto")
    assert bad.returncode == 2 and "model.autoencoder.num_res_blocks was 1 in that run, now 2" in bad.stderr
    assert "--name run" in bad.stderr  # the hint resumes this run, not one named after config.yaml
    old = dict(ckpt, optimizer_states=[dict(ckpt["optimizer_states"][0], param_groups=[
        dict(g, params=[*g["params"], 10**6]) for g in ckpt["optimizer_states"][0]["param_groups"]])])
    torch.save(old, tmp_path / "old.ckpt")  # as from before post_quant_conv was frozen: a tensor more per group
    bad = refused(tmp_path, *common, resume=str(tmp_path / "old.ckpt"))
    assert bad.returncode == 2 and "decoder optimiser's groups hold" in bad.stderr, bad.stderr[-2000:]
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    bad = refused(tmp_path, *common, resume=str(tmp_path / "garbage.ckpt"))
    assert bad.returncode == 2 and "unreadable checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    probe = tmp_path / "probe.pt"
    proc = run_train(tmp_path, "trainer.max_steps=5", *common, f"+probe={probe}", resume="auto",
                     script="tests/resume_probe.py")
    assert "resuming with changed config: trainer.max_steps: 3 -> 5" in proc.stderr
    seen = torch.load(probe, weights_only=False)
    assert seen["global_step"] == 3
    for name in ("optimizer_states", "lr_schedulers"):
        assert _equal(seen[name], ckpt[name]), name
    assert _equal(seen["state_dict"], ckpt["current_model_state"])  # raw weights, discriminator included
    assert _equal(seen["ema_state_dict"], ckpt["state_dict"])  # the EMA weights
    assert ckpt["optimizer_states"][1]["state"], "the discriminator had been trained before the checkpoint"
    final = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert final["global_step"] == 5  # off the 3-step grid: saved at the last batch, before EMA's end-of-fit swap
    assert not _equal(final["current_model_state"], final["state_dict"])  # live weights, not a copy of the EMA


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.slow
def test_a_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    """Passes of 3 batches, posterior sampling, 2 loader workers, the GAN on from step 2: stopped by SIGUSR1 at a
    pass's end (step 3), resumed and stopped again mid-pass (step 4), and resumed, the run ends with the
    uninterrupted run's weights, bit for bit: the resumed pass serves the batches the uninterrupted one served, and
    a batch's posterior noise is drawn from (seed, rank, micro-batch). Before, a resumed pass drew fresh crops,
    masks and noise."""
    common = ["trainer.max_steps=7", "data.epoch_length=6", "model.sample_posterior=true", "data.num_workers=2",
              "loss.disc_start=2", "run.checkpoint_every_n_steps=100", "trainer.val_check_interval=100"]
    import signal

    from fault_probe import SignalSelf
    run_here(tmp_path, *common, name="whole")
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    for stop in (3, 4, None):  # one run stopped at 3 (`--resume auto`: no checkpoint yet), at 4, then to its end
        proc = run_here(tmp_path, *common, name="stopped", resume="auto",
                        callbacks=[SignalSelf(signal.SIGUSR1, stop)] if stop else [])
        assert "SIGUSR1: last checkpoint" in proc.stderr if stop else "resuming from" in proc.stderr
        assert "dataloader is not resumable" not in proc.stderr  # Lightning's warning: the loader says it is
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == (stop or 7)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    for key in ("current_model_state", "state_dict"):  # the live weights (discriminator too) and the EMA
        assert _equal(resumed[key], whole[key]), key


def test_existing_run_is_not_overwritten_unless_asked(tmp_path):
    run_here(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "run.checkpoint_every_n_steps=1")
    proc = refused(tmp_path, "trainer.max_steps=1")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    proc = refused(tmp_path, "run.overwrite=true", "model.vae_ckpt=nowhere.ckpt")
    assert proc.returncode == 2 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # kept: bad config
    run_here(tmp_path, "trainer.max_steps=1", "trainer.val_check_interval=1", "run.checkpoint_every_n_steps=1",
             "run.overwrite=true")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step00000001.ckpt"]  # the old run's are gone
    from ldm.training.run import resolve_resume
    assert torch.load(resolve_resume("auto", tmp_path / "run"), weights_only=False)["global_step"] == 1


def test_config_errors_stop_before_any_work(tmp_path):
    proc = refused(tmp_path, "model.autoencoder.chh=3")
    assert proc.returncode == 2 and "unknown config key 'model.autoencoder.chh'" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """trainer.strategy=ddp (the name users type; auto is tested under SLURM, tests/test_slurm.py) through the GAN
    switch-on: step 1 without the discriminator (its parameters get no gradient), step 2 with it."""
    probe = tmp_path / "masks"
    run_train(tmp_path, "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
              "trainer.val_check_interval=2", "run.checkpoint_every_n_steps=1", "loss.disc_start=1",
              "data.val_size=1", f"+probe={probe}",
              script="tests/ddp_probe.py")  # one validation image: rank 1 has none, and must not hang the reduction
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    peak = [g["initial_lr"] for opt in last["optimizer_states"] for g in opt["param_groups"]]
    assert peak == pytest.approx([1e-4 * 2 * 2] * 2, rel=1e-12)  # base_lr x 2 processes x batch 2, both networks
    assert "last.ckpt" in ckpts and len([c for c in ckpts if c.startswith("step")]) == 2, ckpts
    rows = val_rows(tmp_path / "run")
    assert rows and math.isfinite(rows[-1]["val/lpips_whole"])  # rank 0's one image, reduced with rank 1's none
    masks = {r: torch.load(probe.with_name(f"masks{r}.pt")) for r in (0, 1)}
    assert masks[0].shape == masks[1].shape and not torch.equal(masks[0], masks[1])
    weights = [torch.load(probe.with_name(f"masks-weights{r}.pt")) for r in (0, 1)]  # GAN on from step 1
    assert weights[0].keys() == weights[1].keys()
    # the ranks stepped as one; BatchNorm statistics are each rank's own (DDP broadcasts rank 0's at each step)
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert differ and all(k.startswith("discriminator.") and k.endswith(("running_mean", "running_var"))
                          for k in differ), differ


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_compile_compiles_the_blocks_and_keeps_the_numbers(checkpointing):
    """model.compile: the Trainer compiles the decoder's and the frozen encoder's blocks (and the GroupNorms
    outside them), LPIPS and the discriminator in place; the same steps give the same weights (and the
    discriminator's BatchNorm statistics).
    aot_eager runs dynamo and AOT autograd (the graphs inductor gets) without code generation: seconds on a CPU;
    inductor's own parity is tested on the GPU (tests/test_gpu.py)."""
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness  # its load (the GAN on from step 0), build and fit: real steps in a pl.Trainer
    weights = {}
    for backend in (False, "aot_eager"):
        cfg = harness.load([], [*TINY, f"model.compile={backend or 'null'}",
                                  f"model.autoencoder.gradient_checkpointing={str(checkpointing).lower()}"])
        torch.manual_seed(0)
        system = harness.build_ours(cfg)
        initial = system.vae.decoder.conv_out.weight.detach().clone()
        harness.fit_ours(system, cfg, *harness.make_batch(cfg, torch.device("cpu")), steps=3)
        dec, enc = system.vae.decoder, system.vae.encoder
        blocks = [dec.mid.block_1, dec.mid.attn_1, dec.up[0].block[0], dec.up[1].upsample, dec.blend, dec.norm_out,
                  enc.mid.block_1, enc.down[0].downsample, enc.norm_out, system.perceptual, system.discriminator]
        assert all((b._compiled_call_impl is not None) == bool(backend) for b in blocks)
        assert dec.mid.block_1.norm1._compiled_call_impl is None  # inside a compiled block: not compiled twice
        weights[backend] = system.state_dict()
    eager, compiled = weights[False], weights["aot_eager"]
    assert list(compiled) == list(eager)  # compiled in place: checkpoints and exports keep their keys
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(eager["vae.decoder.conv_out.weight"], initial)  # the steps did train


def test_model_compile_rejects_an_unknown_backend(tmp_path):
    proc = refused(tmp_path, "model.compile=inductr")
    assert proc.returncode == 2 and "model.compile must be true, false or a torch.compile backend" in proc.stderr
    assert "got 'inductr'" in proc.stderr and not (tmp_path / "run").exists()


def test_progress_bar_loss_is_the_steps_loss_read_with_the_finite_check():
    """The progress bar's loss is a CPU copy of the step's loss, read with the finite check (on a CPU at once)."""
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness
    cfg = harness.load([], TINY)
    torch.manual_seed(0)
    system = harness.build_ours(cfg)
    trainer = harness.fit_ours(system, cfg, *harness.make_batch(cfg, torch.device("cpu")), steps=2)
    shown, logged = trainer.progress_bar_metrics["loss"], trainer.callback_metrics["train/loss"]
    assert math.isfinite(shown) and shown == pytest.approx(logged.item(), rel=1e-6)
    assert "train/loss" not in trainer.progress_bar_metrics  # the device tensor is not read every batch


def test_ema_callback_matches_lightnings_and_leaves_frozen_weights_alone():
    """ldm.training.callbacks.EMA (train.py) updates as Lightning's EMAWeightAveraging does, with one foreach lerp over the
    trained tensors: same averaged decoder and discriminator after 4 steps, frozen encoder and LPIPS exactly
    their first copy, the counter at 4, and validation / the end of training swap the average in."""
    from pytorch_lightning.callbacks import EMAWeightAveraging

    from ldm.training.callbacks import EMA
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness
    averages = {}
    for name, callback in (("lightning", EMAWeightAveraging(decay=0.7)), ("ours", EMA(decay=0.7))):
        cfg = harness.load([], list(TINY))
        torch.manual_seed(0)
        system = harness.build_ours(cfg)
        initial = {k: v.clone() for k, v in system.state_dict().items()}
        harness.fit_ours(system, cfg, *harness.make_batch(cfg, torch.device("cpu")), steps=4, callbacks=[callback])
        average = callback._average_model
        assert int(average.n_averaged) == 4
        averages[name] = {k[len("module."):]: v for k, v in average.state_dict().items() if k.startswith("module.")}
        assert all(torch.equal(system.state_dict()[k], v) for k, v in averages[name].items())  # swapped in at the end
    ours, theirs = averages["ours"], averages["lightning"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.startswith(("vae.decoder.", "vae.post_quant_conv.", "discriminator.")) and ours[key].is_floating_point():
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ours["vae.decoder.conv_out.weight"], initial["vae.decoder.conv_out.weight"])
    frozen = [k for k in ours if k.startswith(("vae.encoder.", "vae.quant_conv.", "vae.post_quant_conv.", "perceptual."))]
    assert frozen and all(torch.equal(ours[k], initial[k]) for k in frozen)


def test_only_the_decoder_trains_and_its_warm_started_weights_get_the_scaled_lr(tmp_path):
    """DESIGN.md: encoder, quant_conv and post_quant_conv stay at the SD weights; SD-loaded decoder weights train at
    lr x warm_start_lr_scale, fresh ones (here the conditional branch) at lr."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import harness
    from ldm import AsymmetricAutoencoderKL
    from ldm.training.run import build_system
    cfg = harness.load([], TINY)
    sd = {k: v for k, v in AsymmetricAutoencoderKL(**cfg.model.autoencoder).state_dict().items()
          if not k.startswith("decoder.encoder.")}  # an SD autoencoder: no conditional branch
    save_file(sd, tmp_path / "vae.safetensors")
    cfg.model.vae_ckpt = str(tmp_path / "vae.safetensors")
    system = build_system(cfg)
    (opt_g, opt_d), _ = system.configure_optimizers()
    lr = cfg.optim.base_lr * cfg.data.batch_size
    names = {id(p): n for n, p in system.vae.named_parameters()}
    groups = [(g["lr"], sorted(names[id(p)] for p in g["params"])) for g in opt_g.param_groups]
    assert [g[0] for g in groups] == pytest.approx([lr, lr * cfg.optim.warm_start_lr_scale])
    (_, fresh), (_, warm) = groups
    assert fresh and all(n.startswith("decoder.encoder.") for n in fresh)
    assert warm and all(n.startswith("decoder.") and not n.startswith("decoder.encoder.") for n in warm)
    assert sorted(fresh + warm) == sorted(n for n, _ in system.vae.decoder.named_parameters(prefix="decoder"))
    assert not any(p.requires_grad for n, p in system.vae.named_parameters() if not n.startswith("decoder."))
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {id(p) for p in system.discriminator.parameters()}


def test_accumulated_micro_batches_step_as_their_whole_batch_across_epochs():
    """optim.accumulate_grad_batches=2 over micro-batches of 1 steps with the gradients of batches of 2, counted
    over the run: with 3 micro-batches per epoch the second step takes the last of epoch 1 and the first of epoch
    2. lr 0 (the weights stay, so both steps' gradients depend on the data alone), GAN off and the posterior mean:
    nothing depends on how a batch is split (GroupNorm is per sample)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from ldm.training.config import load_config
    from ldm.training.run import build_system
    g = torch.Generator().manual_seed(0)
    micro = [{"image": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
              "mask": (torch.rand(1, 1, 32, 32, generator=g) < 0.5).float()} for _ in range(3)]
    whole = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in ((micro[0], micro[1]), (micro[2], micro[0]))]

    class DecoderGrads(pl.Callback):
        def __init__(self):
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if optimizer is trainer.optimizers[0]:
                self.steps.append(torch.cat([p.grad.flatten() for p in pl_module.vae.decoder.parameters()]))

    def train(batches, batch_size, accumulate):
        cfg = load_config(ROOT / "configs" / "base.yaml", [], [
            *TINY, f"data.batch_size={batch_size}", f"optim.accumulate_grad_batches={accumulate}",
            "optim.base_lr=0", "model.sample_posterior=false", "loss.disc_start=1000"])
        torch.manual_seed(0)
        grads = DecoderGrads()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                             precision="64-true",
                             limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[grads])
        trainer.fit(build_system(cfg), train_dataloaders=DataLoader(batches, batch_size=None))
        assert trainer.global_step == 2 and len(grads.steps) == 2
        return grads.steps

    for ours, want in zip(train(micro, 1, 2), train(whole, 2, 1)):
        assert ours.dtype == torch.float64
        assert (ours - want).norm() < 1e-10 * want.norm()  # float64 sums in another order
