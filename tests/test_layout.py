"""The layout: no import cycle among the project's modules and scripts; only the command line's tests import train."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "data")
# tests that run train.py's command line in-process (its exit codes, its callbacks hook): the only importers of train
COMMAND_LINE_TESTS = {"ddp_probe.py", "fault_probe.py", "resume_probe.py", "test_reliability.py",
                      "test_latent_cache.py", "test_checks.py", "test_bases.py", "slurm_probe.py", "test_train.py",
                      "test_qwenimage.py"}


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
    assert "ldm.run" in graph and "benchmark" in graph and "harness" in graph["benchmark"]  # the graph is real
    assert "ldm.models.asym_decoder" in graph["ldm.run"] and "ldm.models.nonfinite" in graph["ldm.models.asym_decoder"]
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
    family -= {"ldm.modules.common"}
    assert {"ldm.modules.autoencoder", "ldm.modules.vae"} <= family  # the SD family's class and blocks
    recipe = ["ldm.models.asym_decoder", "ldm.modules.losses", *(n for n in graph if n.split(".")[0] == "data")]
    assert "ldm.modules.common" in reachable(graph, "ldm.models.asym_decoder")  # the graph is real
    for start in recipe:
        assert not reachable(graph, start) & family, (start, reachable(graph, start) & family)
