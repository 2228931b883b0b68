"""Stage ablation table: the slides' two DARWIN ablation tables (ablation/dvc.yaml).

"Impact of each module" (ARKD; ARKD + IAKD; ARKD + DBKD; all three) and "Diverse weighting
strategies" (uniform; gamma = 0; gamma = 1; gamma = 0.5), with the slides' columns Natural, PGD-20
and AA. Each variant (robustkd.methods.darwin.ABLATIONS) is trained and evaluated once per seed of
``ablation.seeds``: with one seed a cell is the accuracy (%) with its 95% Wilson interval, with
several the mean and sample standard deviation over seeds. Each row is also tested against the
full method (all modules, gamma 0.5) on the same images: the exact McNemar p of the AutoAttack
outcomes, per seed. Written to reports/ablation.md and .json and logged to the stage's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from services.common import METRICS, REPORTS, cli, parser, read_params, write_json
from services.results import read_per_image
from services.tables import (block_cell, block_percent, headline_of, headline_words, read_with_blocks,
                             same_image_rows, same_images)
from robustkd.errors import InputError
from robustkd.methods.darwin import ABLATIONS
from robustkd.stats import discordant_pairs, mcnemar_exact_counts, mean_std
from robustkd.utils import atomic_path

# The slides' columns.
COLUMNS = [("natural", "Natural"), ("pgd20", "PGD-20"), ("autoattack", "AA")]
FULL = "full"
TITLES = {"modules": "Impact of each module", "weighting": "Diverse weighting strategies"}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def load_runs(params, metrics_dir: Path) -> dict[str, dict]:
    runs = {}
    for variant in params.ablation.variants:
        for seed in params.ablation.seeds:
            path = metrics_dir / f"{run_name(variant, seed)}.json"
            results = read_with_blocks(path)
            if results is None:
                raise InputError(f"{path} missing: run `dvc repro ablation/dvc.yaml` first")
            results["_path"] = path
            runs[run_name(variant, seed)] = results
    # every row's headline block on the same images (AutoAttack's subset)
    same_image_rows(list(runs.items()), {name: r["_path"] for name, r in runs.items()})
    return runs


def cells(params, runs: dict[str, dict], variant: str) -> tuple[list[str], dict]:
    """The row's cells and its numbers ({attack: {"mean", "std", "values"}})."""
    seeds = params.ablation.seeds
    chosen = [runs[run_name(variant, s)] for s in seeds]
    numbers, out = {}, []
    for key, _ in COLUMNS:
        values = [v for r in chosen if (v := block_percent(headline_of(r), key)) is not None]
        if len(values) != len(chosen):
            out.append("-")
            continue
        mean, std = mean_std(values)
        numbers[key] = {"mean": round(mean, 2), "std": round(std, 2), "values": values}
        out.append(block_cell(headline_of(chosen[0]), key) if len(seeds) == 1 else f"{mean:.2f} ± {std:.2f}")
    return out, numbers


def mcnemar_vs_full(params, runs: dict[str, dict], variant: str) -> str:
    """Exact McNemar p of the AutoAttack outcomes against the full method, per seed ("-" if n/a)."""
    if variant == FULL or FULL not in params.ablation.variants:
        return "-"
    ps = []
    for seed in params.ablation.seeds:
        a = read_per_image(runs[run_name(variant, seed)]["_path"])
        b = read_per_image(runs[run_name(FULL, seed)]["_path"])
        if a is None or b is None or "autoattack" not in a or "autoattack" not in b \
                or not same_images(a, b, "autoattack"):
            return "-"
        only_a, only_b = discordant_pairs(a["autoattack"].tolist(), b["autoattack"].tolist())
        ps.append(f"{mcnemar_exact_counts(only_a, only_b):.3g} ({only_a}/{only_b})")
    return ", ".join(ps)


def tables(params, runs: dict[str, dict]) -> tuple[str, dict]:
    text: list[str] = []
    numbers: dict[str, dict] = {}
    flagged = lambda v: any(runs[run_name(v, s)].get("flagged") for s in params.ablation.seeds)  # noqa: E731
    for table in ("modules", "weighting"):
        rows = [v for v in params.ablation.variants if table in ABLATIONS[v].tables]
        if not rows:
            continue
        head = ["ARKD", "IAKD", "DBKD"] if table == "modules" else ["weighting"]
        lines = ["| " + " | ".join(head + [label for _, label in COLUMNS]) + " | AA vs full: McNemar p | checks |",
                 "|" + "---|" * (len(head) + len(COLUMNS) + 2)]
        for v in rows:
            ab = ABLATIONS[v]
            first = ["✓" if on else "" for on in ab.modules] if table == "modules" else [ab.label]
            row_cells, nums = cells(params, runs, v)
            numbers.setdefault(v, {**nums, "settings": ab.settings, "tables": list(ab.tables)})
            lines.append("| " + " | ".join(first + row_cells + [mcnemar_vs_full(params, runs, v),
                                                                 "FLAGGED" if flagged(v) else "passed"]) + " |")
        text.append(f"## {TITLES[table]}\n\n" + "\n".join(lines) + "\n")
    seeds = params.ablation.seeds
    some = next(iter(runs.values()))
    subset = some.get("info", {}).get("subset", {})
    how = ("accuracy (%) [95% Wilson interval]" if len(seeds) == 1 else
           f"mean ± sample standard deviation over {len(seeds)} seeds of the accuracy (%)")
    counts = sorted({b["images"] for r in runs.values() if (b := headline_of(r))})
    on = (f"every column on the same {counts[0]:,} test images ({headline_words(some)})" if len(counts) == 1
          else "images per row: " + (", ".join(map(str, counts)) or "-"))
    text.append(f"Cells: {how}, seeds {', '.join(map(str, seeds))}; {on} (evaluated subset: "
                f"{subset.get('description', '-')}, images sha256 {str(subset.get('images_sha256', '-'))[:16]}). "
                "Each row is DARWIN with the variant's modules and weighting (robustkd/methods/darwin.py "
                "ABLATIONS); the McNemar column compares its AutoAttack outcomes with the full method's "
                "(all three modules, gamma = 0.5) on the same images, per seed (right only for the row / "
                "only for full).\n")
    optimiser = some.get("info", {}).get("optimiser")
    if optimiser:
        text.append(f"Optimiser: {optimiser}.\n")
    return "\n".join(text), numbers


def main(args) -> None:
    params = read_params(args)
    runs = load_runs(params, Path(args.metrics_dir))
    text, numbers = tables(params, runs)
    with atomic_path(REPORTS / "ablation.md") as tmp:
        tmp.write_text(text)
    write_json({"variants": numbers, "seeds": list(params.ablation.seeds)}, REPORTS / "ablation.json")
    args.tracker.log_artifact(REPORTS / "ablation.md")
    args.tracker.log_artifact(REPORTS / "ablation.json")
    args.tracker.log_metrics({v: {k: e[k]["mean"] for k, _ in COLUMNS if k in e} for v, e in numbers.items()})
    print(text)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--metrics-dir", default=str(METRICS / "ablation"))
    return p


run = cli(main, build_parser, "ablation_table", ("ablation", "distill", "evaluate"),
          config=METRICS / "ablation_config.json")

if __name__ == "__main__":
    run()
