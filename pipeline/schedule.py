"""A scheduled deployment of the pipeline flow (cron), served from this machine.

    prefect server start --host 127.0.0.1                          # the UI: http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.schedule --cron "0 2 * * *"

``flow.serve`` creates the deployment ``robustkd-pipeline/<name>`` with its schedule, shows it in
the UI and runs each scheduled run in this process until it is stopped (Ctrl-C). On a GPU
machine, or to spread runs over machines, use a Prefect work pool instead (README).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .flow import robustkd_pipeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.add_argument("--preset", help="params/ preset applied before each run")
    p.add_argument("--methods", nargs="+", help="methods compared in each run")
    p.add_argument("--project-dir", default=".")
    args = p.parse_args(argv)
    parameters = {"project_dir": str(Path(args.project_dir).resolve()), "preset": args.preset,
                  "methods": args.methods, "register_model": True}
    # global_limit=1: runs of this deployment never overlap (they share one workspace and DVC's
    # locks); a run due while another is going waits for it.
    robustkd_pipeline.serve(name=args.name, cron=args.cron, parameters=parameters, global_limit=1)


if __name__ == "__main__":
    main()
