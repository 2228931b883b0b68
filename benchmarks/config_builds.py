"""How often one `dvc repro` parses params.yaml and builds a method's settings object.

The project asks that a run (docs/pipeline.md: what each stage reads and writes)
reads its parameters once per stage and builds each typed configuration once. This counts it, in
every stage process of a real `dvc repro` of a project (``--project``, e.g. a copy made by
``tests/stage_fixtures.project_copy``): a ``sitecustomize`` put first on PYTHONPATH wraps
``services.params.parse_params`` and the ``__init__`` of every method config class of
``robustkd.methods`` when (and only if) a process imports them, and each process appends its counts
to a JSON-lines file. DVC's own processes import neither and count nothing.

    python -m benchmarks.config_builds --project /tmp/tinyproject      # prints a table, per stage
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HOOK = r'''
import atexit, importlib.abc, importlib.machinery, json, os, sys
from collections import Counter

_COUNTS = Counter()
_OUT = os.environ["ROBUSTKD_COUNT_FILE"]
_WATCH = {"services.params", "robustkd.methods"}


def _wrap(fn, key):
    def wrapped(*a, **k):
        _COUNTS[key] += 1
        return fn(*a, **k)
    return wrapped


def _patch(module):
    if module.__name__ == "services.params":
        module.parse_params = _wrap(module.parse_params, "params.yaml parses")
    else:   # robustkd.methods: every registered method's config class
        for name in module.available_methods():
            cls = module.get_method(name).config
            if not getattr(cls, "_counted", False):
                cls.__init__ = _wrap(cls.__init__, f"{cls.__name__} builds")
                cls._counted = True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _WATCH:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())


@atexit.register
def _write():
    if _COUNTS:
        with open(_OUT, "a") as f:
            f.write(json.dumps({"stage": os.environ.get("DVC_STAGE", " ".join(sys.argv[:3])),
                                "counts": dict(_COUNTS)}) + "\n")
'''


def count(project: Path, command: str = "dvc repro -f") -> list[dict]:
    """Run ``command`` in ``project`` with the counting hook; one record per counting process."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(HOOK)
        out = Path(tmp) / "counts.jsonl"
        env = {**os.environ, "ROBUSTKD_COUNT_FILE": str(out), "ROBUSTKD_TRACKING": "off",
               "PYTHONPATH": os.pathsep.join([tmp, str(project), os.environ.get("PYTHONPATH", "")]),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: {command!r} failed in {project} ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="a project folder with params.yaml and dvc.yaml")
    ap.add_argument("--command", default="dvc repro -f", help="what to run there (default: %(default)s)")
    args = ap.parse_args(argv)
    records = count(args.project.resolve(), args.command)
    total: Counter = Counter()
    for r in records:
        total.update(r["counts"])
        print(f"{r['stage']:<22} " + ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())))
    print(f"{'total':<22} " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))


if __name__ == "__main__":
    main()
