"""Strict config merging: experiment files and `key=value` overrides on top of one base YAML."""
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from .checks import first_bad_value, leaves


PASSTHROUGH = ("trainer.",)  # keys handed to pytorch_lightning.Trainer, whose values may be int or str
# keys set in the base whose null means something (all images, EMA off, the VAE file's latent statistics)
NULLABLE = ("data.val_size", "ema.decay", "model.autoencoder.latent_norm.shift", "model.autoencoder.latent_norm.scale")


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it."""


def _null_keys(cfg, prefix: str = "") -> set:
    """Dotted names of the null values in `cfg`."""
    found = set()
    for key in cfg.keys():
        node = cfg._get_node(key)
        if node._is_none():
            found.add(f"{prefix}{key}")
        elif isinstance(node, DictConfig):
            found |= _null_keys(node, f"{prefix}{key}.")
    return found


def _check_types(base, override, nullable: set, prefix: str = "") -> None:
    """Reject an override whose type differs from the base value (ints may stand for floats). Null overrides
    only a `nullable` key (NULLABLE and those null in the base file), a null value or a Trainer argument."""
    if not isinstance(override, DictConfig):
        return
    for key in override.keys():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{name}'")
        b, o = base._get_node(key), override._get_node(key)
        if o._is_none() and not (b._is_none() or name in nullable or name.startswith(PASSTHROUGH)):
            raise ConfigError(f"config key '{name}' cannot be null: it expects {_kind(b)}")
        if isinstance(b, DictConfig) or isinstance(o, DictConfig):
            if isinstance(b, DictConfig) and isinstance(o, DictConfig):
                _check_types(b, o, nullable, name + ".")
            elif not (b._is_none() or o._is_none()):
                raise ConfigError(f"config key '{name}' expects {_kind(b)}, got {_kind(o)}")
            continue
        if b._is_none() or o._is_none() or isinstance(b, ListConfig) or name.startswith(PASSTHROUGH):
            continue  # null base values and lists accept any value; Lightning checks its own arguments
        bv, ov = b._value(), o._value()
        if isinstance(bv, bool) != isinstance(ov, bool) or (
                not isinstance(ov, type(bv)) and not (isinstance(bv, float) and isinstance(ov, int))):
            raise ConfigError(f"config key '{name}' expects {type(bv).__name__}, got {ov!r}")


def _kind(node) -> str:
    if isinstance(node, DictConfig):
        return "a section"
    return "a list" if isinstance(node, ListConfig) else f"a value ({node._value()!r})"


def load_config(base: str | Path, files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> DictConfig:
    """Merge `files` then `key=value` overrides over `base`; unknown keys, wrong types and values out of
    their domain (ldm/training/checks.py) raise ConfigError."""
    layers = [(str(f), load_file(f)) for f in files]
    overrides = list(overrides)
    if overrides:
        layers.append(("command line", dotlist(overrides)))
    return merge_layers(base, layers)


def dotlist(overrides: Iterable[str]) -> DictConfig:
    """`key=value` items as one config layer."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(overrides)
    except Exception as err:  # omegaconf's grammar errors
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None


def merge_layers(base: str | Path, layers: Iterable[tuple[str, DictConfig]]) -> DictConfig:
    """Merge (source, layer) pairs over the `base` file in order, each checked strictly (errors name the source)."""
    cfg = load_file(base)
    nullable = _null_keys(cfg) | set(NULLABLE)
    for source, layer in layers:
        try:
            _check_types(cfg, layer, nullable)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        cfg = OmegaConf.merge(cfg, layer)
    OmegaConf.set_struct(cfg, True)  # later reads of a misspelt key fail loudly too
    if (bad := first_bad_value(cfg)) is not None:
        raise ConfigError(bad)
    return cfg


def load_file(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (for checkpoints and constructors)."""
    return OmegaConf.to_container(cfg, resolve=True)


def config_changes(then: dict, now: dict, ignore: Iterable[str] = ()) -> dict:
    """{dotted key: (value then, value now)} for every leaf that differs, "(absent)" where a side lacks it; in
    `now`'s key order, then the keys only `then` has."""
    old, new = leaves(then), leaves(now)
    keys = [k for k in new if k not in ignore and old.get(k, ...) != new[k]]
    keys += [k for k in old if k not in new and k not in ignore]
    return {k: (old.get(k, "(absent)"), new.get(k, "(absent)")) for k in keys}
