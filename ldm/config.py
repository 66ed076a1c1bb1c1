"""Strict config merging: experiment files and `key=value` overrides on top of one base YAML."""
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf


PASSTHROUGH = ("trainer.",)  # keys handed to pytorch_lightning.Trainer, whose values may be int or str


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it."""


def _check_types(base, override, prefix: str = "") -> None:
    """Reject an override whose type differs from the base value (ints may stand for floats; null is free)."""
    if not isinstance(override, DictConfig):
        return
    for key in override.keys():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{name}'")
        b, o = base._get_node(key), override._get_node(key)
        if isinstance(b, DictConfig) or isinstance(o, DictConfig):
            if isinstance(b, DictConfig) and isinstance(o, DictConfig):
                _check_types(b, o, name + ".")
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
    return "a section" if isinstance(node, DictConfig) else f"a value ({node._value()!r})"


def load_config(base: str | Path, files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> DictConfig:
    """Merge `files` then `key=value` overrides over `base`; unknown keys and wrong types raise ConfigError."""
    cfg = _load(base)
    layers = [(str(f), _load(f)) for f in files]
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        try:
            layers.append(("command line", OmegaConf.from_dotlist(overrides)))
        except Exception as err:  # omegaconf's grammar errors
            raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None
    for source, layer in layers:
        try:
            _check_types(cfg, layer)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        cfg = OmegaConf.merge(cfg, layer)
    OmegaConf.set_struct(cfg, True)  # later reads of a misspelt key fail loudly too
    return cfg


def _load(path: str | Path) -> DictConfig:
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
