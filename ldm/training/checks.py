"""What each config value must be: one table of rules, checked by load_config before anything is built.

load_config has already refused unknown keys and values of another type than base.yaml's; a rule here checks
the domain narrower than the type (a positive count, a probability, a width the family can build, a name
from a fixed set), including what a later phase needs (the GAN at loss.disc_start, validation), so that no
run fails hours in. A new config key gets one line in RULES (or in ANY_VALUE_OF_ITS_TYPE); a test checks that
every leaf of base.yaml is in one of them. Keys whose base value is null or a list, and the trainer's, are not
type-checked by load_config: their rules check the type too.
"""
import importlib.util
import math
from fnmatch import fnmatchcase
from typing import Callable, NamedTuple, Union

from omegaconf import OmegaConf

from ..modules.families import FAMILIES


class Rule(NamedTuple):
    """`test(value, at)` is True for a good value; `must` (or must(at)) says what the value must be.
    at(name) reads another key: a dotted name, or '.name' for a sibling of the key checked."""
    must: Union[str, Callable]
    test: Callable


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def value(must, test) -> Rule:
    """A rule on the value alone."""
    return Rule(must, lambda v, at: test(v))


def at_least(n, what="an integer") -> Rule:
    return value(f"{what} >= {n}", lambda v: _is_number(v) and v >= n and (what != "an integer" or _is_int(v)))


def between(lo, hi, lo_open=False, hi_open=False) -> Rule:
    must = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return value(must, lambda v: _is_number(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi))


def one_of(*names) -> Rule:
    return value("one of " + ", ".join(map(str, names)), lambda v: str(v) in map(str, names))


def nullable(rule: Rule) -> Rule:
    return Rule(lambda at: "null or " + _must(rule, at), lambda v, at: v is None or rule.test(v, at))


def not_below(other: str, what="an integer") -> Rule:
    """An integer >= 1 and >= the key `other` (min <= max)."""
    return Rule(lambda at: f"{what} >= 1 and >= {other.lstrip('.')} ({at(other)})",
                lambda v, at: _is_int(v) and v >= max(1, at(other)))


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
NON_NEGATIVE_NUMBER = at_least(0, "a number")
PROBABILITY = between(0, 1)
BOOL = value("true or false", lambda v: isinstance(v, bool))
SEED = value("an integer in [0, 2**32 - 1]", lambda v: _is_int(v) and 0 <= v < 2**32)


def _mults(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_int(m) and m >= 1 for m in v)


def family_width(mults: str) -> Rule:
    """A width the configured family builds times each m of the list at key `mults` (SD: GroupNorm(32) splits
    each product)."""
    def family(at):
        return FAMILIES[at("model.autoencoder.family")]
    return Rule(lambda at: family(at).width_must(f"{at.name(mults)} {at(mults)}"),
                lambda v, at: not _mults(at(mults)) or family(at).width_ok(v, at(mults)))


def latent_statistics(what: str, test: Callable) -> Rule:
    """null, or a list of one value or one per channel of the patchified latent (embed_dim x patch_size^2)."""
    def channels(at):
        p = at(".patch_size")
        return at("model.autoencoder.embed_dim") * (p * p if _is_int(p) and p >= 1 else 1)
    return Rule(lambda at: f"null (as the VAE file states) or a list of 1 or {channels(at)} {what} (one per channel "
                           f"of the latent in {at('.patch_size')}x{at('.patch_size')} patches)",
                lambda v, at: v is None or (isinstance(v, list) and len(v) in (1, channels(at))
                                            and all(test(x) for x in v)))


def _resolution_ok(r, at) -> bool:
    """A multiple of the encoder's downsampling (8 for 4 levels), and big enough for LPIPS's VGG (4 poolings)
    and for the discriminator when the GAN will switch on (n_layers halvings, then two 4x4 convs)."""
    if r % _factor(at) or r < 16:
        return False
    if gan_runs(at):
        side = r
        for _ in range(at("discriminator.n_layers")):
            side //= 2
        return side - 2 >= 1
    return True


def _factor(at) -> int:
    return max(8, 2 ** (len(at("model.autoencoder.encoder_ch_mult")) - 1))


def gan_runs(at) -> bool:
    return at("loss.disc_weight") > 0 and at("loss.disc_start") < at("trainer.max_steps")


