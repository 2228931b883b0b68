"""The exact code dependencies of each DVC stage: the project modules its script imports, directly
or not, found in the source (``ast``, imports anywhere in a module, relative ones resolved).

``python -m tests.stage_deps --write`` rewrites the module lines of every stage's ``deps`` in
dvc.yaml, compare/dvc.yaml and ablation/dvc.yaml to exactly that list (other deps, such as data,
templates and ``${...}`` files, are kept); ``--check`` exits 1 naming each stage whose list differs.
tests/test_declared_inputs.py asserts the same in both directions (a missing and an extra module).
A comment added to one core module then makes only the stages that import it stale.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("robustkd", "stages", "services")       # what a stage may import (pipeline/ never)
PIPELINES = ("dvc.yaml", "compare/dvc.yaml", "ablation/dvc.yaml")
# A module line of a stage's deps: a .py file of the packages, or a whole package folder (the old way).
MODULE_DEP = re.compile(r"^(\s*)- ((?:robustkd|services|stages)(?:/[\w/]+\.py)?)\s*(#.*)?$")


def module_path(name: str) -> Path:
    base = ROOT / name.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/")).is_dir()


def _existing(name: str) -> str:
    """The longest prefix of a dotted name that is a project module (``a.b.func`` -> ``a.b``)."""
    while name and not module_path(name).is_file():
        name = name.rpartition(".")[0]
    return name


def imported(name: str) -> set[str]:
    """Project modules that module ``name`` imports anywhere in it (in functions too)."""
    package = name if is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else (node.module or "")
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            n = _existing(n)
            if n.split(".")[0] in PACKAGES:
                out.add(n)
    return out


def closure(name: str) -> set[str]:
    """``name`` and every project module it imports, with the packages that hold them."""
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += imported(mod) | ({mod.rsplit(".", 1)[0]} if "." in mod else set())
    return seen


def stage_module(cmd: str) -> str:
    words = cmd.split()
    i = words.index("-m")
    return f"stages.{words[i + 2]}" if words[i + 1] == "stages.launch" else words[i + 1]


def needed_files(cmd: str) -> list[str]:
    """The files of a stage's code, as dvc.yaml paths relative to the project root."""
    mods = closure(stage_module(cmd))
    if "stages.launch" in cmd:
        mods |= closure("stages.launch")
    return sorted(str(module_path(m).relative_to(ROOT)) for m in mods)


def _stage_blocks(lines: list[str]):
    """(stage name, cmd, index of its ``deps:`` line) for each stage of a dvc.yaml's lines."""
    name, cmd, in_cmd = None, "", False
    for i, line in enumerate(lines):
        if re.match(r"^  [\w@-]+:\s*$", line):
            name, cmd, in_cmd = line.strip().rstrip(":"), "", False
        elif re.match(r"^    cmd:", line):
            cmd, in_cmd = line.split("cmd:", 1)[1].strip().lstrip(">-").strip(), True
        elif in_cmd and re.match(r"^      \S", line):
            cmd += " " + line.strip()
        elif re.match(r"^    deps:\s*$", line):
            in_cmd = False
            yield name, cmd, i
        elif re.match(r"^    \S", line):
            in_cmd = False


def rewrite(text: str, prefix: str = "") -> tuple[str, list[str]]:
    """dvc.yaml text with each stage's module deps replaced by its exact list; the stages changed."""
    lines = text.split("\n")
    changed, edits = [], []
    for name, cmd, at in _stage_blocks(lines):
        if "-m" not in cmd.split():
            continue
        j, old, indent = at + 1, [], "      "
        while j < len(lines) and (lines[j].startswith("      -") or lines[j].startswith("      #")):
            m = MODULE_DEP.match(lines[j])
            if m:
                indent = m.group(1)
                old.append(j)
            j += 1
        want = [f"{indent}- {prefix}{f}" for f in needed_files(cmd)]
        if [lines[k] for k in old] != want:
            changed.append(name)
        edits.append((at, old, want))
    for at, old, want in reversed(edits):
        for k in reversed(old):
            del lines[k]
        lines[at + 1:at + 1] = want
    return "\n".join(lines), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the module deps of every dvc.yaml")
    args = p.parse_args(argv)
    stale = []
    for rel in PIPELINES:
        path = ROOT / rel
        text = path.read_text()
        # compare/ and ablation/ run with wdir: .. and list the project's files as they are
        new, changed = rewrite(text)
        stale += [f"{rel}:{s}" for s in changed]
        if args.write and new != text:
            path.write_text(new)
    if stale and not args.write:
        print(f"module deps differ from the code's imports in {', '.join(stale)}; "
              f"`python -m tests.stage_deps --write` updates them", file=sys.stderr)
        return 1
    print(f"{'updated' if args.write else 'exact'}: {', '.join(stale) or 'every stage'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
