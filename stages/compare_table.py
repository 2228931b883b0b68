"""Stage compare_table: the comparison of distillation methods on one teacher, in the slides'
format (natural / PGD-20 / CW / AA per method, plus the per-image worst case).

Each method is trained and evaluated once per seed of ``compare.seeds`` (compare/dvc.yaml). The
table gives each figure's mean and sample standard deviation over the seeds (with one seed, the
accuracy and its 95% Wilson interval), then every run with its Wilson intervals, then the exact
McNemar test of the AutoAttack outcomes for every pair of methods on the same images, per seed;
as reports/comparison.md and .json.
"""

from __future__ import annotations

from pathlib import Path

from services.common import METRICS, REPORTS, cli, parser, read_params, write_json
from services.tables import (PAIRED_HEADER, TABLE_COLUMNS, block_cell, block_percent, comparison_rows, headline_of, headline_words,
                             paired_lines, run_name, seed_cell)
from services.tables import seed_summary as summarize_seeds
from robustkd.methods import available_methods, get_method
from robustkd.utils import atomic_path


def load_rows(params, metrics_dir: Path) -> tuple[list[tuple[str, dict]], dict[str, Path]]:
    """(name, results) per evaluated run, the teacher first when evaluated, and each row's path.
    Runs are named ``<method>_seed<seed>``."""
    runs = [(run_name(m, s), metrics_dir / f"{run_name(m, s)}.json")
            for m in params.compare.methods for s in params.compare.seeds]
    for _, path in runs:
        if not path.is_file():
            raise SystemExit(f"error: {path} missing: run `dvc repro compare/dvc.yaml` first")
    return comparison_rows(METRICS / "evaluate" / "teacher.json", runs)


def seed_summary(params, rows: dict[str, dict]) -> dict[str, dict]:
    """{method: {"seeds": [...], attack: {"mean", "std", "values"}, "flagged": runs flagged}}."""
    return summarize_seeds({m: list(params.compare.seeds) for m in params.compare.methods}, rows)


def runs_of(summary: dict[str, dict], teacher: tuple[str, dict] | None) -> list[dict]:
    return ([teacher[1]] if teacher else []) + [r for e in summary.values() for r in e.get("_runs", [])]


def summary_text(params, summary: dict[str, dict], teacher: tuple[str, dict] | None) -> str:
    seeds = params.compare.seeds
    single = len(seeds) == 1
    lines = ["| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | seeds | checks |",
             "|" + "---|" * (len(TABLE_COLUMNS) + 3)]
    if teacher is not None:
        lines.append(f"| {teacher[0]} | " + " | ".join(block_cell(headline_of(teacher[1]), k) for k, _ in TABLE_COLUMNS)
                     + f" | - | {'FLAGGED' if teacher[1].get('flagged') else 'passed'} |")
    for method, entry in summary.items():
        if single:
            cells = [block_cell(headline_of(entry["_run"]), k) for k, _ in TABLE_COLUMNS]
        else:
            cells = [seed_cell(entry, k) for k, _ in TABLE_COLUMNS]
        checks = f"FLAGGED ({entry['flagged']} runs)" if entry["flagged"] else "passed"
        lines.append(f"| {display_name(method)} | " + " | ".join(cells)
                     + f" | {', '.join(map(str, seeds))} | {checks} |")
    how = ("accuracy (%) [95% Wilson interval]" if single else
           f"mean ± sample standard deviation over {len(seeds)} seeds of the accuracy (%); each run's "
           "95% Wilson interval below")
    return "\n".join(lines) + f"\n\n{how}; {images_words(runs_of(summary, teacher))}.\n"


def pairwise_autoattack(params, paths: dict[str, Path]) -> list[str]:
    """Exact McNemar p of the AutoAttack outcomes for every pair of methods, per seed."""
    methods = params.compare.methods
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    lines = []
    for a, b in pairs:
        for seed in params.compare.seeds:
            lines += [line for line in paired_lines(paths, [(run_name(a, seed), run_name(b, seed))])[2:]
                      if "| AA |" in line]
    if not lines:
        return []
    return PAIRED_HEADER + lines


