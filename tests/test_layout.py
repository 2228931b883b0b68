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
