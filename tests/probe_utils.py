"""Shared by the tests and the probe scripts: scripts/ loaded as modules; `+probe=PATH` taken out of argv before
train.py sees it."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pop_probe(argv):
    probe = next(a for a in argv if a.startswith("+probe="))
    return Path(probe.split("=", 1)[1]), [a for a in argv if a != probe]


def load_script(name: str):
    """scripts/<name>.py (e.g. export, bench/benchmark_data) as a module, in this process (the scripts are not a
    package; a subprocess would import torch again)."""
    spec = importlib.util.spec_from_file_location(f"{name.replace('/', '_')}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
