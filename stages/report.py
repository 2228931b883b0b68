"""Stage report: a Markdown and a self-contained HTML report of the run: accuracy under each
attack for teacher, student and the non-adversarial reference, the protocol checks, paired tests,
training curves, the ONNX export figures and the data card. Each section is written once in
Markdown (reports/report.md); the HTML page is rendered from a Jinja2 template
(stages/templates/report.html.j2) with every section converted by Python-Markdown and the plots
embedded as base64 PNG data URIs, so it opens offline."""

from __future__ import annotations

import base64
import csv
from pathlib import Path
from typing import Any

from services.common import METRICS, REPORTS, cli, parser, read_params, write_csv
from services.best_last import best_last_markdown
from services.tables import (ATTACK_COLUMNS, HEADLINE, LARGER_SET, TABLE_COLUMNS, WORST, block_cell, checks_lines,
                             headline_words, larger_label, larger_words, onnx_block_reason, paired_lines, read_json,
                             read_with_blocks, same_image_rows)
from robustkd.utils import atomic_path

def read_csv(path: Path) -> list[dict]:
    if not path.exists() or not path.read_text().strip():
        return []
    with open(path) as fh:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(fh)]


def what_ran(metrics: Path) -> dict[str, str]:
    """The teacher's and the student's architecture and method, from the runs' results, not from
    params.yaml (which may have changed since): their resolved configurations
    (``metrics/teacher_config.json``, ``metrics/student_config.json``,
    docs/pipeline.md#the-resolved-configuration-of-a-stage-run: the method as run, ``method.name``; a
    given teacher, ``teacher.source`` checkpoint or zoo, trained nothing here and keeps its
    ``teacher.method``), else what the evaluation read from the checkpoints
    (``metrics/evaluate/<model>_info.json``: arch, method), else "-"."""
    out = {}
    for model, section, key in (("teacher", "teacher", "model"), ("student", "distill", "student")):
        config = read_json(metrics / f"{model}_config.json") or {}
        evaluated = read_json(metrics / "evaluate" / f"{model}_info.json") or {}
        params = config.get(section) or {}
        arch = (params.get(key) or {}).get("arch") or evaluated.get("arch")
        method = (config.get("method") or {}).get("name") or params.get("method") or evaluated.get("method")
        out[f"{model}_arch"], out[f"{model}_method"] = str(arch or "-"), str(method or "-")
    return out


def header_markdown(params, tracker) -> str:
    """The line under the report's title: when it was written, from which commit, and its MLflow
    run (the pipeline's parent run, set by the Prefect flow, and this stage's run) when tracked."""
    import os
    from datetime import datetime, timezone

    from services.tracking import git_commit, run_url, tracking_uri

    line = (f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from commit `{git_commit() or '-'}`, "
            f"{params.profile} profile.")
    if tracker.run_id and tracker.experiment_id:
        parent = os.environ.get("ROBUSTKD_PARENT_RUN_ID")
        runs = ([f"the pipeline's run [{parent[:8]}]({run_url(parent, tracker.experiment_id)})"] if parent else []) \
            + [f"this report's run [{tracker.run_id[:8]}]({run_url(tracker.run_id, tracker.experiment_id)})"]
        local = not tracking_uri().startswith(("http://", "https://"))
        line += " MLflow: " + ", ".join(runs) + (" (open `make mlflow-ui` first)." if local else ".")
    else:
        line += " Not tracked in MLflow (ROBUSTKD_TRACKING off)."
    return line


def run_caption(params) -> str:
    from datetime import datetime, timezone

    from services.tracking import git_commit

    return (f"Report of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit() or '-'}, "
            f"{params.profile} profile")


def image_counts(rows: list[tuple[str, dict]]) -> list[int]:
    """The distinct image counts of the rows' headline blocks, in order (one when the table
    compares like with like)."""
    return sorted({int(images) for _, m in rows if (images := (m.get(HEADLINE) or {}).get("images")) is not None})


