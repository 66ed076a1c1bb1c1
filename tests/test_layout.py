"""The layout: no import cycle among the project's modules and scripts, no import from a lower layer of ldm/ to a
higher one, a family's folder imported by the families' registry alone; only the command line's tests import train."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "data")
# tests that run train.py's command line in-process (its exit codes, its callbacks hook): the only importers of train
COMMAND_LINE_TESTS = {"ddp_probe.py", "fault_probe.py", "resume_probe.py", "test_reliability.py",
                      "test_latent_cache.py", "test_checks.py", "test_bases.py", "slurm_probe.py", "test_train.py",
                      "test_qwenimage.py", "test_run_safety.py"}


def module_name(path: Path) -> str:
    """ldm/models/asym_decoder.py -> ldm.models.asym_decoder; ldm/__init__.py -> ldm; scripts/bench/x.py -> x."""
    rel = path.relative_to(ROOT).with_suffix("")
    if rel.parts[0] in PACKAGES:
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        return ".".join(parts)
    return rel.name  # a script: imported by its siblings under its stem (its folder is on sys.path when run)


def imported(path: Path) -> set:
    """Every module name `path` imports, at the top or inside a function (a lazy import closes a cycle too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # from pkg import submodule
    return names


def project_graph() -> dict:
    """module -> the project modules it imports: the packages, train, and for a script the scripts beside it."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    files += [ROOT / "train.py", *(ROOT / "scripts").rglob("*.py")]
    modules = {module_name(p): p for p in files}
    packaged = {n for n in modules if n.split(".")[0] in PACKAGES}
    graph = {}
    for name, path in modules.items():
        siblings = {module_name(p) for p in path.parent.glob("*.py")} if name not in packaged else set()
        graph[name] = {t for t in imported(path) if t in packaged | siblings | {"train"}} - {name}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_cycle_and_none_in_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x2"}, "x2": set(), "benchmark": {"memory"}, "memory": {"benchmark"}}) == [
        "benchmark", "memory", "benchmark"]


def test_no_import_cycle_in_the_packages_or_the_scripts():
    graph = project_graph()
    assert "ldm.training.run" in graph and "benchmark" in graph and "harness" in graph["benchmark"]  # the graph is real
    assert "ldm.models.asym_decoder" in graph["ldm.training.run"] and "ldm.models.nonfinite" in graph["ldm.models.asym_decoder"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_command_line_tests_import_train():
    importers = {p.relative_to(ROOT).as_posix() for p in [*(ROOT / "scripts").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
                 if "train" in imported(p)}
    assert importers == {f"tests/{name}" for name in COMMAND_LINE_TESTS}, importers


def reachable(graph: dict, start: str) -> set:
    """Every project module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_training_step_losses_and_data_import_no_family_module():
    """The recipe is the same for every family (STYLE.md): the training step, the losses and the data reach the
    autoencoder through ldm/modules/common.py's interface only, never a family's module."""
    from ldm.modules.families import FAMILIES
    graph = project_graph()
    classes = {cls.__module__ for cls in FAMILIES.values()}
    family = classes | {m for c in classes for m in graph[c] if m.startswith("ldm.modules.")}
    family -= {"ldm.modules.common", "ldm.modules.tiling"}
    assert {"ldm.modules.sd.autoencoder", "ldm.modules.sd.vae"} <= family  # the SD family's class and blocks
    recipe = ["ldm.models.asym_decoder", "ldm.modules.losses", *(n for n in graph if n.split(".")[0] == "data")]
    assert "ldm.modules.common" in reachable(graph, "ldm.models.asym_decoder")  # the graph is real
    for start in recipe:
        assert not reachable(graph, start) & family, (start, reachable(graph, start) & family)


# ldm/ by concern, low to high (ldm/__init__.py says the same): a module may import its own layer or a lower one
LAYERS = [("data", "ldm.files", "ldm.latent_norm"), ("ldm.metrics",), ("ldm.modules",), ("ldm.formats",),
          ("ldm.models",), ("ldm.training",), ("ldm.decoding",), ("ldm.evaluation",), ("ldm.cli",), ("ldm",)]


def layer(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module` (ldm.modules.sd.keys -> ldm.modules)."""
    best = max((p for group in LAYERS for p in group if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def upward_imports(graph: dict) -> list:
    return sorted((a, b) for a, deps in graph.items() if a.split(".")[0] in PACKAGES for b in deps
                  if layer(b) > layer(a))


def family_intrusions(graph: dict) -> list:
    """(importer, module) pairs where a module outside a family's folder imports the folder: only the registry may."""
    families = {m.rpartition(".")[0] for m in graph if m.startswith("ldm.modules.") and m.count(".") == 3}
    return sorted((a, b) for a, deps in graph.items() for b in deps for f in families
                  if (b == f or b.startswith(f + ".")) and not a.startswith(f + ".") and a != f
                  and a != "ldm.modules.families")


def test_ldm_is_grouped_by_concern_and_a_few_shared_modules():
    top = sorted(p.name for p in (ROOT / "ldm").iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "cli.py", "files.py", "latent_norm.py", "metrics.py"], top
    for folder in [p for p in (ROOT / "ldm").rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "mport" in doc, f"{folder}: its __init__.py should say what it holds and what it may import"
    graph = project_graph()
    assert {m for m in graph if m.startswith("ldm.modules.")} >= {"ldm.modules.sd.keys", "ldm.modules.qwenimage.keys"}


def test_no_import_goes_from_a_lower_layer_to_a_higher_one():
    graph = project_graph()
    assert upward_imports({"ldm.modules.common": {"ldm.formats.convert"}}) == [
        ("ldm.modules.common", "ldm.formats.convert")]  # the check sees a network reaching up to the loader
    assert upward_imports(graph) == []


def test_only_the_registry_imports_a_family():
    graph = project_graph()
    assert "ldm.modules.sd.keys" in graph["ldm.modules.families"]  # the graph is real
    assert family_intrusions({**graph, "ldm.formats.convert": graph["ldm.formats.convert"] | {
        "ldm.modules.qwenimage.keys"}}) == [("ldm.formats.convert", "ldm.modules.qwenimage.keys")]
    assert family_intrusions(graph) == []


FIXTURES = ROOT / "tests" / "fixtures"


def test_a_run_checkpoint_written_before_the_move_loads_and_decodes_as_it_did():
    """tests/fixtures/run_before_layout.ckpt: train.py's last.ckpt after 2 steps at bd2d79f (the commit before ldm/
    was grouped by concern; 32 wide, 2 levels), and the encode and decode that commit's load_autoencoder gave. Its
    pickle names no class of ours, so no module move can break reading it."""
    import pickletools
    import zipfile

    import torch

    from ldm import load_autoencoder
    with zipfile.ZipFile(FIXTURES / "run_before_layout.ckpt") as ckpt:
        pickle = ckpt.read(next(n for n in ckpt.namelist() if n.endswith("data.pkl")))
    ops = [str(arg) for op, arg, _ in pickletools.genops(pickle) if op.name in ("GLOBAL", "SHORT_BINUNICODE")]
    assert "torch._utils _rebuild_tensor_v2" in ops and not [o for o in ops if o.startswith(("ldm", "data."))]
    vae = load_autoencoder(FIXTURES / "run_before_layout.ckpt")
    then = torch.load(FIXTURES / "run_before_layout_decode.pt")
    assert vae.load_report.format == "run" and not vae.load_report.fresh and vae.config["ch_mult"] == [1, 1]
    with torch.no_grad():
        assert torch.allclose(vae.encode(then["image"]).mean, then["z"], atol=1e-5)
        assert torch.allclose(vae.decode(then["z"], then["image"], then["mask"]), then["decoded"], atol=1e-5)
