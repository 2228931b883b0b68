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
    "robustkd": ("stages", "services", "pipeline", "benchmarks", "mlflow", "prefect", "dvc"),
    "services": ("stages", "pipeline", "benchmarks", "prefect"),
    "stages": ("pipeline", "benchmarks", "prefect"),
    "benchmarks": ("stages", "pipeline"),
    # the pipeline orchestrates and serves: no training or attack code runs in its processes
    "pipeline": ("stages", "robustkd.engine", "robustkd.methods", "robustkd.attacks", "services.training"),
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
