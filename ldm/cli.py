"""What the scripts share: argparse types for their arguments (a bad value is a usage error naming the flag, exit
code 2), and script_main (a full disk said in one line, as train.py says it)."""
import argparse
import functools
import sys
from pathlib import Path

from .files import disk_full


def script_main(main):
    """A script's main(argv) -> exit code that says a full disk (or an exhausted quota) met while writing in one line
    on stderr, `error: No space left on device: could not write PATH; make room, then run it again`, exit code 2, as
    train.py does (ldm.files.disk_full), instead of a traceback. Our files are written whole or not at all
    (ldm.files.atomic_write): what was written before stays intact."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as raised:
            line = disk_full(raised)
            if line is None:
                raise
            print(f"error: {line}; make room, then run it again", file=sys.stderr)
            return 2
    return run


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
