"""Our `ldm` and `data`, whatever else the host Python holds under those names.

ComfyUI runs every node pack in one process, and latent-diffusion forks ship top-level `ldm` (and `data`)
packages too. So this pack never leaves ours in sys.modules: `Library.active()` swaps our modules in for the
length of a node's call (lazy imports inside the library, `from data.images import ...` or relative imports
resolved through sys.modules, then find ours) and puts whatever was there back afterwards. Ours are found at
`root` only (a finder ahead of sys.path, for the names `ldm` and `data`), never through sys.path.
"""
import importlib.machinery
import importlib.metadata
import json
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

NAMES = ("ldm", "data")  # our top-level packages
DISTRIBUTION = "asymmetric-decoder"  # pyproject.toml's [project] name


def _is_ours(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in NAMES)


def _take(modules: dict) -> dict:
    """Remove (and return) every module of our top-level names from `modules`."""
    return {name: modules.pop(name) for name in [n for n in modules if _is_ours(n)]}


def _library_root(folder: Path):
    return folder if all((folder / top / "__init__.py").is_file() for top in NAMES) else None


def find_root(pack: Path) -> Path:
    """The folder holding our `ldm/` and `data/`: the repository the pack lives in (a symlinked pack), else
    where pip installed the library (`pip install <repository>`; an editable install's source folder)."""
    repo = _library_root(pack.resolve().parent)
    if repo is not None:
        return repo
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the {DISTRIBUTION} library is not installed in this Python ({sys.executable}): "
                          "see the README's ComfyUI section") from None
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
        root = _library_root(Path(direct["url"][len("file://"):]))
    else:
        root = _library_root(Path(dist.locate_file("")))
    if root is None:
        raise ImportError(f"{DISTRIBUTION} is installed ({dist.locate_file('')}) but its ldm/ and data/ are not found")
    return root


class _Finder:
    """A meta-path finder for our top-level names only, at `root` (submodules follow their parent's __path__)."""

    def __init__(self, root: Path):
        self.root = str(root)

    def find_spec(self, name, path=None, target=None):
        if name in NAMES:
            return importlib.machinery.PathFinder.find_spec(name, [self.root])
        return None


class Library:
    """Our library, imported once under its own names and swapped into sys.modules while a node runs."""

    _lock = threading.RLock()  # one swap at a time (ComfyUI runs prompts in one thread; the lock is cheap)

    def __init__(self, root: Path):
        self.root = Path(root)
        self._finder = _Finder(self.root)
        self._modules: dict = {}  # ours, kept between calls (lazily imported submodules included)

    @contextmanager
    def active(self):
        """Within: sys.modules['ldm'...] and ['data'...] are ours; after: as they were."""
        with self._lock:
            foreign = _take(sys.modules)
            sys.modules.update(self._modules)
            sys.meta_path.insert(0, self._finder)
            try:
                yield
            finally:
                sys.meta_path.remove(self._finder)
                self._modules = _take(sys.modules)
                sys.modules.update(foreign)

    def module(self, name: str):
        """Import one of our modules (inside active(): its import-time imports find ours)."""
        with self.active():
            return importlib.import_module(name)
