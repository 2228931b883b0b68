"""The end of ``make run``: one compact table of the evaluation and where to look next.

    python -m services.summary [--root .] [--mlflow-port 5000]

Rows: teacher, student, the non-adversarial reference (and student_best when
``evaluate.best_checkpoints`` wrote it); columns: natural, PGD-20, CW, AutoAttack and the per-image
worst case, each with its 95% Wilson interval, all on the same images (the headline blocks of
services/tables.py, the report's first table), the image count and the checks' verdict. Then the
report, the MLflow UI and the DVC plots. No line is wider than ``WIDTH`` characters (a terminal's
width; issue 28: the run used to end with ``dvc metrics show`` lines of 3,359 characters).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .tables import HEADLINE, LARGER_SET, TABLE_COLUMNS, headline_words, read_with_blocks, same_image_rows

MODELS = ("teacher", "student", "reference", "student_best")
EVALUATED = Path("metrics/evaluate")
WIDTH = 120
GAP = "  "


def short(percent: float) -> str:
    """One decimal; 100 without it (the widest figure, so a cell stays within 16 characters)."""
    return "100" if percent >= 100 else f"{percent:.1f}"


def interval_cell(block: dict | None, key: str, intervals: bool = True) -> str:
    """"43.0 [33.7-52.8]": the accuracy (%) and its 95% Wilson interval, one decimal ("-": not run)."""
    rec = ((block or {}).get("accuracy") or {}).get(key)
    if not rec:
        return "-"
    return (f"{short(rec['percent'])} [{short(rec['ci95_low'])}-{short(rec['ci95_high'])}]" if intervals
            else short(rec["percent"]))


def evaluated_rows(root: Path) -> list[tuple[str, dict]]:
    """(model, results with the headline block) for each evaluated model, every row's headline on
    the first row's images (services/tables.py same_image_rows)."""
    paths = {name: root / EVALUATED / f"{name}.json" for name in MODELS}
    read = [(name, read_with_blocks(path)) for name, path in paths.items()]
    return same_image_rows([(name, m) for name, m in read if m is not None], paths)


def aligned(rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Columns padded to their widest cell; the columns in ``right`` right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [GAP.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def table(rows: list[tuple[str, dict]], intervals: bool) -> list[str]:
    head = ["model"] + [label for _, label in TABLE_COLUMNS] + ["images", "checks"]
    body = [[name] + [interval_cell(m.get(HEADLINE), k, intervals) for k, _ in TABLE_COLUMNS]
            + [f"{(m.get(HEADLINE) or {}).get('images', '-')}", "FLAGGED" if m.get("flagged") else "passed"]
            for name, m in rows]
    return aligned([head] + body, right=frozenset(range(1, len(head) - 1)))


def accuracy_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """The caption, the table (one row per model) and a line per flagged model. Intervals are left
    out only if they would push the table past ``WIDTH`` (the report has them)."""
    lines = table(rows, intervals=True)
    intervals = max(map(len, lines)) <= WIDTH
    lines = lines if intervals else table(rows, intervals=False)
    counts = sorted({(m.get(HEADLINE) or {}).get("images") for _, m in rows}, key=str)
    eps = ((rows[0][1].get("info") or {}).get("threat_model") or {}).get("eps_255")
    on = (f"on the same {counts[0]} test images ({headline_words(rows[0][1])})" if len(counts) == 1
          else "on the images counted in each row")
    caption = (f"Accuracy (%) {'[95% Wilson interval] ' if intervals else ''}{on}"
               + (f", L-inf eps {eps:g}/255" if isinstance(eps, (int, float)) else "")
               + "; the worst case is per image, right under every attack of its row.")
    flagged = [f"{name}: FLAGGED, {m.get('checks_failed') or len((m.get('info') or {}).get('failed_checks') or [])} "
               "check(s) failed (the reasons: the report's \"Evaluation checks\")"
               for name, m in rows if m.get("flagged")]
    larger = sorted({m[LARGER_SET]["images"] for _, m in rows if m.get(LARGER_SET)})
    more = ([f"The cheaper attacks on all {larger[-1]:,} evaluated images: the report's \"Cheaper attacks on the "
             "larger set\"."] if larger else [])
    return (textwrap.wrap(caption, WIDTH) + [""] + lines + [textwrap.shorten(f, WIDTH) for f in flagged]
            + ([""] + [textwrap.shorten(m, WIDTH) for m in more] if more else []))


def next_steps(root: Path, mlflow_port: int) -> list[str]:
    """Where to look next: the report, MLflow (the server of MLFLOW_TRACKING_URI when it is one,
    else `make mlflow-ui` on the project's store) and the DVC plots."""
    from .tracking import experiments_url, tracking_uri

    uri = tracking_uri(root)
    mlflow = (("MLflow", f"runs and registry: {experiments_url(uri)}") if uri.startswith(("http://", "https://"))
              else (f"make mlflow-ui MLFLOW_PORT={mlflow_port}" if mlflow_port != 5000 else "make mlflow-ui",
                    f"MLflow runs and registry: {experiments_url(f'http://127.0.0.1:{mlflow_port}')}"))
    steps = [("reports/report.html", "the report: every table, the checks, training curves (opens offline)"),
             mlflow, ("make plots", "DVC plots, offline: dvc_plots/index.html")]
    return ["Where to look next:"] + [line[:WIDTH] for line in aligned([["  " + what, how] for what, how in steps])]


def summary_lines(root: Path, mlflow_port: int = 5000) -> list[str]:
    rows = evaluated_rows(root)
    if not rows:
        raise FileNotFoundError(f"{root / EVALUATED}: no evaluation results (teacher/student/reference .json); "
                                "run the pipeline first (make run)")
    return accuracy_lines(rows) + [""] + next_steps(root, mlflow_port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="project directory (default: .)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="the port of `make mlflow-ui` (MLFLOW_PORT)")
    args = p.parse_args(argv)
    try:
        print("\n".join(summary_lines(Path(args.root).resolve(), args.mlflow_port)))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
