"""Latent-diffusion bases (configs/bases/*.yaml): which one a VAE file is, and refusing a VAE of another.

A base is the latent layout of an autoencoder: its family (ldm/modules/families.py), z_channels, use_quant_conv,
latent_norm (ldm/latent_norm.py).
A file tells what it holds: its weights give the latent width and the quant convs, a config.json (or a run
checkpoint's config, or statistics among the weights) the latent normalisation. What it cannot tell (sd1 and sdxl
single files have the same shapes, as do sd3 and flux) the configured base decides.
"""
from pathlib import Path

from omegaconf import OmegaConf

from ..modules.common import CheckpointError
from ..latent_norm import LatentNorm, agree

LAYOUT = ("family", "z_channels", "use_quant_conv", "latent_norm")


def read_bases(folder) -> dict:
    """{name: autoencoder kwargs of configs/bases/<name>.yaml}."""
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)).get("model", {}).get("autoencoder", {})
            for p in sorted(Path(folder).glob("*.yaml"))}


def file_layout(config: dict) -> dict:
    """The layout keys a checkpoint's config (Source.config) states; quant convs are there unless it says not."""
    return {"family": "sd", "use_quant_conv": True, **{k: config[k] for k in LAYOUT if k in config}}


def _agrees(a: dict, b: dict) -> bool:
    """Whether two layouts agree on the keys both state (latent statistics to 1e-6)."""
    def same(k):
        return agree(a[k], b[k]) if k == "latent_norm" else a[k] == b[k]
    return all(same(k) for k in LAYOUT if a.get(k) is not None and b.get(k) is not None)


def describe(layout: dict) -> str:
    parts = [f"the {layout['family']} layout" if layout.get("family", "sd") != "sd" else None,
             f"{layout['z_channels']} latent channels" if "z_channels" in layout else None,
             "quant convs" if layout.get("use_quant_conv", True) else "no quant convs"]
    norm = layout.get("latent_norm")
    if norm and norm.get("shift") is not None and norm.get("scale") is not None:
        parts.append(LatentNorm.from_config(norm).describe())
    return ", ".join(p for p in parts if p)


def check_base(where: str, config: dict, configured: dict, bases: dict) -> None:
    """Refuse, naming both bases, a checkpoint whose layout `config` (Source.config) is not the configured one."""
    have = file_layout(config)
    if _agrees(have, configured):
        return
    names = [name for name, kw in bases.items() if _agrees(have, kw)]
    found = " or ".join(names) if names else "an unknown"
    hint = f"; give -c configs/bases/{names[0]}.yaml after the width preset" if names else ""
    raise CheckpointError(f"{where}: a {found} VAE ({describe(have)}), but this run is configured for "
                          f"{configured.get('base') or 'another base'} ({describe(configured)}){hint}")
