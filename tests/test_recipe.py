"""The training recipe of DESIGN.md pinned: GAN gating, schedules, lr scaling, loss weights, clipping, crops and
masks, and the paper's numbers in the configs.

The training tests run AsymmetricDecoderTraining in a real pl.Trainer on CPU (ch 32, 32 px, PatchGAN ndf 8) and
compare the gradients each optimiser applies with `reference_grads`: DESIGN.md's step written out here (ldm's
per-pixel loss summed over pixels, taming's adaptive weight by two autograd passes), not our loss functions.
"""
import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import ndimage

from data import PRESETS, MEAN_AREA, box_mask, outpaint_mask
from data.images import load_crop, random_crop_box
from ldm.training.config import load_config
from ldm.models.asym_decoder import LossConfig, OptimConfig
from ldm.training.run import build_system

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import harness  # noqa: E402  (fit_ours: real steps in a pl.Trainer on one repeated batch; make_batch)

TINY = ["model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1", "model.autoencoder.encoder_ch=32",
        "model.autoencoder.encoder_num_res_blocks=1", "perceptual.pretrained=false", "discriminator.ndf=8",
        "discriminator.n_layers=2", "data.resolution=32", "data.batch_size=2", "trainer.accelerator=cpu",
        "model.sample_posterior=false", "optim.base_lr=1e-4"]  # the posterior mean: the reference decodes the same z
OFF = 10**9  # loss.disc_start that is never reached


class Recorder(pl.Callback):
    """Per training batch: the weights and the discriminator's Adam state before it; per optimiser step the
    gradients (by parameter name) and the lrs it applies, with the batch index."""

    def __init__(self):
        self.before, self.adam_d, self.steps = [], [], {0: [], 1: []}

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for i, opt in enumerate(trainer.optimizers):
            def hook(opt, args, kwargs, i=i):
                grads = {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]}
                self.steps[i].append((len(self.before) - 1, grads, [g["lr"] for g in opt.param_groups]))
            opt.register_step_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.adam_d.append([float(s["step"]) for s in trainer.optimizers[1].state.values()])


def config(*overrides, files=()):
    return load_config(BASE, [ROOT / "configs" / f for f in files], [*TINY, *overrides])


def train(cfg, steps):
    """(system, Recorder, image, mask) after `steps` steps on harness.make_batch's batch (holes and known)."""
    torch.manual_seed(0)
    system = build_system(cfg)
    image, mask = harness.make_batch(cfg, torch.device("cpu"))
    recorder = Recorder()
    harness.fit_ours(system, cfg, image, mask, steps, [recorder])
    return system, recorder, image, mask


