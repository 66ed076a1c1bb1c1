"""Autoencoder families: `model.autoencoder.family` names the class, and every autoencoder is built here from its
kwargs (a config's model.autoencoder, a checkpoint's config). Each family is a module (its blocks, encoder,
decoder) whose class implements ldm/modules/common.py's AsymmetricAutoencoder; nothing else asks which family."""
from ..latent_norm import upgrade as upgrade_latent_norm
from .autoencoder import AsymmetricAutoencoderKL
from .common import AsymmetricAutoencoder
from .qwenimage import AsymmetricAutoencoderKLQwenImage

FAMILIES = {cls.family: cls for cls in (AsymmetricAutoencoderKL, AsymmetricAutoencoderKLQwenImage)}
DEFAULT = "sd"  # configs and checkpoints from before families: the SD layout


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
