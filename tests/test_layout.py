"""The code's layout: layered packages, no import circle, every Python file in a folder with a rule.

Layers, each importing only those below it (and itself):
    modules <- dataloaders <- runtime <- {analysis} <- training ; runtime <- retrieval
``training`` and ``retrieval`` never import each other; ``preprocess`` (programs that write data files) may use
the library, the loaders and runtime (the frame cache decodes as the loader does and writes atomically).
Beside the layers: ``reference`` (the published computation written out independently, the tests' oracle)
imports nothing of the project; ``benchmarks`` measure the library and the programs (and time the reference);
``demo`` drives the programs; the top-level programs (main.py, ...) use the layers; ``tests`` may import
anything, and nothing but the tests imports them. Every import counts, those inside functions too.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("modules", "dataloaders", "runtime", "analysis", "training", "retrieval")
PACKAGES = LAYERS + ("demo", "preprocess", "benchmarks", "reference", "tests")
PROGRAMS = ("main", "search_videos", "search_for_best_r1_with_qb_norm")  # top-level .py files
# Folders without Python, each with what it holds (docs/layout.md says the same).
OTHER_FOLDERS = {"docs": "the documentation", "scripts": "shell launch scripts", ".ci": "the CI script"}
ALLOWED = {
    "modules": {"modules"},
    "dataloaders": {"modules", "dataloaders"},
    "preprocess": {"preprocess", "modules", "dataloaders", "runtime"},
    "runtime": {"modules", "dataloaders", "runtime"},
    "analysis": {"modules", "dataloaders", "runtime", "analysis"},
    "training": {"modules", "dataloaders", "runtime", "analysis", "training"},
    "retrieval": {"modules", "dataloaders", "runtime", "retrieval"},
    "demo": {"modules", "dataloaders", "runtime", "preprocess", "training", "retrieval", "analysis", "demo"},
    "reference": {"reference"},
    "benchmarks": {*LAYERS, "preprocess", "reference", "benchmarks"},
    "tests": set(PACKAGES) | set(PROGRAMS),
    **{program: set(LAYERS) for program in PROGRAMS},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {program: REPO / f"{program}.py" for program in PROGRAMS}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def python_files() -> list[Path]:
    """Every .py file of the repository (not in hidden folders such as .venv or .git, nor in __pycache__)."""
    return [p for p in sorted(REPO.rglob("*.py"))
            if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(REPO).parts)]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports (a package's __init__ counts for each of its submodules)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            if target in known:
                found.add(target)
            elif target.split(".")[0] in PACKAGES + PROGRAMS:
                # "from package import name": the package itself
                parent = target.rsplit(".", 1)[0]
                if parent in known:
                    found.add(parent)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _package_module(name: str) -> bool:
    return (REPO / name.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40, "the project's modules were not found"
    # a package's __init__ importing its own submodules is how packages re-export; not a circle
    pruned = {n: {m for m in deps if not (_package_module(n) and m.startswith(n + "."))} for n, deps in graph.items()}
    cycle = find_cycle(pruned)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers(package):
    bad = []
    for name, deps in import_graph().items():
        if name.split(".")[0] != package:
            continue
        for dep in sorted(deps):
            if dep.split(".")[0] not in ALLOWED[package]:
                bad.append(f"{name} imports {dep}")
    assert not bad, f"{package}/ may import only {sorted(ALLOWED[package])}: " + "; ".join(bad)


def test_every_python_file_is_in_a_folder_with_a_rule():
    known = set(project_modules().values())
    stray = [str(p.relative_to(REPO)) for p in python_files() if p not in known]
    assert not stray, "Python files outside the layout (give their folder a rule here and in docs/layout.md): " + \
        ", ".join(stray)
    assert set(ALLOWED) == set(PACKAGES) | set(PROGRAMS)
    folders = {p.relative_to(REPO).parts[0] for p in python_files() if len(p.relative_to(REPO).parts) > 1}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0:  # in a checkout: every folder of the repository, Python or not
        folders |= {line.split("/")[0] for line in tracked.stdout.splitlines() if "/" in line}
    unknown = sorted(folders - set(PACKAGES) - set(OTHER_FOLDERS))
    assert not unknown, f"folders the layout does not name: {unknown}"
    layout = (REPO / "docs" / "layout.md").read_text()
    unnamed = [f for f in (*PACKAGES, *OTHER_FOLDERS) if f"{f}/" not in layout]
    assert not unnamed, f"docs/layout.md does not describe {unnamed}"


def test_nothing_but_the_tests_imports_them():
    bad = [f"{name} imports {dep}" for name, deps in import_graph().items() if name.split(".")[0] != "tests"
           for dep in deps if dep.split(".")[0] == "tests"]
    assert not bad, "; ".join(bad)


def test_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "modules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from training.config import parse_args\n")
    known = {"modules", "modules.a", "training.config"}
    assert imports_of("modules.a", pkg / "a.py", known) == {"training.config"}
    assert imports_of("modules", pkg / "__init__.py", known) == {"modules.a"}