def reference_grads(system, weights, image, mask, l1=1.0, l2=0.0, lpips=1.0, hole=1.0, known=1.0):
    """DESIGN.md's step at `weights` (a state_dict of `system`), by parameter name: the decoder's gradients of nll and
    of the adaptive-weighted GAN term (before disc_weight), and the discriminator's.

    Pixel loss w (l1 |x - x'| + l2 (x - x')^2), w = hole in the hole and known outside, plus lpips x LPIPS per sample
    broadcast over its pixels; nll = the sum / batch (ldm). GAN term d_weight x g, g = -mean D(x'), d_weight =
    ||dnll/dW|| / (||dg/dW|| + 1e-4) clamped to [0, 1e4] at W = conv_out.weight (taming); the discriminator gets
    the hinge loss of D(x) and D(x'.detach()).
    """
    vae, disc = copy.deepcopy(system.vae), copy.deepcopy(system.discriminator)
    vae.load_state_dict({k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")})
    disc.load_state_dict({k[len("discriminator."):]: v for k, v in weights.items() if k.startswith("discriminator.")})
    with torch.no_grad():
        z = vae.encode(image).mode()
    recon = vae.decode(z, image, mask)
    weight = hole * mask + known * (1 - mask)
    diff = recon - image
    per_pixel = weight * (l1 * diff.abs() + l2 * diff.square()) + lpips * system.perceptual(recon, image).view(-1, 1, 1, 1)
    nll = per_pixel.sum() / image.shape[0]
    g = -disc(recon).mean()
    decoder = dict(vae.decoder.named_parameters(prefix="vae.decoder"))
    nll_grads, g_grads = (dict(zip(decoder, torch.autograd.grad(x, list(decoder.values()), retain_graph=True)))
                          for x in (nll, g))
    last = "vae.decoder.conv_out.weight"
    d_weight = (nll_grads[last].norm() / (g_grads[last].norm() + 1e-4)).clamp(0, 1e4)
    d_loss = 0.5 * (torch.relu(1 - disc(image)).mean() + torch.relu(1 + disc(recon.detach())).mean())
    params = dict(disc.named_parameters(prefix="discriminator"))
    return (nll_grads, {k: d_weight * v for k, v in g_grads.items()},
            dict(zip(params, torch.autograd.grad(d_loss, list(params.values())))))


def decoder_grads(reference, disc_weight=0.0):
    """The decoder's gradient of nll + disc_weight x d_weight x g from reference_grads' parts."""
    nll, gan, _ = reference
    return {k: v + disc_weight * gan[k] for k, v in nll.items()}


def flat(grads: dict, like: dict):
    return torch.cat([grads[k].flatten() for k in sorted(like)]).double()


def assert_same(ours: dict, want: dict, what):
    """The same gradient up to fp32 rounding (summed in another order): 1e-4 of its norm (measured: ~1e-6)."""
    assert ours.keys() == want.keys(), what
    a, b = flat(ours, want), flat(want, want)
    assert (a - b).norm() <= 1e-4 * b.norm(), (what, ((a - b).norm() / b.norm()).item())


def distance(a: dict, b: dict) -> float:
    return ((flat(a, b) - flat(b, b)).norm() / flat(b, b).norm()).item()


# ----------------------------------------------------------------------------- 1, 2: GAN gating and schedules

GATED = dict(disc_start=2, steps=5, warmup=1, floor=0.1)


@pytest.fixture(scope="module")
def gated_run():
    """Five steps, the GAN on from step 2, warm-up 1 step then cosine to 0.1 of the peak lr."""
    g = GATED
    cfg = config(f"loss.disc_start={g['disc_start']}", f"optim.warmup_steps={g['warmup']}",
                 f"optim.min_lr_ratio={g['floor']}")
    return (*train(cfg, g["steps"]), cfg)


def test_gan_terms_and_discriminator_switch_on_exactly_at_disc_start(gated_run):
    """Before loss.disc_start the decoder's gradient is L1 + LPIPS alone and the discriminator's weights and Adam state
    stay as built; from that step on the decoder gets the adaptive-weighted GAN term and the discriminator steps."""
    system, rec, image, mask, cfg = gated_run
    start, steps = GATED["disc_start"], GATED["steps"]
    assert [s for s, _, _ in rec.steps[0]] == list(range(steps))
    assert [s for s, _, _ in rec.steps[1]] == list(range(start, steps))
    disc_steps = {s: grads for s, grads, _ in rec.steps[1]}
    initial = {k: v for k, v in rec.before[0].items() if k.startswith("discriminator.")}
    for step, grads, _ in rec.steps[0]:
        reference = reference_grads(system, rec.before[step], image, mask)
        plain, with_gan = decoder_grads(reference), decoder_grads(reference, cfg.loss.disc_weight)
        assert distance(with_gan, plain) > 0.05  # the GAN term is no rounding error: an off-by-one shows
        assert_same(grads, with_gan if step >= start else plain, f"decoder, step {step}")
        if step >= start:
            assert_same(disc_steps[step], reference[2], f"discriminator, step {step}")
        if step <= start:  # the discriminator as built until its first step
            assert all(torch.equal(rec.before[step][k], v) for k, v in initial.items()), step
            assert rec.adam_d[step] == [], step
    assert not torch.equal(rec.before[start + 1]["discriminator.main.0.weight"], initial["discriminator.main.0.weight"])
    assert set(rec.adam_d[start + 1]) == {1.0} and set(rec.adam_d[-1]) == {steps - 1 - start}


def test_schedules_step_in_training_and_the_discriminators_starts_at_disc_start(gated_run):
    """lr = peak x multiplier: warm-up (the unit test: tests/test_adaptive_weight.py), then cosine to min_lr_ratio at
    max_steps; the discriminator's schedule counts its own steps from disc_start and ends at max_steps too."""
    _, rec, _, _, cfg = gated_run
    peak = cfg.optim.base_lr * cfg.data.batch_size

    def cosine(progress):  # from 1 down to the floor 0.1
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    # decoder: 5 steps, warm-up 1, then 4 steps of decay; the discriminator: steps 2..4, warm-up 1, 2 steps of decay
    want_g = [1.0, cosine(0), cosine(1 / 4), cosine(2 / 4), cosine(3 / 4)]
    want_d = [1.0, cosine(0), cosine(1 / 2)]
    assert [lr for _, _, lrs in rec.steps[0] for lr in lrs] == pytest.approx([peak * m for m in want_g], rel=1e-12)
    assert [lr for _, _, lrs in rec.steps[1] for lr in lrs] == pytest.approx([peak * m for m in want_d], rel=1e-12)


# ----------------------------------------------------------------------------- 3: lr scaling


@pytest.mark.parametrize("devices,nodes,batch,accumulate", [(2, 3, 5, 1), (1, 2, 3, 4)])
def test_lr_is_base_lr_times_devices_nodes_batch_and_accumulation(devices, nodes, batch, accumulate):
    """configure_optimizers under a Trainer of `devices` x `nodes` processes (world size from Lightning; not
    launched): both Adams at base_lr x devices x nodes x batch x accumulation, betas (0.5, 0.9), the warm-started
    decoder group at 0.1 of that. (A launched DDP run's lr: tests/test_train.py::test_two_process_ddp_on_cpu.)"""
    from lightning_fabric.plugins.environments import LightningEnvironment
    cfg = config(f"data.batch_size={batch}", f"optim.accumulate_grad_batches={accumulate}")
    system = build_system(cfg)
    system.warm_start_keys = {"decoder.conv_out.weight"}  # as if loaded from SD
    system.trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=nodes, max_steps=100, logger=False,
                                strategy="ddp" if devices * nodes > 1 else "auto",
                                plugins=[LightningEnvironment()])  # not SLURM's world size, if run under SLURM
    assert system.trainer.world_size == devices * nodes
    (opt_g, opt_d), _ = system.configure_optimizers()
    lr = 1e-4 * devices * nodes * batch * accumulate
    assert [g["initial_lr"] for g in opt_g.param_groups] == pytest.approx([lr, 0.1 * lr], rel=1e-12)
    assert [g["initial_lr"] for g in opt_d.param_groups] == pytest.approx([lr], rel=1e-12)
    assert {tuple(g["betas"]) for opt in (opt_g, opt_d) for g in opt.param_groups} == {(0.5, 0.9)}


# ----------------------------------------------------------------------------- 4: loss weights


CASES = {  # name: (config files, overrides, reference weights, disc_weight, a recipe whose gradient it must not give)
    "base": ((), [], {}, 0.0, None),
    "l2": (["ablations/l2.yaml"], [], dict(l1=0.0, l2=1.0), 0.0, ({}, 0.0)),
    "no_lpips": (["ablations/no_lpips.yaml"], [], dict(lpips=0.0), 0.0, ({}, 0.0)),
    "scaled": ((), ["loss.l1_weight=1.5", "loss.perceptual_weight=2.5", "loss.hole_weight=4.0", "loss.known_weight=0.5"],
               dict(l1=1.5, lpips=2.5, hole=4.0, known=0.5), 0.0, ({}, 0.0)),  # weights other than 0 and 1 scale
    "no_gan": (["ablations/no_gan.yaml"], ["loss.disc_start=0"], {}, 0.0, ({}, 0.8)),
    "disc_weight": ((), ["loss.disc_start=0", "loss.disc_weight=0.3"], {}, 0.3, ({}, 0.8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_weights_and_ablations_shape_the_decoders_gradient(name):
    """One step of each ablation file (and of scaled loss, pixel-region and GAN weights): the decoder's gradient is the
    reference's with that file's weights, and measurably not the base recipe's (no_gan: not the GAN's)."""
    files, overrides, weights, disc_weight, other = CASES[name]
    system, rec, image, mask = train(config(f"loss.disc_start={OFF}", *overrides, files=files), 1)
    (_, grads, _), = rec.steps[0]
    reference = reference_grads(system, rec.before[0], image, mask, **weights)
    want = decoder_grads(reference, disc_weight)
    assert_same(grads, want, name)
    if other is not None:
        other_weights, other_disc_weight = other
        unlike = reference if other_weights == weights else reference_grads(system, rec.before[0], image, mask)
        assert distance(want, decoder_grads(unlike, other_disc_weight)) > 0.01
    assert len(rec.steps[1]) == (disc_weight > 0)  # the discriminator steps with the GAN on only


# ----------------------------------------------------------------------------- 6: clipping


def test_grad_clip_clips_each_networks_global_norm():
    """optim.grad_clip=c: the decoder's and the discriminator's gradients are each scaled to global norm c (taken
    per network, not over both), direction kept."""
    clip = 1e-4
    system, rec, image, mask = train(config("loss.disc_start=0", f"optim.grad_clip={clip}"), 1)
    reference = reference_grads(system, rec.before[0], image, mask)
    for (_, grads, _), want in ((rec.steps[0][0], decoder_grads(reference, 0.8)), (rec.steps[1][0], reference[2])):
        norm = flat(want, want).norm()
        assert norm > 10 * clip  # the clip is active
        assert flat(grads, want).norm().item() == pytest.approx(clip, rel=1e-4)
        assert_same(grads, {k: v * clip / norm for k, v in want.items()}, "clipped")


# ----------------------------------------------------------------------------- 5: the paper's numbers


def test_base_config_holds_the_papers_recipe():
    """DESIGN.md's training recipe in configs/base.yaml (and the dataclass defaults a test or script builds)."""
    cfg = load_config(BASE)
    loss = dict(l1_weight=1.0, l2_weight=0.0, perceptual_weight=1.0, hole_weight=1.0, known_weight=1.0,
                disc_weight=0.8, disc_start=50001, disc_loss="hinge")
    optim = dict(base_lr=4.5e-6, betas=[0.5, 0.9], warmup_steps=5000, warm_start_lr_scale=0.1, grad_clip=0.0,
                 accumulate_grad_batches=1)
    for section, want, defaults in (("loss", loss, LossConfig()), ("optim", optim, OptimConfig())):
        for key, value in want.items():
            assert cfg[section][key] == value, f"{section}.{key}"
            assert getattr(defaults, key) == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
    assert dict(cfg.discriminator) == dict(ndf=64, n_layers=3) and cfg.perceptual.net == "vgg"
    assert cfg.model.sample_posterior is True and cfg.trainer.precision == "32-true"
    assert (cfg.data.resolution, cfg.data.crop_min_scale, cfg.data.masks.p_full) == (256, 0.5, 0.5)
    assert dict(cfg.data.masks.mix) == dict(thick=1.0, medium=1.0, thin=1.0, outpaint=0.0)
    presets = {
        "thick": {"strokes": dict(weight=1.0, min_times=1, max_times=5, max_width=100, max_len=200, max_angle=4),
                  "boxes": dict(weight=0.3, min_times=1, max_times=3, min_size=30, max_size=150, margin=10)},
        "medium": {"strokes": dict(weight=1.0, min_times=4, max_times=5, max_width=50, max_len=100, max_angle=4),
                   "boxes": dict(weight=0.3, min_times=1, max_times=5, min_size=10, max_size=50, margin=0)},
        "thin": {"strokes": dict(weight=1.0, min_times=4, max_times=50, max_width=10, max_len=40, max_angle=4)},
        "outpaint": {"outpaint": dict(weight=1.0, min_pad=0.04, max_pad=0.25, p_side=0.5)},
    }
    assert {k: {kind: dict(v) for kind, v in p.items()} for k, p in cfg.data.masks.presets.items()} == presets
    assert PRESETS == presets  # data.masks' built-in table, used where no config is given


@pytest.mark.parametrize("name,batch,ch,blocks", [("x1", 10, 128, 2), ("x1_5", 4, 192, 3), ("x2", 2, 256, 5)])
def test_width_presets_hold_the_papers_batch_and_schedule(name, batch, ch, blocks):
    """Per-GPU batch 10 / 4 / 2 (8 GPUs), the SD encoder loaded, 12 ImageNet epochs of steps; the recipe stays the
    base's (no preset changes a loss or optimiser value)."""
    cfg = load_config(BASE, [ROOT / "configs" / f"{name}.yaml"])
    assert (cfg.data.batch_size, cfg.model.autoencoder.ch, cfg.model.autoencoder.num_res_blocks) == (batch, ch, blocks)
    assert cfg.model.vae_ckpt  # the frozen encoder (and, for x1, the decoder core) from SD
    epochs = cfg.trainer.max_steps * 8 * batch / cfg.data.epoch_length
    assert cfg.data.epoch_length == 1281167 and abs(epochs - 12) < 0.05, epochs
    base = load_config(BASE)
    assert cfg.loss == base.loss and cfg.optim == base.optim and cfg.data.masks == base.data.masks


# ----------------------------------------------------------------------------- 7: crops and masks


@pytest.mark.parametrize("width,height,min_scale", [(300, 200, 0.5), (200, 300, 0.5), (300, 300, 0.8)])
def test_random_crop_box_side_and_position_are_uniform(width, height, min_scale):
    """DESIGN.md: a square of side min_side x U(min_scale, 1) at a uniform position inside the image. Tolerances:
    4 standard errors of the stated means and fractions over 2000 draws."""
    rng = np.random.default_rng(0)
    boxes = np.array([random_crop_box(rng, width, height, min_scale) for _ in range(2000)])
    left, top, right, bottom = boxes.T
    side, short = right - left, min(width, height)
    np.testing.assert_allclose(bottom - top, side, rtol=1e-12)
    assert (left >= 0).all() and (top >= 0).all() and (right <= width).all() and (bottom <= height).all()
    u = (side / short - min_scale) / (1 - min_scale)  # U(0, 1)
    assert u.min() >= 0 and u.max() <= 1 and u.min() < 0.01 and u.max() > 0.99
    se = 0.5 / math.sqrt(len(u))  # of a fraction near 1/2
    assert abs((u < 0.5).mean() - 0.5) < 4 * se and abs(u.mean() - 0.5) < 4 * 0.289 / math.sqrt(len(u))
    for start, extent in ((left, width), (top, height)):
        if extent > short:  # the long side: the position is U(0, extent - side)
            v = start / (extent - side)
            assert abs((v < 0.5).mean() - 0.5) < 4 * se and abs((v < 0.1).mean() - 0.1) < 4 * 0.3 / math.sqrt(len(v))


def test_load_crop_takes_the_random_box_it_reports():
    """load_crop with an rng crops a box of side min_side x [min_scale, 1] (not the whole image) and resizes it."""
    from PIL import Image
    rng = np.random.default_rng(1)
    pixels = np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    sides = []
    for _ in range(50):
        out, box, flipped = load_crop(_png(image), 16, rng, min_scale=0.5, with_crop=True)
        sides.append(box[2] - box[0])
        want = np.asarray(image.resize((16, 16), Image.BOX, box=box))
        assert np.abs(out.astype(int) - (want[:, ::-1] if flipped else want)).max() <= 1
    assert 30 <= min(sides) < 33 and 57 < max(sides) <= 60


def _png(image):
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("preset", ["thick", "medium"])
@pytest.mark.parametrize("resolution", [256, 512])
def test_boxes_keep_their_margin_count_and_size_range(preset, resolution):
    """LaMa's boxes: min_times..max_times rectangles of sides in [min_size, max_size], all at least `margin` from the
    border; pixel sizes scale with resolution / 256. Single boxes are checked exactly, the preset's mixes by their
    frame, components and a min_size square in each."""
    p = {k: v for k, v in PRESETS[preset]["boxes"].items() if k != "weight"}
    s = resolution / 256
    lo, hi, margin = p["min_size"] * s, p["max_size"] * s, p["margin"] * s
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(300):
        mask = box_mask(rng, (resolution, resolution), scale=s, **{**p, "max_times": 1})
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0)  # one filled rectangle
        assert min(y0, x0) >= margin and max(y1, x1) <= resolution - margin
        sides += [y1 - y0, x1 - x0]
    assert lo <= min(sides) < lo + 0.05 * (hi - lo) and hi - 0.05 * (hi - lo) < max(sides) <= hi
    counts = []
    for _ in range(200):
        mask = box_mask(rng, (resolution, resolution), scale=s, **p)
        if margin:
            frame = np.ones_like(mask, bool)
            frame[int(margin):resolution - int(margin), int(margin):resolution - int(margin)] = False
            assert not mask[frame].any()
        labels, n = ndimage.label(mask)
        counts.append(n)
        side = int(lo)
        for i, where in enumerate(ndimage.find_objects(labels), 1):  # each component holds a min_size square
            c = np.pad(labels[where] == i, ((1, 0), (1, 0))).astype(np.int32).cumsum(0).cumsum(1)  # summed-area table
            squares = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
            assert (squares == side * side).any(), i
    assert min(counts) >= p["min_times"] and max(counts) == p["max_times"]


def outpaint_expected_area(n, min_pad=0.04, max_pad=0.25, p_side=0.5):
    """E[hole fraction] of an n x n outpainting mask from LaMa's definition: sides padded independently with p_side,
    one chosen uniformly when none is; a pad of randint(int(min_pad n), int(max_pad n)) / n of the side (the upper
    end excluded); known = (1 - top - bottom) (1 - left - right), linear in each pad."""
    mean_pad, known = (int(min_pad * n) + int(max_pad * n) - 1) / 2 / n, 0.0
    for sides in np.ndindex(2, 2, 2, 2):
        prob = np.prod([p_side if s else 1 - p_side for s in sides])
        patterns = [sides] if any(sides) else [tuple(int(i == j) for j in range(4)) for i in range(4)]
        for t, b, l, r in patterns:
            known += prob / len(patterns) * (1 - mean_pad * (t + b)) * (1 - mean_pad * (l + r))
    return 1 - known


@pytest.mark.parametrize("resolution", [256, 100])
def test_outpainting_bands_at_least_one_side_and_their_mean_area(resolution):
    """Each mask is bands along the sides (the known region a rectangle), at least one, each 4-25 % of the side
    (rounded down), each side with p 1/2 + 1/16 x 1/4; the mean area is the definition's (outpaint_expected_area),
    and so is MEAN_AREA's figure. Tolerances: 4 standard errors."""
    rng = np.random.default_rng(0)
    n, pads, areas = 2000, [], []
    for _ in range(n):
        mask = outpaint_mask(rng, (resolution, resolution))
        full_rows, full_cols = mask.all(axis=1), mask.all(axis=0)
        pad = [int(np.argmin(full_rows)), int(np.argmin(full_rows[::-1])),  # top, bottom, left, right
               int(np.argmin(full_cols)), int(np.argmin(full_cols[::-1]))]
        want = np.ones_like(mask)
        want[pad[0]:resolution - pad[1], pad[2]:resolution - pad[3]] = 0
        assert np.array_equal(mask, want), pad
        assert any(pad) and all(p == 0 or int(0.04 * resolution) <= p <= 0.25 * resolution for p in pad), pad
        pads.append(pad)
        areas.append(mask.mean())
    pads = np.array(pads)
    padded = (pads > 0).mean(axis=0)
    p = 0.5 + 1 / 64
    assert (abs(padded - p) < 4 * math.sqrt(p * (1 - p) / n)).all(), padded
    used = pads[pads > 0]  # both ends of randint(int(0.04 n), int(0.25 n)) are drawn
    assert (used.min(), used.max()) == (int(0.04 * resolution), int(0.25 * resolution) - 1)
    expected = outpaint_expected_area(resolution)
    assert abs(np.mean(areas) - expected) < 4 * np.std(areas) / math.sqrt(n), (np.mean(areas), expected)
    assert abs(MEAN_AREA["outpaint"] - outpaint_expected_area(256)) < 0.005  # its stated error: ~0.003
