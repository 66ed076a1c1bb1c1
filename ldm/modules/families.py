"""Autoencoder families: `model.autoencoder.family` names the class, and every autoencoder is built here from its
kwargs (a config's model.autoencoder, a checkpoint's config). Each family is a folder beside this file (its blocks,
encoder, decoder and key tables) whose class implements ldm/modules/common.py's AsymmetricAutoencoder. This registry
is the only module outside a family's folder that imports it: the loaders read key layouts through the functions
below, and nothing else asks which family."""
from typing import Optional

from ..latent_norm import upgrade as upgrade_latent_norm
from .common import AsymmetricAutoencoder
from .qwenimage import keys as qwenimage_keys
from .qwenimage.autoencoder import AsymmetricAutoencoderKLQwenImage
from .sd import keys as sd_keys
from .sd.autoencoder import PRESETS, AsymmetricAutoencoderKL  # noqa: F401  (PRESETS: the package's face)

FAMILIES = {cls.family: cls for cls in (AsymmetricAutoencoderKL, AsymmetricAutoencoderKLQwenImage)}
DEFAULT = "sd"  # configs and checkpoints from before families: the SD layout
# a diffusers VAE folder's config.json `_class_name` -> the reader of its config (kwargs of our family's class)
DIFFUSERS_CLASSES = {**dict.fromkeys(("AutoencoderKL", "AutoencoderKLFlux2", "AsymmetricAutoencoderKL"),
                                     sd_keys.config_from_diffusers),
                     "AutoencoderKLQwenImage": qwenimage_keys.config_from_diffusers}
BATCH_NORM = sd_keys.BATCH_NORM  # FLUX.2's latent statistics, stored as batch-norm buffers (bn.*) in its VAE
latent_norm_from_batch_norm = sd_keys.latent_norm_from_batch_norm


def family_class(name: str) -> type:
    if name not in FAMILIES:
        raise ValueError(f"model.autoencoder.family {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_autoencoder(**kwargs) -> AsymmetricAutoencoder:
    """The family's autoencoder from its kwargs (model.autoencoder; family absent: sd)."""
    return family_class(kwargs.get("family", DEFAULT))(**kwargs)


def upgrade(kw: dict) -> dict:
    """Autoencoder kwargs saved by an older version -> today's keys (scaling factors -> latent_norm; no family
    key: sd, the only family then)."""
    return {"family": DEFAULT, **upgrade_latent_norm(kw)}


def own_keys(state: dict, where: str) -> tuple[dict, Optional[str], list]:
    """A state dict in its family's own keys: (state, the format its key names show ("wan", "diffusers") or None,
    the keys dropped by name). Qwen-Image's names are tried first: its diffusers names share SD's prefixes."""
    return qwenimage_keys.own_keys(state, where) or sd_keys.own_keys(state, where)


def infer_config(state: dict, where: str) -> dict:
    """The kwargs a state dict's weights imply, by its family's key layout."""
    keys = qwenimage_keys if qwenimage_keys.is_qwenimage(state) else sd_keys
    return keys.infer_config(state, where)
