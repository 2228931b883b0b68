"""Make the PyPI torchvision wheel importable on a CPU-only torch (docs/development.md#installation).

Cause: the torchvision 0.28.0 wheel on PyPI is a CUDA build. On a CPU torch its ``_C.so``
fails to load (it needs ``libtorch_cuda.so``), and ``torchvision/_meta_registrations.py``
then registers fake kernels for ``torchvision::nms``/``qnms``, ops that were never defined:
``RuntimeError: operator torchvision::nms does not exist``.

Fix: define those two op schemas before torchvision is first imported. Models, datasets,
transforms and DataLoader workers then work; the compiled ops (``torchvision.ops.nms``,
``torchvision.io`` decoders) stay unavailable, and this project uses neither.

It must act in every interpreter, subprocesses too (DataLoader spawn workers, MLflow's
requirement inference), so ``python -m tools.tvfix`` (from the repository root) installs, only
when the import really fails, a ``.pth`` file into site-packages. The ``.pth`` adds a tiny import
hook that runs the fix lazily, the first time anything imports torchvision: interpreters that
never import it (dvc, pip) pay nothing. On a machine with a matching torchvision nothing is installed.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "_robustkd_tvfix_hook"
PTH_NAME = "robustkd_tvfix.pth"

HOOK_SOURCE = '''"""Installed by tools.tvfix: defines torchvision's nms op schemas before torchvision loads."""
import sys


def define_torchvision_op_schemas():
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # the compiled extension (or an earlier call) defined them
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.modules[__name__]._library = lib  # keep the registration alive


class _TorchvisionFinder:
    """A meta-path finder that only runs the fix, then lets the normal finders import."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_op_schemas()
        return None


if not any(type(f).__name__ == "_TorchvisionFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionFinder())
'''


def torchvision_imports(python: str = sys.executable) -> tuple[bool, str]:
    """Try ``import torchvision`` in a fresh interpreter; return (ok, error text)."""
    proc = subprocess.run([python, "-c", "import torchvision.models, torchvision.datasets"],
                          capture_output=True, text=True)
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def install(site_packages: Path | None = None) -> str:
    """Install the hook only where the plain import fails with the known error."""
    ok, err = torchvision_imports()
    if ok:
        return "torchvision imports as it is: nothing to install"
    if "torchvision::nms" not in err:
        raise RuntimeError(f"torchvision fails to import for another reason than the known one: {err}")
    site = site_packages or Path(sysconfig.get_paths()["purelib"])
    (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
    (site / PTH_NAME).write_text(f"import {HOOK_MODULE}\n")
    ok, err = torchvision_imports()
    if not ok:
        raise RuntimeError(f"torchvision still fails after installing the fix into {site}: {err}")
    return f"installed the torchvision op-schema fix into {site}"


if __name__ == "__main__":
    print(install())
