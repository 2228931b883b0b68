"""Stage compare_table: the comparison of distillation methods on one teacher, in the slides'
format (natural / PGD-20 / CW / AA per method, plus the per-image worst case), each accuracy with
its 95% Wilson interval, and exact McNemar tests of each method against the first one on the
same images; as reports/comparison.md and .json."""

from __future__ import annotations

from pathlib import Path

from services.common import METRICS, REPORTS, cli, parser, read_params, write_json
from services.results import read_evaluation
from services.tables import TABLE_COLUMNS, accuracy_cell, paired_lines
from robustkd.methods import available_methods, get_method
from robustkd.utils import atomic_path


def load_rows(params, metrics_dir: Path) -> tuple[list[tuple[str, dict]], dict[str, Path]]:
    """(name, results) per row, the teacher first when evaluated, and each row's results path."""
    rows, paths = [], {}
    teacher = METRICS / "evaluate" / "teacher.json"
    teacher_metrics = read_evaluation(teacher)
    if teacher_metrics is not None:
        name = f"Teacher {teacher_metrics['info'].get('arch')}"
        rows.append((name, teacher_metrics))
        paths[name] = teacher
    for method in params.compare.methods:
        path = metrics_dir / f"{method}.json"
        results = read_evaluation(path)
        if results is None:
            raise SystemExit(f"error: {path} missing: run `dvc repro compare/dvc.yaml` first")
        rows.append((method, results))
        paths[method] = path
    return rows, paths


def table_text(rows: list[tuple[str, dict]], paired: list[str]) -> str:
    lines = ["| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | checks |",
             "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name, m in rows:
        lines.append(f"| {display_name(name)} | " + " | ".join(accuracy_cell(m, k) for k, _ in TABLE_COLUMNS)
                     + f" | {'FLAGGED' if m.get('flagged') else 'passed'} |")
    last = rows[-1][1] if rows else {}
    subset = last.get("info", {}).get("subset", {})
    text = "\n".join(lines) + (f"\n\nAccuracy (%) [95% Wilson interval] on {last.get('num_images', 0)} test images "
                               f"({subset.get('description', '-')}, images sha256 "
                               f"{str(subset.get('images_sha256', '-'))[:16]}).\n")
    trained = [f"- {display_name(name)}: {m['info']['optimiser']}" for name, m in rows
               if m.get("info", {}).get("optimiser")]
    if trained:
        text += "\nHow each method's learning rate and schedule were set:\n\n" + "\n".join(trained) + "\n"
    if any(display_name(name) != name for name, _ in rows):
        text += ("\n(reconstruction): no official code exists; rebuilt from the published equations "
                 "(docs/methods.md).\n")
    if paired:
        text += "\nExact McNemar tests on the same images:\n\n" + "\n".join(paired) + "\n"
    return text


def display_name(name: str) -> str:
    """A method's table name: reconstructions say so."""
    return get_method(name).label if name in available_methods() else name


def numeric_rows(rows: list[tuple[str, dict]]) -> dict:
    """{row: {attack: percent, "accuracy": {attack: counts and interval}, "flagged": 0/1}}."""
    return {name: {**{k: m.get(k) for k, _ in TABLE_COLUMNS if m.get(k) is not None},
                   "accuracy": m.get("accuracy", {}), "flagged": m.get("flagged", 0)}
            for name, m in rows}


def main(args) -> None:
    params = read_params(args)
    rows, paths = load_rows(params, Path(args.metrics_dir))
    methods = [name for name, _ in rows if name in params.compare.methods]
    paired = paired_lines(paths, [(m, methods[0]) for m in methods[1:]]) if methods else []
    text = table_text(rows, paired)
    with atomic_path(REPORTS / "comparison.md") as tmp:
        tmp.write_text(text)
    write_json(numeric_rows(rows), REPORTS / "comparison.json")
    args.tracker.log_artifact(REPORTS / "comparison.md")
    args.tracker.log_artifact(REPORTS / "comparison.json")
    args.tracker.log_metrics({name: {k: m.get(k) for k, _ in TABLE_COLUMNS} for name, m in rows})
    print(text)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--metrics-dir", default=str(METRICS / "compare"))
    return p


run = cli(main, build_parser, "compare_table", ("compare", "evaluate"))

if __name__ == "__main__":
    run()