def _buckets_ok(v, at) -> bool:
    """Width / height ratios in [1/4, 4] whose buckets differ and each have sides data.resolution would pass."""
    from data.buckets import aspect_buckets
    if not (isinstance(v, list) and v and all(_is_number(r) and 0.25 <= r <= 4 for r in v)):
        return False
    buckets = aspect_buckets(at("data.resolution"), v)
    return len(set(buckets)) == len(buckets) and all(_resolution_ok(side, at) for b in buckets for side in b)


def _buckets(at) -> str:
    """'; buckets: 48x24, ...' for the message, when the ratios are numbers."""
    from data.buckets import aspect_buckets
    ratios = at(at.key)
    if not (isinstance(ratios, list) and all(_is_number(r) and r > 0 for r in ratios)):
        return ""
    return "; buckets: " + ", ".join(f"{h}x{w}" for h, w in aspect_buckets(at("data.resolution"), ratios))


def _preset_has_weight(v, at) -> bool:
    name = at.key.rsplit(".", 1)[1]
    return v == 0 or any(part["weight"] > 0 for part in at(f"data.masks.presets.{name}").values())


STROKES, BOXES, PAD = "data.masks.presets.*.strokes.", "data.masks.presets.*.boxes.", "data.masks.presets.*.outpaint."
DEVICES = value("auto, a positive integer, -1 (all), a list of device indices or a string of them ('0,1')",
                lambda v: v == "auto" or (_is_int(v) and (v >= 1 or v == -1))
                or (isinstance(v, list) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v))
                or (isinstance(v, str) and v.replace(",", "").replace(" ", "").lstrip("-").isdigit()))

