"""DVC plots rendered offline: ``dvc plots show`` / ``dvc plots diff`` with an HTML template that
carries vega, vega-lite and vega-embed inline (pipeline/vega/, from the npm registry, licenses beside
them), so the page draws its charts without a network.

    python -m pipeline.plots                      # dvc plots show  -> dvc_plots/index.html (make plots)
    python -m pipeline.plots diff HEAD~1          # dvc plots diff HEAD~1 (workspace against a commit)
    python -m pipeline.plots diff exp-a exp-b     # two experiments (dvc exp show lists their names)

DVC's default page loads these scripts from a CDN (dvc-render's ``VegaRenderer.SCRIPTS``). A custom
page is given with ``--html-template``; it must contain ``{plot_divs}``, and ``{scripts}`` is where
DVC would insert the CDN scripts, so the template leaves it out
(https://dvc.org/doc/command-reference/plots/show#options). The plots themselves are declared in
dvc.yaml (top-level ``plots:``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

VEGA = Path(__file__).resolve().parent / "vega"
# Versions of the scripts DVC's own page loads (dvc-render), kept identical here.
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>{title}</title>
<!-- vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2 (BSD-3-Clause; texts in pipeline/vega/LICENSE-*) -->
{scripts_inline}
<style>
body {{ font-family: sans-serif; margin: 16px; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
<h1>{title}</h1>
{{plot_divs}}
</body>
</html>
"""


def offline_template(path: Path, title: str = "robustkd: DVC plots") -> Path:
    """Write the HTML template (scripts inline, DVC's ``{plot_divs}`` placeholder) to ``path``."""
    inline = "\n".join(f"<script>\n{(VEGA / name).read_text(encoding='utf-8')}\n</script>" for name in SCRIPTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.format(title=title, scripts_inline=inline), encoding="utf-8")
    return path


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def render(root: Path, command: str = "show", args: list[str] | None = None, out: str = "dvc_plots") -> Path:
    """``dvc plots <command> <args>`` in ``root`` with the offline template; the page's path."""
    template = offline_template(root / ".dvc" / "tmp" / "plots-offline.html")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc_executable(), "plots", command, *(args or []), "--html-template", str(template),
                    "-o", out], cwd=root, env=env, check=True)
    return (root / out / "index.html").resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="show", choices=["show", "diff"])
    p.add_argument("revisions", nargs="*", help="diff: revisions or experiment names (default: workspace vs HEAD)")
    p.add_argument("-o", "--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    p.add_argument("--project-dir", default=".")
    args = p.parse_args(argv)
    try:
        page = render(Path(args.project_dir).resolve(), args.command, args.revisions, args.out)
    except subprocess.CalledProcessError as exc:
        print(f"error: dvc plots {args.command} failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    print(f"offline plots: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
