"""The layers import in one direction: robustkd (torch only) <- services <- stages <- dvc.yaml <-
pipeline; stages/ holds the stage scripts alone."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_pipeline_and_benchmarks_import_no_stage_module():
    for folder in ("pipeline", "benchmarks", "services"):
        for path in (ROOT / folder).glob("*.py"):
            bad = sorted(m for m in imported_top_modules(path) if m == "stages" or m.startswith("stages."))
            assert not bad, f"{path.relative_to(ROOT)} imports stage modules {bad}"


def test_the_core_library_imports_no_pipeline_layer():
    for path in (ROOT / "robustkd").rglob("*.py"):
        bad = sorted(m for m in imported_top_modules(path)
                     if m.split(".")[0] in ("stages", "services", "pipeline", "mlflow", "prefect", "dvc"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_stages_holds_only_stage_scripts():
    commands = []
    for f in ("dvc.yaml", "compare/dvc.yaml", "ablation/dvc.yaml"):
        for stage in yaml.safe_load((ROOT / f).read_text())["stages"].values():
            commands.append((stage.get("do") or stage)["cmd"])
    scripts = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__", "launch"}
    for name in scripts:
        assert any(f"stages.{name}" in c or f"stages.launch {name}" in c for c in commands), \
            f"stages/{name}.py is no DVC stage's script: shared code belongs in services/"


# The layer rules: folder -> imports it must not make (a module or a package prefix).
FORBIDDEN = {
    "robustkd": ("stages", "services", "pipeline", "benchmarks", "tools", "mlflow", "prefect", "dvc"),
    "services": ("stages", "pipeline", "benchmarks", "prefect"),
    "stages": ("pipeline", "benchmarks", "prefect"),
    "benchmarks": ("stages", "pipeline"),
    # the pipeline orchestrates and serves: no training or attack code runs in its processes
    "pipeline": ("stages", "robustkd.engine", "robustkd.methods", "robustkd.attacks", "services.training"),
    # environment tools (the torchvision fix, run by `make setup` before anything else works): standalone
    "tools": ("robustkd", "services", "stages", "pipeline", "benchmarks"),
}


def layer_violations(folder: Path, forbidden: tuple) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        for m in sorted(imported_top_modules(path)):
            if any(m == f or m.startswith(f + ".") for f in forbidden):
                out.append(f"{path.name} imports {m}")
    return out


def test_every_layer_imports_only_the_layers_below_it():
    bad = {folder: v for folder, forbidden in FORBIDDEN.items() if (v := layer_violations(ROOT / folder, forbidden))}
    assert not bad, bad


def test_the_layer_check_sees_a_planted_violation(tmp_path):
    (tmp_path / "bad.py").write_text("import os\nfrom robustkd.engine import run_training\n")
    assert layer_violations(tmp_path, FORBIDDEN["pipeline"]) == ["bad.py imports robustkd.engine"]


# ---------------------------------------------------------------- import cycles
CYCLE_PACKAGES = ("robustkd", "services", "stages", "benchmarks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=CYCLE_PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in it (a lazy import inside a function
    is an edge too: it hides a circle, it does not break it). Relative imports are resolved;
    ``from a import b`` is an edge to the module ``a.b`` where that is a module, else to ``a``."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}

    def existing(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for n in names if (t := existing(n)) and t != mod}
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycles_among_the_project_modules():
    cycles = import_cycles(import_graph(ROOT))
    assert not cycles, f"import circles (a module that needs the other's code belongs in a third): {cycles}"


def test_the_cycle_check_sees_a_planted_circle(tmp_path):
    pkg = tmp_path / "robustkd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from robustkd.a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path, ("robustkd",))
    assert graph["robustkd.c"] == {"robustkd.a"}
    assert import_cycles(graph) == [["robustkd.a", "robustkd.b"]]
