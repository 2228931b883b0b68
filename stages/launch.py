"""Run a stage in one process, or under torchrun when ``run.nproc_per_node`` (or ``run.nnodes``)
is above 1. dvc.yaml calls the distributed stages through it:

    python -m stages.launch distill --method rslad --out-dir models/compare/rslad

- one process: the stage runs here, as ``python -m stages.<stage>`` would;
- one machine, N processes: ``torchrun --standalone --nproc_per_node=N -m stages.<stage> ...``;
- several machines: ``torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d
  --rdzv-endpoint=<run.rdzv_endpoint> --rdzv-id=<run.rdzv_id> -m stages.<stage> ...``, started on
  every machine (same params.yaml, shared file system for data/ and models/).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from services.params import load_params

DISTRIBUTED_STAGES = ("train_teacher", "distill", "evaluate")


def torchrun_command(stage: str, stage_args: list[str], run) -> list[str]:
    local = Path(sys.executable).parent / "torchrun"
    found = shutil.which("torchrun")
    exe = [str(local)] if local.exists() else ([found] if found else [sys.executable, "-m", "torch.distributed.run"])
    cmd = exe + [f"--nproc_per_node={run.nproc_per_node}"]
    if run.nnodes > 1:
        cmd += [f"--nnodes={run.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={run.rdzv_endpoint}",
                f"--rdzv-id={run.rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", f"stages.{stage}", *stage_args]


def params_path(stage_args: list[str]) -> str:
    for i, a in enumerate(stage_args):
        if a == "--params" and i + 1 < len(stage_args):
            return stage_args[i + 1]
        if a.startswith("--params="):
            return a.split("=", 1)[1]
    return "params.yaml"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in DISTRIBUTED_STAGES:
        print(f"usage: python -m stages.launch {{{','.join(DISTRIBUTED_STAGES)}}} [stage arguments]",
              file=sys.stderr)
        raise SystemExit(2)
    stage, stage_args = argv[0], argv[1:]
    try:
        run = load_params(params_path(stage_args)).run
    except Exception as exc:  # noqa: BLE001 - the stage itself reports bad params the same way
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if run.nproc_per_node * run.nnodes == 1 or "WORLD_SIZE" in os.environ:
        importlib.import_module(f"stages.{stage}").run(stage_args)
        return
    cmd = torchrun_command(stage, stage_args, run)
    print("launching: " + " ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