def accuracy_table(rows: list[tuple[str, dict]], when: str = "") -> str:
    """The headline table: natural, PGD-20, CW, AutoAttack and the per-image worst case over them,
    every column on the same images (the count in the caption and in each row)."""
    counts = image_counts(rows)
    head = "| model | method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | images | checks |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 4)]
    for name, m in rows:
        info, block = m.get("info", {}), m.get(HEADLINE)
        cells = [block_cell(block, k) for k, _ in TABLE_COLUMNS]
        lines.append(f"| {name} ({info.get('arch')}) | {info.get('method') or '-'} | " + " | ".join(cells)
                     + f" | {(block or {}).get('images', '-')} | {'FLAGGED' if m.get('flagged') else 'passed'} |")
    words = headline_words(rows[0][1]) if rows else "-"
    on = (f"on the same {counts[0]:,} test images ({words})" if len(counts) == 1
          else "on the images counted in each row")
    caption = (f"Accuracy (%) [95% Wilson interval] {on}: natural, PGD-20, CW and AutoAttack all on these "
               "images; the worst case is per image, right under every one of them, so never above a column."
               + (f" {when}." if when else ""))
    return caption + "\n\n" + "\n".join(lines)


def larger_set_table(rows: list[tuple[str, dict]], when: str = "") -> tuple[str, str] | None:
    """(title, Markdown) of the cheaper attacks on the larger set, a table of its own; None when
    every attack ran on the headline images."""
    rows = [(name, m) for name, m in rows if m.get(LARGER_SET)]
    if not rows:
        return None
    counts = sorted({m[LARGER_SET]["images"] for _, m in rows})
    n = counts[0] if len(counts) == 1 else max(counts)
    keys = [(k, label) for k, label in ATTACK_COLUMNS if any(k in m[LARGER_SET]["accuracy"] for _, m in rows)]
    head = ("| model | method | " + " | ".join(larger_label(label, n) for _, label in keys)
            + " | worst of these | images |")
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for name, m in rows:
        info, block = m.get("info", {}), m[LARGER_SET]
        lines.append(f"| {name} ({info.get('arch')}) | {info.get('method') or '-'} | "
                     + " | ".join(block_cell(block, k) for k, _ in keys)
                     + f" | {block_cell(block, WORST)} | {block['images']} |")
    title = f"Cheaper attacks on the larger set ({n:,} images)"
    caption = (f"Accuracy (%) [95% Wilson interval] of the attacks that ran on every evaluated image "
               f"({larger_words(rows[0][1])}, {n:,} images), not AutoAttack: not comparable with the headline "
               "table's columns, and its worst case is over these attacks only." + (f" {when}." if when else ""))
    return title, caption + "\n\n" + "\n".join(lines)


# One colour per model in every figure of the report (matplotlib's tab10), the same in dvc.yaml's plots.
MODEL_COLOURS = {"teacher": "#1f77b4", "student": "#ff7f0e", "reference": "#2ca02c", "student_best": "#d62728"}
LOSS_TERMS = ("ce", "kl", "kd", "arkd", "iakd", "dbkd")   # a method's loss terms, when its history has them


def model_colour(name: str) -> str:
    return MODEL_COLOURS.get(name, "#7f7f7f")


def nan_if_none(value: float | None) -> float:
    """An empty CSV cell (read as None) as a gap in the curve."""
    return float("nan") if value is None else value


