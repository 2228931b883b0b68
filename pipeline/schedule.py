"""A scheduled deployment of the pipeline flow (cron), shown in the Prefect UI.

    prefect server start --host 127.0.0.1                          # the UI: http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.schedule --cron "0 2 * * *"

Without ``--work-pool``, ``flow.serve`` creates the deployment ``robustkd-pipeline/<name>`` with
its schedule and runs each scheduled run in this process until it is stopped (Ctrl-C).

With ``--work-pool gpu`` the deployment goes to a Prefect work pool instead, and whichever
worker polls that pool runs it: start ``prefect worker start --pool gpu`` on a GPU machine
(with this project checked out, or ``--source`` a git URL) and the scheduled runs land there.
Runs of one deployment never overlap (concurrency limit 1): they share a workspace and DVC's locks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from .flow import MethodName, PresetName, robustkd_pipeline

ENTRYPOINT = "pipeline/flow.py:robustkd_pipeline"
DESCRIPTION = ("The robustkd pipeline (DVC stages: data, teacher, distillation, evaluation under attack, ONNX "
               "export, report), then the MLflow registry. Each run's result and artifacts link its MLflow parent "
               "run, under which every stage's run nests.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.add_argument("--preset", choices=get_args(PresetName), help="params/ preset applied before each run")
    p.add_argument("--methods", nargs="+", choices=get_args(MethodName), help="methods compared in each run")
    p.add_argument("--seed", type=int, help="run.seed of each run")
    p.add_argument("--project-dir", default=".", help="the workspace the runs use")
    p.add_argument("--work-pool", help="deploy to this work pool instead of serving from this process")
    p.add_argument("--source", help="with --work-pool: where workers get the code (git URL; default: project dir)")
    args = p.parse_args(argv)
    project = str(Path(args.project_dir).resolve())
    # Defaults of the deployment's parameters; the Prefect UI shows each with its description (from
    # the flow's docstring) and lets a custom run change them.
    parameters = {"project_dir": project, "preset": args.preset, "methods": args.methods, "seed": args.seed,
                  "register_model": True}
    if args.work_pool:
        flow = robustkd_pipeline.from_source(source=args.source or project, entrypoint=ENTRYPOINT)
        flow.deploy(name=args.name, work_pool_name=args.work_pool, cron=args.cron, parameters=parameters,
                    concurrency_limit=1, description=DESCRIPTION)
        print(f"deployment robustkd-pipeline/{args.name} -> work pool {args.work_pool!r} ({args.cron}); "
              f"start a worker: prefect worker start --pool {args.work_pool}")
        return
    # global_limit=1: runs of this deployment never overlap; a run due while another goes waits.
    robustkd_pipeline.serve(name=args.name, cron=args.cron, parameters=parameters, global_limit=1,
                            description=DESCRIPTION)


if __name__ == "__main__":
    main()
