"""Stage compare_table: the comparison of distillation methods on one teacher, in the slides'
format (natural / PGD-20 / CW / AA per method), as reports/comparison.md and .json."""

from __future__ import annotations

import json
from pathlib import Path

from .common import METRICS, REPORTS, cli, parser, read_params, write_json
from .report import ATTACK_COLUMNS
from robustkd.utils import atomic_path


def main(args) -> None:
    params = read_params(args)
    rows = []
    teacher = METRICS / "evaluate" / "teacher.json"
    if teacher.exists():
        teacher_metrics = json.loads(teacher.read_text())
        rows.append((f"Teacher {teacher_metrics['arch']}", teacher_metrics))
    for method in params.compare.methods:
        path = Path(args.metrics_dir) / f"{method}.json"
        if not path.exists():
            raise SystemExit(f"error: {path} missing: run `dvc repro compare/dvc.yaml` first")
        rows.append((method, json.loads(path.read_text())))
    lines = ["| method | " + " | ".join(l for _, l in ATTACK_COLUMNS) + " |", "|" + "---|" * (len(ATTACK_COLUMNS) + 1)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-"
                                                  for k, _ in ATTACK_COLUMNS) + " |")
    n = rows[-1][1].get("num_images") if rows else 0
    text = "\n".join(lines) + f"\n\nAccuracy (%) on {n} test images ({rows[-1][1].get('subset') if rows else '-'}).\n"
    with atomic_path(REPORTS / "comparison.md") as tmp:
        tmp.write_text(text)
    write_json({name: {k: m.get(k) for k, _ in ATTACK_COLUMNS} for name, m in rows}, REPORTS / "comparison.json")
    args.tracker.log_artifact(REPORTS / "comparison.md")
    args.tracker.log_artifact(REPORTS / "comparison.json")
    args.tracker.log_metrics({name: {k: m.get(k) for k, _ in ATTACK_COLUMNS} for name, m in rows})
    print(text)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--metrics-dir", default=str(METRICS / "compare"))
    return p


run = cli(main, build_parser, "compare_table", ("compare", "evaluate"))

if __name__ == "__main__":
    run()
