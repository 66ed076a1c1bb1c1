"""argparse types for the scripts' arguments: a bad value is a usage error naming the flag (exit code 2)."""
import argparse
from pathlib import Path


def _number(text: str, kind=int):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def at_least(low: int):
    """An integer >= low."""
    def parse(text: str) -> int:
        value = _number(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value
    return parse


def tile_side(text: str) -> int:
    """--tile: 0 (never tile) or a latent tile side larger than the tiles' overlap."""
    from .modules.tiling import OVERLAP
    value = _number(text)
    if value != 0 and value <= OVERLAP:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 (never) or larger than the overlap, {OVERLAP} latent px")
    return value


def multiple_of_8(text: str) -> int:
    """A positive image side in pixels that the autoencoder's 8x downsampling divides."""
    value = _number(text)
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive multiple of 8")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must be in [0, 1]")
    return value


def non_negative(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{value}: must be at least 0")
    return value


def existing(text: str) -> str:
    """A file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def existing_folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def ratios(text: str) -> list:
    """Comma-separated width / height ratios, each in [0.25, 4] (data.aspect_ratios' domain)."""
    values = [_number(part, float) for part in text.split(",") if part.strip()]
    if not values or not all(0.25 <= v <= 4 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated width/height ratios in [0.25, 4]")
    return values
