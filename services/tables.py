"""Accuracy tables shared by the report, the comparison table and the registry: columns, cells
with 95% intervals, the protocol checks' lines, exact McNemar lines and Markdown to HTML tables."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from robustkd.stats import discordant_pairs, mcnemar_exact_counts

from .results import read_per_image

ATTACK_COLUMNS = [("natural", "Natural"), ("pgd20", "PGD-20"), ("cw", "CW"), ("autoattack", "AA")]
# the tables also show the per-image worst case over the evaluated attacks
TABLE_COLUMNS = ATTACK_COLUMNS + [("worst_case", "Worst case")]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def accuracy_cell(m: dict, key: str) -> str:
    """"52.26 [42.4, 61.9]": the percentage and its 95% Wilson interval ("-" if not evaluated)."""
    rec = (m.get("accuracy") or {}).get(key)
    if rec:
        return f"{rec['percent']:.2f} [{rec['ci95_low']:.1f}, {rec['ci95_high']:.1f}]"
    return f"{m[key]:.2f}" if isinstance(m.get(key), (int, float)) else "-"


def checks_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """One line per evaluated model: its checks passed, or which failed and why."""
    lines = []
    for name, m in rows:
        info = m.get("info", {})
        failed = info.get("failed_checks", [])
        if not failed:
            lines.append(f"- {name}: all {len(info.get('checks', {}))} checks passed")
            continue
        lines.append(f"- {name}: FLAGGED, {len(failed)} check(s) failed")
        lines += [f"  - {c}: {info['checks'][c]['detail']}" for c in failed]
    return lines


PAIRED_HEADER = ["| pair | attack | images | right only for the first | right only for the second | exact McNemar p |",
                 "|---|---|---|---|---|---|"]


def paired_lines(paths: dict[str, Path], pairs: list[tuple[str, str]]) -> list[str]:
    """Exact McNemar tests between models evaluated on the same images, per common attack, with
    the number of those images (AutoAttack's subset is smaller than the natural and PGD-20 set)."""
    lines = []
    for a, b in pairs:
        pa, pb = (read_per_image(paths[n]) if n in paths else None for n in (a, b))
        if pa is None or pb is None:
            continue
        for key, label in TABLE_COLUMNS:
            if (test := paired_test(pa, pb, key)) is not None:
                only_a, only_b, p = test
                lines.append(f"| {a} vs {b} | {label} | {len(images_of(pa, key))} | {only_a} | {only_b} | {p:.3g} |")
    if not lines:
        return []
    return PAIRED_HEADER + lines


def paired_test(pa: dict[str, np.ndarray], pb: dict[str, np.ndarray], key: str) -> tuple[int, int, float] | None:
    """(images right only for a, right only for b, exact McNemar p) of attack ``key`` when both
    ran it on the same images in the same order; None otherwise (no test across image sets)."""
    if key not in pa or key not in pb or not same_images(pa, pb, key):
        return None
    only_a, only_b = discordant_pairs(pa[key], pb[key])
    return only_a, only_b, mcnemar_exact_counts(only_a, only_b)


def images_of(per_image: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Test-set indices of the outcomes ``key`` describes (an attack on a subset has its own)."""
    return per_image.get(f"{key}_index", per_image["index"])


def same_images(pa: dict[str, np.ndarray], pb: dict[str, np.ndarray], key: str) -> bool:
    """Paired tests need the same images in the same order."""
    return np.array_equal(images_of(pa, key), images_of(pb, key))


def markdown_to_html_table(md: str) -> str:
    """Each block of Markdown table lines as an HTML table; any other line as a paragraph."""
    out: list[str] = []
    row = 0
    for line in md.strip().splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if row:
                out.append("</table>")
            row = 0
            if line:
                out.append(f"<p>{html.escape(line)}</p>")
            continue
        if row == 0:
            out.append("<table>")
        row += 1
        if row == 2 and set(line) <= set("|-: "):
            continue
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        tag = "th" if row == 1 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    if row:
        out.append("</table>")
    return "\n".join(out)


# ---------------------------------------------------------------- one set of images per table
# The headline block: every column on the SAME images (the smallest set an attack ran on: today
# AutoAttack's stratified subset), the worst case the per-image AND over exactly those columns.
# The larger set: the cheaper attacks on every evaluated image, a table of its own, never mixed in.
HEADLINE, LARGER_SET = "headline", "larger_set"
WORST = "worst_case"


def headline_images(per_image: dict[str, np.ndarray]) -> np.ndarray:
    """Test-set indices of the headline images: the images every evaluated attack saw (an attack
    on a subset has ``<attack>_index``; without one, every evaluated image)."""
    subsets = [per_image[f"{k}_index"] for k, _ in ATTACK_COLUMNS if f"{k}_index" in per_image]
    common = per_image["index"]
    for idx in subsets:
        common = common[np.isin(common, idx)]
    return np.asarray(common, dtype=np.int64)


def outcome_on(per_image: dict[str, np.ndarray], key: str, images: np.ndarray) -> np.ndarray | None:
    """1/0 outcomes of ``key`` on the test-set indices ``images`` (in that order), None if ``key``
    did not run on every one of them."""
    if key not in per_image:
        return None
    own = images_of(per_image, key)
    where = {int(i): p for p, i in enumerate(own)}
    if any(int(i) not in where for i in images):
        return None
    return per_image[key][[where[int(i)] for i in images]].astype(bool)


def _block(per_image: dict[str, np.ndarray], images: np.ndarray, keys: list[str]) -> dict:
    """{"images": n, "accuracy": {column: count, total, percent, interval}}: numbers only (the
    blocks go into the DVC metrics file); the worst case over exactly these columns."""
    from robustkd.stats import accuracy_record

    outcomes = {k: o for k in keys if (o := outcome_on(per_image, k, images)) is not None}
    n = int(len(images))
    block: dict = {"images": n, "accuracy": {k: accuracy_record(int(o.sum()), n) for k, o in outcomes.items()}}
    if any(k != "natural" for k in outcomes):
        worst = np.ones(n, dtype=bool)
        for o in outcomes.values():   # natural included: wrong without attack, wrong under attack
            worst &= o
        block["accuracy"][WORST] = accuracy_record(int(worst.sum()), n)
    return block


def headline(metrics: dict | None, per_image: dict[str, np.ndarray] | None,
             images: np.ndarray | None = None) -> dict | None:
    """Natural, PGD-20, CW and AutoAttack accuracy on the same images, each with its count and 95%
    Wilson interval, and the worst case (right under every one of them, per image): never above
    any column. ``images``: test-set indices to use (default: ``headline_images``, the images
    every attack saw); a column that did not run on all of them is left out. None without
    per-image outcomes (nothing can be put on the same images)."""
    if per_image is None:
        return None
    images = headline_images(per_image) if images is None else np.asarray(images, dtype=np.int64)
    return _block(per_image, images, [k for k, _ in ATTACK_COLUMNS])


def larger_set(metrics: dict | None, per_image: dict[str, np.ndarray] | None) -> dict | None:
    """The cheaper attacks (those that ran on every evaluated image) on every evaluated image,
    with the worst case over them; None when there is no larger set than the headline's."""
    if per_image is None:
        return None
    everything = np.asarray(per_image["index"], dtype=np.int64)
    if len(headline_images(per_image)) == len(everything):
        return None
    keys = [k for k, _ in ATTACK_COLUMNS if k in per_image and f"{k}_index" not in per_image]
    return _block(per_image, everything, keys)


def headline_words(m: dict) -> str:
    """Which images the headline block is on, in words (from the info file's subsets)."""
    info = m.get("info") or {}
    block = m.get(HEADLINE) or {}
    subset = info.get("subset") or {}
    aa = (info.get("attack_subsets") or {}).get("autoattack") or {}
    if aa and block.get("images") == aa.get("num_images"):
        return f"the images AutoAttack ran on: {aa.get('description', '-')} of the evaluated subset"
    return subset.get("description", "the evaluated images")


def larger_words(m: dict) -> str:
    return ((m.get("info") or {}).get("subset") or {}).get("description", "every evaluated image")


def table_blocks(metrics: dict | None, per_image: dict[str, np.ndarray] | None) -> dict:
    """{"headline": ..., "larger_set": ...} for a metrics file (the evaluate stage writes both)."""
    return {HEADLINE: headline(metrics, per_image), LARGER_SET: larger_set(metrics, per_image)}


def read_with_blocks(path: Path) -> dict | None:
    """``read_evaluation`` with the two blocks, computed from the per-image outcomes when the
    file predates them."""
    from .results import read_evaluation

    m = read_evaluation(path)
    if m is None:
        return None
    if HEADLINE not in m or LARGER_SET not in m:
        m.update(table_blocks(m, read_per_image(path)))
    return m


def block_cell(block: dict | None, key: str) -> str:
    """"44.00 [34.7, 53.8]": a block's accuracy and its 95% Wilson interval ("-" if absent)."""
    rec = ((block or {}).get("accuracy") or {}).get(key)
    return f"{rec['percent']:.2f} [{rec['ci95_low']:.1f}, {rec['ci95_high']:.1f}]" if rec else "-"


def block_percent(block: dict | None, key: str) -> float | None:
    rec = ((block or {}).get("accuracy") or {}).get(key)
    return rec["percent"] if rec else None


def larger_label(label: str, n: int) -> str:
    """"PGD-20 on 1,000": a column of the larger set says its count."""
    return f"{label} on {n:,}"


def same_image_rows(evals: list[tuple[str, dict]], paths: dict[str, Path]) -> list[tuple[str, dict]]:
    """Each row's headline block on the first row's headline images (e.g. the teacher's and the
    student's AutoAttack subset; a model attacked more cheaply, such as the reference student,
    on those same images, its own images going to its larger-set block), so that a table of
    headline blocks is on one set of images. ``paths``: each row's metrics file."""
    common = None
    for name, m in evals:
        per_image = read_per_image(paths[name]) if name in paths else None
        if per_image is not None and common is None:
            common = headline_images(per_image)
        if per_image is not None and common is not None:
            block = headline(m, per_image, common)
            if not (block and block["accuracy"]):   # its images are not those: it keeps its own
                continue
            if len(common) < len(per_image["index"]) and not m.get(LARGER_SET):
                m[LARGER_SET] = headline(m, per_image)   # all its attacks ran on all its images
            m[HEADLINE] = block
    return evals


def headline_of(m: dict) -> dict | None:
    """A results dict's headline block; for results without one (and without per-image outcomes
    to compute it), its accuracy records when they all have one total, else None: columns of
    different counts are never put side by side."""
    if m.get(HEADLINE):
        return m[HEADLINE]
    records = m.get("accuracy") or {}
    totals = {r["total"] for r in records.values()}
    return {"images": totals.pop(), "accuracy": records} if len(totals) == 1 else None


# ---------------------------------------------------------------- the deployed file attacked
def onnx_block_reason(attacked: dict | None) -> str:
    """Why the ONNX file is less robust than its PyTorch student ("" when it is not, or when the
    figures are missing): its Square accuracy (metrics/export.json ``onnx_square_accuracy``) below
    the lower end of the 95% Wilson interval of the PyTorch PGD-20 accuracy on the same images
    (``torch_pgd20_accuracy``). [choice] PGD-20 rather than AutoAttack: the export stage computes it
    on the exported checkpoint and exactly the attacked images; a white-box gradient attack is the
    stronger one on a model without gradient masking (the evaluation checks it), so Square on the
    same function should not do worse than PGD-20 beyond sampling noise, unless the file is another
    function than the student."""
    if not attacked:
        return ""
    square, pgd = attacked.get("onnx_square_accuracy"), attacked.get("torch_pgd20_accuracy")
    if not square or not pgd or float(square["percent"]) >= float(pgd["ci95_low"]):
        return ""
    return (f"ONNX Square accuracy {float(square['percent']):.2f}% ({square['correct']}/{square['total']}, "
            f"{int(attacked.get('square_queries', 0))} queries) below the PyTorch PGD-20 interval "
            f"[{float(pgd['ci95_low']):.1f}, {float(pgd['ci95_high']):.1f}] on the same {pgd['total']} images")


# ---------------------------------------------------------------- methods x seeds (compare/dvc.yaml)
def run_name(method: str, seed: int) -> str:
    """A comparison run's name and file stem (``metrics/compare/<method>_seed<seed>.json``)."""
    return f"{method}_seed{seed}"


def comparison_rows(teacher: Path, runs: list[tuple[str, Path]]) -> tuple[list[tuple[str, dict]], dict[str, Path]]:
    """(name, results) of the teacher ("Teacher <arch>", first, when evaluated) and of each
    ``(name, metrics file)`` run, every headline block on the first row's headline images
    (``same_image_rows``), and each row's path. Every run's file must exist."""
    rows, paths = [], {}
    teacher_metrics = read_with_blocks(teacher)
    if teacher_metrics is not None:
        name = f"Teacher {teacher_metrics['info'].get('arch')}"
        rows.append((name, teacher_metrics))
        paths[name] = teacher
    for name, path in runs:
        results = read_with_blocks(path)
        if results is None:
            raise FileNotFoundError(f"{path}: comparison results missing")
        rows.append((name, results))
        paths[name] = path
    return same_image_rows(rows, paths), paths


def seed_summary(seeds_of: dict[str, list[int]], rows: dict[str, dict], block_of=headline_of) -> dict[str, dict]:
    """{method: {"seeds": [...], attack: {"mean", "std", "values"}, "flagged": runs flagged, "_runs"}}
    over the runs ``run_name(method, seed)`` of ``rows``; ``block_of``: which block of a run
    (the headline by default; e.g. ``lambda m: m.get(LARGER_SET)``). An attack is summarised
    only when every seed of the method has it."""
    from robustkd.stats import mean_std

    out = {}
    for method, seeds in seeds_of.items():
        runs = [rows[run_name(method, s)] for s in seeds]
        entry: dict = {"seeds": list(seeds), "flagged": sum(int(r.get("flagged", 0)) for r in runs), "_runs": runs}
        for key, _ in TABLE_COLUMNS:
            values = [v for r in runs if (v := block_percent(block_of(r), key)) is not None]
            if values and len(values) == len(runs):
                mean, std = mean_std(values)
                entry[key] = {"mean": round(mean, 2), "std": round(std, 2), "values": values}
        out[method] = entry
    return out


def seed_cell(entry: dict, key: str) -> str:
    """"34.00 ± 0.57": the mean and sample standard deviation over seeds ("-" if absent)."""
    return f"{entry[key]['mean']:.2f} ± {entry[key]['std']:.2f}" if key in entry else "-"