def table_text(rows: list[tuple[str, dict]], paired: list[str]) -> str:
    lines = ["| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | checks |",
             "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name, m in rows:
        lines.append(f"| {display_name(name)} | " + " | ".join(block_cell(headline_of(m), k) for k, _ in TABLE_COLUMNS)
                     + f" | {'FLAGGED' if m.get('flagged') else 'passed'} |")
    last = rows[-1][1] if rows else {}
    subset = last.get("info", {}).get("subset", {})
    text = "\n".join(lines) + (f"\n\nAccuracy (%) [95% Wilson interval]; {images_words([m for _, m in rows])} "
                               f"(evaluated subset: {subset.get('description', '-')}, images sha256 "
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


def images_words(ms: list[dict]) -> str:
    """The caption's count: every column of every row on the same N images, or each row's own."""
    counts = sorted({b["images"] for m in ms if (b := headline_of(m))})
    if len(counts) == 1:
        return (f"every column on the same {counts[0]:,} test images ({headline_words(ms[0])}), "
                "the worst case per image over them")
    return "images per row: " + (", ".join(map(str, counts)) or "-") + " (rows on different images)"


def display_name(name: str) -> str:
    """A method's table name: reconstructions say so."""
    return get_method(name).label if name in available_methods() else name


def numeric_rows(rows: list[tuple[str, dict]]) -> dict:
    """{row: {attack: percent, "accuracy": {attack: counts and interval}, "flagged": 0/1}}."""
    out = {}
    for name, m in rows:
        block = headline_of(m) or {}
        out[name] = {**{k: p for k, _ in TABLE_COLUMNS if (p := block_percent(block, k)) is not None},
                     "images": block.get("images"), "accuracy": block.get("accuracy", {}),
                     "flagged": m.get("flagged", 0)}
    return out


def main(args) -> None:
    params = read_params(args)
    rows, paths = load_rows(params, Path(args.metrics_dir))
    by_name = dict(rows)
    summary = seed_summary(params, by_name)
    if len(params.compare.seeds) == 1:
        for method, entry in summary.items():
            entry["_run"] = by_name[run_name(method, params.compare.seeds[0])]
    teacher = rows[0] if rows and rows[0][0].startswith("Teacher") else None
    pairs = pairwise_autoattack(params, paths)
    text = ("## Methods over seeds\n\n" + summary_text(params, summary, teacher)
            + "\n## Every run\n\n" + table_text(rows, []))
    if pairs:
        text += ("\n## Paired tests\n\nExact McNemar tests of the AutoAttack outcomes, every pair of methods, "
                 "per seed (the same images):\n\n" + "\n".join(pairs) + "\n")
    with atomic_path(REPORTS / "comparison.md") as tmp:
        tmp.write_text(text)
    write_json({"runs": numeric_rows(rows),
                "methods": {m: {k: v for k, v in e.items() if k not in ("_run", "_runs")} for m, e in summary.items()},
                "seeds": list(params.compare.seeds)}, REPORTS / "comparison.json")
    args.tracker.log_artifact(REPORTS / "comparison.md")
    args.tracker.log_artifact(REPORTS / "comparison.json")
    args.tracker.log_metrics({name: {k: block_percent(headline_of(m), k) for k, _ in TABLE_COLUMNS}
                              for name, m in rows})
    args.tracker.log_metrics({f"{m}_mean": {k: e[k]["mean"] for k, _ in TABLE_COLUMNS if k in e}
                              for m, e in summary.items()})
    print(text)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--metrics-dir", default=str(METRICS / "compare"))
    return p


run = cli(main, build_parser, "compare_table", ("compare", "evaluate"),
          config=METRICS / "comparison_config.json")

if __name__ == "__main__":
    run()