def plot_curves(histories: dict[str, list[dict]], out: Path) -> Path | None:
    """Training curves: one panel per model's loss (TRADES, DARWIN and KD losses have different
    scales and meanings, so they never share an axis), its terms dashed beside the total; below,
    the held-out natural and PGD accuracy (%), one axis each, every model in its colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    names = list(histories)   # 2n columns: a loss panel per model above, the two accuracies below
    heldout = any(k.startswith("heldout_") for rows in histories.values() for k in rows[0])
    mosaic: list[Any] = [[f"loss:{n}" for n in names for _ in range(2)]]   # matplotlib's HashableList
    if heldout:   # the held-out monitor ran (data.heldout_per_class, monitor_pgd_steps)
        mosaic.append(["natural"] * len(names) + ["pgd"] * len(names))
    fig, axes = plt.subplot_mosaic(mosaic, figsize=(11, 6.4 if heldout else 3.4))
    for name, rows in histories.items():
        epochs, colour = [r["epoch"] for r in rows], model_colour(name)
        ax = axes[f"loss:{name}"]
        ax.plot(epochs, [r["loss"] for r in rows], marker="o", color=colour, label="total")
        terms = [t for t in LOSS_TERMS if t in rows[0]]
        for style, term in zip(("--", ":", "-."), terms):
            if any(r[term] != r["loss"] for r in rows):   # a term that is the whole loss adds nothing
                ax.plot(epochs, [nan_if_none(r[term]) for r in rows], style, color=colour, alpha=0.7, label=term)
        ax.set(title=f"{name}: training loss", xlabel="epoch")
        for key in (k for k in rows[0] if k.startswith("heldout_")):
            which = "natural" if key == "heldout_natural" else "pgd"
            axes[which].plot(epochs, [nan_if_none(r[key]) for r in rows], marker="o", color=colour,
                             label=f"{name} ({key.removeprefix('heldout_')})")
    if heldout:
        axes["natural"].set(title="held-out natural accuracy (%)", xlabel="epoch")
        axes["pgd"].set(title="held-out accuracy under PGD (%)", xlabel="epoch")
    for ax in axes.values():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:   # a persistent output: replaced only by a whole figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def plot_accuracy(rows: list[tuple[str, dict]], out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(rows)
    for i, (name, m) in enumerate(rows):
        recs = [((m.get(HEADLINE) or {}).get("accuracy") or {}).get(k) for k, _ in TABLE_COLUMNS]
        vals = [r["percent"] if r else 0.0 for r in recs]
        err = [[v - r["ci95_low"] if r else 0.0 for v, r in zip(vals, recs)],
               [r["ci95_high"] - v if r else 0.0 for v, r in zip(vals, recs)]]
        ax.bar([j + i * width for j in range(len(TABLE_COLUMNS))], vals, width, yerr=err, capsize=2, label=name,
               color=model_colour(name))
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(TABLE_COLUMNS))])
    ax.set_xticklabels([label for _, label in TABLE_COLUMNS])
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:   # a persistent output: replaced only by a whole figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def accuracy_rows(rows: list[tuple[str, dict]]) -> list[dict]:
    """One row per model and attack (``metrics/accuracy.csv``, the data of dvc.yaml's "Accuracy per
    attack" plot): the percentage and its 95% Wilson interval, from the headline block (every
    attack on the same images)."""
    out = []
    for name, m in rows:
        for key, label in TABLE_COLUMNS:
            rec = ((m.get(HEADLINE) or {}).get("accuracy") or {}).get(key)
            if rec:
                out.append({"model": name, "attack": label, "model_attack": f"{name}: {label}",
                            "percent": rec["percent"], "ci95_low": rec["ci95_low"], "ci95_high": rec["ci95_high"]})
    return out


TEMPLATES = Path(__file__).resolve().parent / "templates"


def markdown_html(text: str) -> str:
    """Markdown (the report's own sections and reports/comparison.md) as HTML with Python-Markdown:
    tables as <table> (each in a horizontally scrollable wrapper, so a wide one never widens the
    page), lists as lists, code spans as <code>. Nested list items are indented by two spaces in
    this project's Markdown; Python-Markdown needs four."""
    import re

    import markdown

    text = re.sub(r"(?m)^  (?=[-*] )", "    ", text)
    out = markdown.markdown(text, extensions=["tables", "sane_lists"], output_format="html")
    # "43.00 [35.6, 54.8]" in a cell: the interval wraps as one piece, under the figure
    out = re.sub(r"(<td[^>]*>[-\d.]+) (\[[-\d.]+, [-\d.]+\])</td>", r'\1 <span class="ci">\2</span></td>', out)
    return out.replace("<table>", '<div class="table-wrap"><table>').replace("</table>", "</table></div>")


def per_class_text(per_class: dict) -> str:
    counts = set(per_class.values())
    if len(counts) == 1:
        return f"{counts.pop()} each ({len(per_class)} classes)"
    return ", ".join(f"{k} {v}" for k, v in per_class.items())


def ddpm_report() -> dict | None:
    """The generated-data figures (metrics/ddpm.json) with their text (ddpm_info.json: the source)."""
    numbers = read_json(METRICS / "ddpm.json")
    return None if numbers is None else {**(read_json(METRICS / "ddpm_info.json") or {}), **numbers}


def deployed_file_attacked(export: dict | None, eps: float) -> dict | None:
    """The section "The deployed file attacked": the export stage's attacks on models/student.onnx
    beside the PyTorch student's figures, on the same images (metrics/export.json; docs/pipeline.md)."""
    if not export or "robust_images" not in export:
        return None
    n = export["robust_images"]

    def cell(key: str) -> str:
        rec = export.get(key)
        return f"{rec['percent']:.2f} [{rec['ci95_low']:.1f}, {rec['ci95_high']:.1f}]" if rec else "-"

    lines = [f"Accuracy (%) [95% Wilson interval] on the same {n:,} headline test images (the images AutoAttack "
             f"ran on, export.attack.per_class of each class), L-inf eps {255 * eps:g}/255 (evaluate.config.eps):", "",
             f"| attack, on {n:,} images | PyTorch student | deployed ONNX file (onnxruntime) |", "|---|---|---|",
             f"| Natural on {n:,} | {cell('torch_natural_accuracy')} | {cell('onnx_natural_accuracy')} |",
             f"| PGD-20 on {n:,} (crafted on PyTorch; transferred to the file) | {cell('torch_pgd20_accuracy')} | "
             f"{cell('onnx_pgd20_transfer_accuracy')} |",
             f"| Square on {n:,} ({export.get('square_queries')} queries, gradient-free, on the file) | - | "
             f"{cell('onnx_square_accuracy')} |", ""]
    blocked = onnx_block_reason(export)
    lines.append(f"Promotion rule (export.attack.block_promotion): {blocked}; not promoted." if blocked else
                 "Promotion rule: the file's Square accuracy is not below the PyTorch PGD-20 interval, so the "
                 "file is as robust as its student within the sampling noise of these images.")
    return {"id": "onnx-attacked", "title": f"The deployed file attacked ({n:,} images)", "markdown": "\n".join(lines)}


def build_sections(params, evals, paths, histories, card, export, ddpm, comparison, figures) -> list[dict]:
    """The report's sections, each {"id", "title", "markdown", "figures": [(alt, path, caption)]}."""
    when = figures.get("when", "")
    counts = image_counts(evals)
    same = f" (the same {counts[0]:,} images)" if len(counts) == 1 else ""
    sections = [{"id": "accuracy", "title": "Accuracy under attack" + same, "markdown": accuracy_table(evals, when),
                 "figures": [("accuracy", figures["accuracy"],
                              f"Accuracy (%) per attack with 95% Wilson intervals{same}")]
                 if figures.get("accuracy") else []}]
    larger = larger_set_table(evals, when)
    if larger:
        sections.append({"id": "larger-set", "title": larger[0], "markdown": larger[1]})
    if evals:
        sections.append({"id": "checks", "title": "Evaluation checks", "markdown": "\n".join(checks_lines(evals))})
    paired = paired_lines(paths, [("student", "teacher"), ("student", "reference")])
    if paired:
        sections.append({"id": "paired", "title": "Paired comparisons (same images)", "markdown": "\n".join(paired)})
    best_last = best_last_markdown(paths["student"].parent, list(params.evaluate.best_checkpoints))
    if best_last:   # services/best_last.py: the best held-out checkpoints beside the last
        sections.append({"id": "best-last", "title": "Best and last checkpoints", "markdown": best_last})
    if figures.get("curves"):
        sections.append({"id": "curves", "title": "Training curves", "markdown": "",
                         "figures": [("curves", figures["curves"], "Training loss and held-out accuracy per epoch")]})
    if comparison.exists():
        sections.append({"id": "comparison", "title": "Method comparison", "markdown": comparison.read_text()})
    # `make ablation` (ablation/dvc.yaml) writes its tables after this pipeline: shown when present,
    # like the comparison (not dependencies: `dvc repro` would otherwise run every ablation variant).
    ablation = comparison.parent / "ablation.md"
    if ablation.exists():
        sections.append({"id": "ablation", "title": "DARWIN's ablations", "markdown": ablation.read_text()})
    attention = comparison.parent / "attention.png"   # stages/attention.py (the attention stage)
    if attention.exists():
        sections.append({"id": "attention", "title": "Attention maps (Grad-CAM)",
                         "markdown": "Grad-CAM of the teacher, the student and the non-adversarial reference on the same clean and PGD-20 images (the layer per architecture: attention.layers).",
                         "figures": [("attention", attention, "Grad-CAM maps, clean and adversarial")]})
    if export:
        lines = ["| measure | value |", "|---|---|",
                 f"| max \\|logit difference\\| torch vs onnxruntime | {export['max_abs_logit_diff']:.2e} |",
                 f"| prediction agreement | {100 * export['prediction_agreement']:.2f}% of {export['num_images']} images |"]
        if export.get("opset"):
            lines.append(f"| ONNX opset | {export['opset']} |")
        lines += ["", "| batch | torch (ms) | onnxruntime (ms) | speed-up |", "|---|---|---|---|"]
        lines += [f"| {k.removeprefix('batch')} | {v['torch_ms']:.2f} | {v['onnxruntime_ms']:.2f} | {v['speedup']:.2f}x |"
                  for k, v in export["latency"].items()]
        sections.append({"id": "onnx", "title": "ONNX export", "markdown": "\n".join(lines)})
    attacked = deployed_file_attacked(export, params.evaluate.config.eps)
    if attacked:
        sections.append(attacked)
    if ddpm:
        sections.append({"id": "generated", "title": "Generated data", "markdown": "\n".join([
            "| source | images | fraction per batch |", "|---|---|---|",
            f"| {ddpm.get('source', '-')} | {ddpm['num_images']} | {params.ddpm.fraction} |"])})
    if card:
        lines = [f"Source: {card.get('source')} (`{card.get('root')}`).", "",
                 "| split | images | per class | sha256 (first 16) |", "|---|---|---|---|"]
        lines += [f"| {split} | {card[split]['num_images']} | {per_class_text(card[split]['per_class'])} | "
                  f"`{card[split]['sha256'][:16]}` |" for split in ("train", "heldout", "test") if split in card]
        sections.append({"id": "data", "title": "Data card", "markdown": "\n".join(lines)})
    for s in sections:
        s.setdefault("figures", [])
    return sections


def render_markdown(title: str, intro: str, sections: list[dict], header: str = "") -> str:
    md = [f"# {title}", ""] + ([header, ""] if header else []) + [intro, ""]
    for s in sections:
        md += [f"## {s['title']}", ""]
        if s["markdown"]:
            md += [s["markdown"].rstrip(), ""]
        md += [f"![{alt}]({path.name})" for alt, path, _ in s["figures"]] + ([""] if s["figures"] else [])
    return "\n".join(md)


def render_html(title: str, intro: str, sections: list[dict], header: str = "") -> str:
    """The HTML page from templates/report.html.j2: every section converted from its Markdown,
    figures embedded as base64 PNG data URIs (the page needs nothing else to open)."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    view = [{"id": s["id"], "title": s["title"], "html": Markup(markdown_html(s["markdown"])),
             "figures": [{"alt": alt, "caption": caption, "data": base64.b64encode(path.read_bytes()).decode()}
                         for alt, path, caption in s["figures"]]} for s in sections]
    return env.get_template("report.html.j2").render(title=title, intro_html=Markup(markdown_html(intro)),
                                                     header_html=Markup(markdown_html(header)), sections=view)


def main(args) -> None:
    params = read_params(args)
    REPORTS.mkdir(exist_ok=True)
    paths = {name: METRICS / "evaluate" / f"{name}.json" for name in ("teacher", "student", "reference")}
    read = [(name, read_with_blocks(path)) for name, path in paths.items()]
    evals = same_image_rows([(n, m) for n, m in read if m], paths)
    histories = {"teacher": read_csv(METRICS / "teacher_history.csv"),
                 "student": read_csv(METRICS / "student_history.csv"),
                 "reference": read_csv(METRICS / "reference_history.csv")}
    figures = {"curves": plot_curves(histories, REPORTS / "training_curves.png"),
               "accuracy": plot_accuracy(evals, REPORTS / "accuracy.png"), "when": run_caption(params)}
    write_csv(accuracy_rows(evals), METRICS / "accuracy.csv")
    subset_info = evals[0][1]["info"].get("subset", {}) if evals else {}
    subset = (f"{subset_info.get('description')}, {subset_info.get('num_images')} images, "
              f"sha256 `{str(subset_info.get('images_sha256'))[:16]}`") if subset_info else "-"
    aa_info = (evals[0][1]["info"].get("attack_subsets") or {}).get("autoattack") if evals else None
    if aa_info:
        subset += (f"; AutoAttack on {aa_info.get('description')} of it ({aa_info.get('num_images')} images, sha256 "
                   f"`{str(aa_info.get('images_sha256'))[:16]}`): the headline table has every attack on those "
                   "images, the cheaper attacks on the whole subset are a table of their own")
    if evals:
        subset += autoattack_version_note(evals[0][1]["info"].get("config") or {})
    title = f"Robust distillation report ({params.profile} profile)"
    ran = what_ran(METRICS)
    intro = (f"Student `{ran['student_arch']}` distilled with `{ran['student_method']}` from a "
             f"`{ran['teacher_arch']}` teacher ({ran['teacher_method']}). Accuracy in percent at "
             f"eps = {params.evaluate.config.eps * 255:.0f}/255 (L-inf) on the test subset: {subset}; "
             "[95% Wilson interval]; an image wrong without attack counts as wrong under attack.")
    sections = build_sections(params, evals, paths, histories, read_json(METRICS / "data_card.json") or {},
                              read_json(METRICS / "export.json"), ddpm_report(),
                              REPORTS / "comparison.md", figures)
    header = header_markdown(params, args.tracker)
    with atomic_path(REPORTS / "report.md") as tmp:
        tmp.write_text(render_markdown(title, intro, sections, header))
    with atomic_path(REPORTS / "report.html") as tmp:
        tmp.write_text(render_html(title, intro, sections, header))
    args.tracker.log_artifact(REPORTS, "reports")
    print(f"report written to {REPORTS / 'report.md'} and {REPORTS / 'report.html'}")


def autoattack_version_note(config: dict) -> str:
    """Which AutoAttack ran, from the evaluation's recorded configuration: a cut-down custom run
    (the tiny and smoke profiles) must not read as the standard version that papers report."""
    version = config.get("autoattack_version")
    if "autoattack" not in (config.get("attacks") or []) or not version:
        return ""
    if version != "custom":
        return f"; AutoAttack version {version} (pyautoattack)"
    return (f"; AutoAttack **custom** ({', '.join(config.get('autoattack_attacks') or [])}, "
            f"{config.get('autoattack_iterations')} iterations): weaker than the standard version, "
            "not comparable with published AutoAttack figures")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "report", ("profile",), config=METRICS / "report_config.json")

if __name__ == "__main__":
    run()
