"""Latent-diffusion bases (configs/bases/*.yaml): which one a VAE file is, and refusing a VAE of another.

A base is the latent layout of an autoencoder family: z_channels, use_quant_conv, scaling_factor, shift_factor.
A file tells what it holds: its weights give the latent width and the quant convs, a config.json (or a run
checkpoint's config) the factors. What it cannot tell (sd1 and sdxl single files have the same shapes, as
do sd3 and flux) the configured base decides.
"""
from pathlib import Path

from omegaconf import OmegaConf

from .keys import CheckpointError

LAYOUT = ("z_channels", "use_quant_conv", "scaling_factor", "shift_factor")


def read_bases(folder) -> dict:
    """{name: autoencoder kwargs of configs/bases/<name>.yaml}."""
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)).get("model", {}).get("autoencoder", {})
            for p in sorted(Path(folder).glob("*.yaml"))}


def file_layout(config: dict) -> dict:
    """The layout keys a checkpoint's config (Source.config) states; quant convs are there unless it says not."""
    return {"use_quant_conv": True, **{k: config[k] for k in LAYOUT if k in config}}


def _agrees(a: dict, b: dict) -> bool:
    """Whether two layouts agree on the keys both state (factors to 1e-6)."""
    def same(x, y):
        return abs(x - y) < 1e-6 if isinstance(x, float) or isinstance(y, float) else x == y
    return all(same(a[k], b[k]) for k in LAYOUT if k in a and k in b)


def describe(layout: dict) -> str:
    parts = [f"{layout['z_channels']} latent channels" if "z_channels" in layout else None,
             "quant convs" if layout.get("use_quant_conv", True) else "no quant convs"]
    parts += [f"{k} {layout[k]:g}" for k in ("scaling_factor", "shift_factor") if k in layout]
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
