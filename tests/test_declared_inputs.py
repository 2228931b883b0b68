"""Each DVC stage declares its inputs once: every project module its script imports (directly or
not) is covered by a declared dependency, and every params key its code reads is declared.

The params a stage reads are found in the source: chains ``params.<section>.<key>`` (and local
names bound to such a chain) in the stage's ``main`` and in every project function it calls,
following calls through stages/ and services/ (services/tracking.py records params, it reads none for the run).
"""

import ast
import os
import re

import pytest

from .stage_deps import PIPELINES, module_path, needed_files, rewrite
from .stage_fixtures import ROOT

LAUNCH_READS = {"run.nproc_per_node", "run.nnodes"}   # stages/launch.py: the world size


def dvc_stages():
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = []
    for stage in Repo(str(ROOT)).index.stages:
        files, params = [], []
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                params += dep.params
            else:
                files.append(os.path.relpath(dep.fs_path, ROOT))
        out.append((stage.addressing, stage.cmd, files, params))
    return out


STAGES = dvc_stages()


def parse(name: str) -> ast.Module:
    return ast.parse(module_path(name).read_text())


def stage_module(cmd: str) -> tuple[str, list[str]]:
    words = cmd.split()
    i = words.index("-m")
    if words[i + 1] == "stages.launch":
        return f"stages.{words[i + 2]}", words[i + 3:]
    return words[i + 1], words[i + 2:]