# (key pattern, rule), checked in this order; a pattern's '*' matches any preset name
RULES = [
    ("seed", SEED),
    ("model.vae_ckpt", value("null or a path", lambda v: v is None or isinstance(v, str))),  # existence: train.py
    ("model.autoencoder.family", one_of(*FAMILIES)),
    ("model.autoencoder.encoder_ch_mult", value("a non-empty list of positive integers", _mults)),
    ("model.autoencoder.ch_mult", Rule(
        lambda at: f"a list of positive integers as long as model.autoencoder.encoder_ch_mult "
                   f"{at('.encoder_ch_mult')} (the decoder upsamples as often as the encoder downsamples)",
        lambda v, at: _mults(v) and len(v) == len(at(".encoder_ch_mult")))),
    ("model.autoencoder.ch", POSITIVE),
    ("model.autoencoder.ch", family_width(".ch_mult")),
    ("model.autoencoder.encoder_ch", POSITIVE),
    ("model.autoencoder.encoder_ch", family_width(".encoder_ch_mult")),
    ("model.autoencoder.num_res_blocks", POSITIVE),
    ("model.autoencoder.encoder_num_res_blocks", POSITIVE),
    ("model.autoencoder.z_channels", POSITIVE),
    ("model.autoencoder.embed_dim", POSITIVE),
    ("model.autoencoder.embed_dim", Rule(  # without quant convs the latent is the encoder's z itself
        lambda at: f"equal to model.autoencoder.z_channels ({at('.z_channels')}) when use_quant_conv is false",
        lambda v, at: at(".use_quant_conv") or v == at(".z_channels"))),
    ("model.autoencoder.latent_norm.patch_size", POSITIVE),
    ("model.autoencoder.latent_norm.shift", latent_statistics("finite numbers", _is_number)),
    ("model.autoencoder.latent_norm.scale", latent_statistics("finite non-zero numbers",
                                                              lambda v: _is_number(v) and v != 0)),
    ("model.autoencoder.base", value("a non-empty name (sd1, sdxl, sd3, flux, qwenimage: configs/bases/)",
                                     lambda v: isinstance(v, str) and v.strip() != "")),
    ("model.compile", value("null, true, false or a torch.compile backend name",
                            lambda v: v is None or isinstance(v, (bool, str)))),  # the backend: train.py
    ("model.latent_noise", NON_NEGATIVE_NUMBER),
    ("model.val_latent_noise", NON_NEGATIVE_NUMBER),
    ("data.source", value("a non-empty string", lambda v: isinstance(v, str) and v != "")),
    ("data.val_source", value("null or a non-empty string", lambda v: v is None or (isinstance(v, str) and v != ""))),
    ("data.val_size", nullable(POSITIVE)),
    ("data.resolution", Rule(
        lambda at: f"a multiple of {_factor(at)} (the encoder's downsampling), at least 16 (LPIPS's VGG) and, while "
                   f"the GAN runs (loss.disc_start < trainer.max_steps), at least 3 x 2**discriminator.n_layers = "
                   f"{3 * 2 ** at('discriminator.n_layers')}", _resolution_ok)),
    ("data.batch_size", POSITIVE),
    ("data.num_workers", NON_NEGATIVE),
    ("data.seed", SEED),
    ("data.epoch_length", POSITIVE),
    ("data.crop_min_scale", between(0, 1, lo_open=True)),
    ("data.shuffle_buffer", NON_NEGATIVE),
    ("data.aspect_ratios", Rule(
        lambda at: f"a non-empty list of width / height ratios in [0.25, 4] giving distinct (H, W) buckets of about "
                   f"data.resolution^2 pixels, every side as data.resolution must be (a multiple of {_factor(at)}, >= 16, and "
                   f"while the GAN runs >= {3 * 2 ** at('discriminator.n_layers')}){_buckets(at)}",
        _buckets_ok)),
    ("data.masks.p_full", PROBABILITY),
    ("data.masks.p_full", Rule(lambda at: f"1 (all-ones masks only) while data.masks.mix {at('.mix')} has no positive "
                                          f"weight", lambda v, at: v == 1 or sum(at(".mix").values()) > 0)),
    ("data.masks.presets.*.weight", NON_NEGATIVE_NUMBER),
    (STROKES + "min_times", POSITIVE),
    (STROKES + "max_times", not_below(".min_times")),
    (STROKES + "max_width", POSITIVE),
    (STROKES + "max_len", POSITIVE),
    (STROKES + "max_angle", POSITIVE),
    (BOXES + "min_times", POSITIVE),
    (BOXES + "max_times", not_below(".min_times")),
    (BOXES + "min_size", POSITIVE),
    (BOXES + "max_size", not_below(".min_size")),
    (BOXES + "margin", Rule(lambda at: f"an integer >= 0 with max_size + 2 x margin <= 256 (max_size {at('.max_size')}: "
                                       f"the box fits the image)",
                            lambda v, at: _is_int(v) and v >= 0 and at(".max_size") + 2 * v <= 256)),
    (PAD + "min_pad", between(0, 0.5)),
    (PAD + "max_pad", Rule(lambda at: f"a fraction in [min_pad ({at('.min_pad')}), 0.5]",
                           lambda v, at: _is_number(v) and at(".min_pad") <= v <= 0.5)),
    (PAD + "p_side", PROBABILITY),
    ("data.masks.mix.*", NON_NEGATIVE_NUMBER),
    ("data.masks.mix.*", Rule(lambda at: f"0, as every component of its preset data.masks.presets.{at.key.rsplit('.', 1)[1]}"
                                         f" has weight 0", _preset_has_weight)),
    ("loss.l1_weight", NON_NEGATIVE_NUMBER),
    ("loss.l2_weight", NON_NEGATIVE_NUMBER),
    ("loss.perceptual_weight", NON_NEGATIVE_NUMBER),
    ("loss.perceptual_weight", Rule("a weight making l1_weight + l2_weight + perceptual_weight > 0 (the adaptive "
                                    "GAN weight divides by the reconstruction loss's gradient)",
                                    lambda v, at: at(".l1_weight") + at(".l2_weight") + v > 0)),
    ("loss.hole_weight", NON_NEGATIVE_NUMBER),
    ("loss.known_weight", NON_NEGATIVE_NUMBER),
    ("loss.known_weight", Rule("a weight making hole_weight + known_weight > 0 (the pixel loss is their sum)",
                               lambda v, at: at(".hole_weight") + v > 0)),
    ("loss.disc_weight", NON_NEGATIVE_NUMBER),
    ("loss.disc_start", NON_NEGATIVE),
    ("loss.disc_loss", one_of("hinge", "vanilla")),
    ("perceptual.net", one_of("vgg")),
    ("discriminator.ndf", POSITIVE),
    ("discriminator.n_layers", POSITIVE),
    ("optim.base_lr", NON_NEGATIVE_NUMBER),
    ("optim.betas", value("two numbers in [0, 1)", lambda v: isinstance(v, list) and len(v) == 2
                          and all(_is_number(b) and 0 <= b < 1 for b in v))),
    ("optim.warmup_steps", NON_NEGATIVE),
    ("optim.min_lr_ratio", PROBABILITY),
    ("optim.warm_start_lr_scale", NON_NEGATIVE_NUMBER),
    ("optim.grad_clip", NON_NEGATIVE_NUMBER),
    ("optim.accumulate_grad_batches", POSITIVE),
    ("optim.fused", value("null, true or false", lambda v: v is None or isinstance(v, bool))),
    ("ema.decay", nullable(between(0, 1, hi_open=True))),
    ("run.log_dir", value("a non-empty string", lambda v: isinstance(v, str) and v != "")),
    ("run.logger", one_of("csv", "wandb", "tensorboard")),
    ("run.logger", value("a logger whose package is installed (pip install wandb / tensorboard)",
                         lambda v: v == "csv" or importlib.util.find_spec(v) is not None)),
    ("run.wandb_project", value("a non-empty string", lambda v: v != "")),
    ("run.checkpoint_every_n_steps", POSITIVE),
    ("run.keep_last_k", value("an integer >= 0, or -1 (keep all)", lambda v: v >= -1)),
    ("run.max_nonfinite_steps", NON_NEGATIVE),
    ("run.sample_images", POSITIVE),
    ("trainer.max_steps", POSITIVE),
    ("trainer.accelerator", one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    ("trainer.devices", DEVICES),
    ("trainer.num_nodes", POSITIVE),
    ("trainer.strategy", value("a string (a Lightning strategy name)", lambda v: isinstance(v, str))),
    ("trainer.precision", one_of("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")),
    ("trainer.benchmark", value("true, false or null", lambda v: v is None or isinstance(v, bool))),
    ("trainer.log_every_n_steps", POSITIVE),
    ("trainer.val_check_interval", POSITIVE),
    ("trainer.limit_val_batches", value("null, an integer >= 0 (batches) or a fraction in [0, 1]",
                                        lambda v: v is None or (_is_int(v) and v >= 0)
                                        or (isinstance(v, float) and 0 <= v <= 1))),
    ("trainer.num_sanity_val_steps", at_least(-1)),
    ("trainer.enable_progress_bar", BOOL),
]
# leaves whose type (checked by load_config) is their whole domain
ANY_VALUE_OF_ITS_TYPE = ("model.autoencoder.use_condition", "model.autoencoder.gradient_checkpointing",
                         "model.autoencoder.use_quant_conv",
                         "model.sample_posterior", "model.channels_last", "data.flip", "perceptual.pretrained",
                         "run.overwrite")


def leaves(tree, prefix="") -> dict:
    """{dotted key: value} of the leaves of a nested dict: {'a': {'b': 1}} -> {'a.b': 1} (lists and empty dicts
    are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}


class _Reader:
    """at(name): another key's value, by dotted name or '.sibling' of `key`."""

    def __init__(self, tree: dict, key: str):
        self.tree, self.key = tree, key

    def name(self, name: str) -> str:
        return self.key.rsplit(".", 1)[0] + name if name.startswith(".") else name

    def __call__(self, name: str):
        node = self.tree
        for part in self.name(name).split("."):
            node = node[part]
        return node


def _must(rule: Rule, at) -> str:
    return rule.must(at) if callable(rule.must) else rule.must


def first_bad_value(cfg):
    """'KEY: what it must be, got VALUE' for the first value out of its domain, or None (load_config raises it)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    flat = leaves(tree)
    for pattern, rule in RULES:
        for key in (k for k in flat if fnmatchcase(k, pattern)):
            at = _Reader(tree, key)
            try:
                ok = rule.test(flat[key], at)
            except (TypeError, KeyError):  # another key of the wrong type: its own rule names it
                ok = True
            if not ok:
                return f"{key}: {_must(rule, at)}, got {flat[key]!r}"
    return None


def pointless(cfg) -> list:
    """Sentences on values that are valid but do nothing in this run (printed as warnings by train.py)."""
    t, loss, optim = cfg.trainer, cfg.loss, cfg.optim
    notes = []
    if loss.disc_weight > 0 and loss.disc_start >= t.max_steps:
        notes.append(f"loss.disc_start={loss.disc_start} >= trainer.max_steps={t.max_steps}: the GAN never switches "
                     f"on in this run")
    if optim.warmup_steps > t.max_steps:
        notes.append(f"optim.warmup_steps={optim.warmup_steps} > trainer.max_steps={t.max_steps}: the lr never "
                     f"reaches optim.base_lr")
    if t.val_check_interval > t.max_steps * optim.accumulate_grad_batches or t.limit_val_batches == 0:
        notes.append(f"trainer.val_check_interval={t.val_check_interval} batches, trainer.limit_val_batches="
                     f"{t.limit_val_batches}: this run never validates (no validation metrics, sample grids)")
    return notes
