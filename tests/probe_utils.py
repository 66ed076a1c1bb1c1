"""Shared by the probe scripts: take `+probe=PATH` out of argv before train.py sees it."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pop_probe(argv):
    probe = next(a for a in argv if a.startswith("+probe="))
    return Path(probe.split("=", 1)[1]), [a for a in argv if a != probe]