# ---------------------------------------------------------------- params read by the code
def chain(node) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def functions(name: str) -> tuple[dict, dict]:
    """Top-level functions of a stages module, and names it imports from other stages modules."""
    tree = parse(name)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    imports = {}
    package = name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                imports[a.asname or a.name] = (f"{package}.{node.module}", a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("stages", "services"):
            for a in node.names:
                imports[a.asname or a.name] = (node.module, a.name)
    return defs, imports


def target(name: str, module: str):
    defs, imports = functions(module)
    if name in defs:
        return module, name
    return imports.get(name)


def bindings(call: ast.Call, module: str, aliases: dict) -> tuple | None:
    """(module, function, {parameter: chain}) of a call of a project function."""
    if not isinstance(call.func, ast.Name) or target(call.func.id, module) is None:
        return None
    callee_module, callee = target(call.func.id, module)
    fn = functions(callee_module)[0].get(callee)
    if fn is None:
        return None
    names = [a.arg for a in fn.args.args]
    bound = {names[i]: aliases[a.id] for i, a in enumerate(call.args)
             if i < len(names) and isinstance(a, ast.Name) and a.id in aliases}
    bound.update({k.arg: aliases[k.value.id] for k in call.keywords
                  if k.arg and isinstance(k.value, ast.Name) and k.value.id in aliases})
    return callee_module, callee, bound


def reads(module: str, func: str, seen: set, bound: dict | None = None) -> set[str]:
    bound = bound if bound is not None else {"params": []}
    key = (module, func, repr(sorted(bound.items())))
    if key in seen or module == "services.tracking":
        return set()
    seen.add(key)
    defs, imports = functions(module)
    fn = defs.get(func)
    if fn is None:
        return set()
    aliases, definitions = dict(bound), set()
    for node in ast.walk(fn):  # cfg = params.teacher -> cfg stands for ["teacher"]
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            c = chain(node.value)
            if c and c[0] in aliases and len(c) > 1:
                aliases[node.targets[0].id] = aliases[c[0]] + c[1:]
                definitions.add(id(node.value))
    inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    called = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    out, handed = set(), set()
    for node in ast.walk(fn):  # aliases handed to project functions: read there
        if isinstance(node, ast.Call) and (b := bindings(node, module, aliases)):
            out |= reads(b[0], b[1], seen, b[2])
            handed |= {id(a) for a in [*node.args, *(k.value for k in node.keywords)]
                       if isinstance(a, ast.Name) and a.id in aliases}
    for node in ast.walk(fn):
        if id(node) in inner or id(node) in handed or id(node) in definitions:
            continue
        if isinstance(node, ast.Attribute):
            c = chain(node)
            if c and c[0] in aliases:
                path = aliases[c[0]] + c[1:-1 if id(node) in called else None]
                out.add(".".join(path))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and aliases.get(node.id):
            out.add(".".join(aliases[node.id]))  # a whole section used as such
    return {r for r in out if r}


def read_by_stage(cmd: str) -> set[str]:
    module, argv = stage_module(cmd)
    got = reads(module, "main", set())
    if "--method" in argv:  # the method comes from the command line: its settings block only
        method = argv[argv.index("--method") + 1]
        got = {f"distill.settings.{method}" if r == "distill.settings" else r for r in got - {"distill.method"}}
    if "--seed" in argv:  # the seed comes from the command line (the comparison's and ablation's seeds)
        got -= {"run.seed"}
    if "--variant" in argv:  # a DARWIN ablation: method darwin, its settings block overridden
        got = {"distill.settings.darwin" if r == "distill.settings" else r for r in got - {"distill.method"}}
    if "stages.launch" in cmd:
        got |= LAUNCH_READS
    return got


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


CODE = re.compile(r"^(robustkd|services|stages)(/.*\.py)?$")


@pytest.mark.parametrize("address, cmd, files, params", STAGES, ids=[s[0] for s in STAGES])
def test_a_stage_declares_exactly_the_modules_its_code_imports(address, cmd, files, params):
    """Both directions: a module the stage imports (directly or not) and is not declared, and a
    declared module it never imports (which would make it stale for nothing). No whole folders."""
    needed = set(needed_files(cmd))
    declared = {f for f in files if CODE.match(f)}
    folders = sorted(f for f in declared if not f.endswith(".py"))
    assert not folders, f"{address}: declares whole folders {folders}; `python -m tests.stage_deps --write`"
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not missing and not extra, (f"{address}: imports but does not declare {missing}; declares but does "
                                       f"not import {extra}; `python -m tests.stage_deps --write` fixes dvc.yaml")


def test_the_exactness_check_sees_a_removed_and_an_added_module():
    """The control: dvc.yaml with one module dep removed, and with one unimported module added,
    each reported as changed by the check of tests/stage_deps.py."""
    text = (ROOT / PIPELINES[0]).read_text()
    assert rewrite(text)[1] == []
    removed = text.replace("      - robustkd/attention.py\n", "", 1)
    added = text.replace("      - stages/prepare_data.py\n", "      - stages/prepare_data.py\n      - robustkd/attention.py\n", 1)
    assert removed != text and added != text
    assert rewrite(removed)[1] and rewrite(added)[1] == ["prepare_data"]


def test_imports_in_a_package_init_are_resolved_relative_to_the_package():
    """``from . import at_prm`` in robustkd/methods/__init__.py is robustkd.methods.at_prm."""
    from .stage_deps import closure
    assert {"robustkd.methods.at_prm", "robustkd.methods.darwin_lf"} <= closure("robustkd.methods")
    assert module_path("robustkd.methods").name == "__init__.py"


@pytest.mark.parametrize("address, cmd, files, params", STAGES, ids=[s[0] for s in STAGES])
def test_every_params_key_read_is_declared(address, cmd, files, params):
    missing = sorted(k for k in read_by_stage(cmd) if not covered(k, params))
    assert not missing, f"{address}: reads params {missing}, declared {params}"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "params").glob("*.yaml")))
def test_every_declared_params_key_exists_in_every_preset(preset):
    """DVC refuses a stage whose declared params key is missing from params.yaml ("Parameters ...
    are missing"), only when it runs: every key of every pipeline, in every preset's params."""
    from services.presets import load_preset

    values = load_preset(ROOT, preset)

    def present(key: str) -> bool:
        node = values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = sorted({f"{address}: {key}" for address, _, _, params in STAGES for key in params
                      if "${" not in key and not present(key)})
    assert not missing, f"params/{preset}.yaml lacks declared keys: {missing}"


def test_the_reader_finds_what_a_stage_reads():
    got = read_by_stage("python -m stages.launch distill --method rslad --name x")
    assert {"distill.student.arch", "distill.settings.rslad", "ddpm.fraction", "run.seed", "run.precision",
            "data.source", "run.nproc_per_node"} <= got
    assert "distill.method" not in got and "distill.settings" not in got
    assert "run.seed" not in read_by_stage("python -m stages.launch evaluate --seed 1 --model m.pt --out o.json")
    assert {"data.root", "data.source", "data.test_per_class"} <= read_by_stage("python -m stages.prepare_data")


def test_bytecode_never_counts_as_a_dependency_change():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__" in ignored and "*.pyc" in ignored
    assert re.search(r"(?m)^/metrics/", (ROOT / ".gitignore").read_text()) is None
