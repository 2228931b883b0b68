"""Stage report: a Markdown and a self-contained HTML report (plots embedded as base64 PNG, so
it opens offline) of the run: training curves, accuracy under each attack for teacher, student
and the non-adversarial reference, the ONNX export figures and the data card."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from services.common import METRICS, REPORTS, cli, parser, read_params
from services.results import read_evaluation
from services.tables import (TABLE_COLUMNS, accuracy_cell, checks_lines, markdown_to_html_table, paired_lines,
                             read_json)
from robustkd.utils import atomic_path

def read_csv(path: Path) -> list[dict]:
    if not path.exists() or not path.read_text().strip():
        return []
    with open(path) as fh:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(fh)]


def accuracy_table(rows: list[tuple[str, dict]]) -> str:
    head = "| model | method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | images | checks |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 4)]
    for name, m in rows:
        info = m.get("info", {})
        cells = [accuracy_cell(m, k) for k, _ in TABLE_COLUMNS]
        lines.append(f"| {name} ({info.get('arch')}) | {info.get('method') or '-'} | " + " | ".join(cells)
                     + f" | {m.get('num_images')} | {'FLAGGED' if m.get('flagged') else 'passed'} |")
    return "\n".join(lines)


def plot_curves(histories: dict[str, list[dict]], out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["loss"] for r in rows], marker="o", label=name)
        for key in rows[0]:
            if key.startswith("heldout_"):
                axes[1].plot(epochs, [r[key] for r in rows], marker="o", label=f"{name} {key[8:]}")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="held-out accuracy (%)", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
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
        vals = [m.get(k) or 0.0 for k, _ in TABLE_COLUMNS]
        recs = [(m.get("accuracy") or {}).get(k) for k, _ in TABLE_COLUMNS]
        err = [[v - r["ci95_low"] if r else 0.0 for v, r in zip(vals, recs)],
               [r["ci95_high"] - v if r else 0.0 for v, r in zip(vals, recs)]]
        ax.bar([j + i * width for j in range(len(TABLE_COLUMNS))], vals, width, yerr=err, capsize=2, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(TABLE_COLUMNS))])
    ax.set_xticklabels([label for _, label in TABLE_COLUMNS])
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(args) -> None:
    params = read_params(args)
    REPORTS.mkdir(exist_ok=True)
    paths = {name: METRICS / "evaluate" / f"{name}.json" for name in ("teacher", "student", "reference")}
    evals = [(name, read_evaluation(path)) for name, path in paths.items()]
    evals = [(n, m) for n, m in evals if m]
    histories = {"teacher": read_csv(METRICS / "teacher_history.csv"),
                 "student": read_csv(METRICS / "student_history.csv"),
                 "reference": read_csv(METRICS / "reference_history.csv")}
    card = read_json(METRICS / "data_card.json") or {}
    export = read_json(METRICS / "export.json")
    ddpm = read_json(METRICS / "ddpm.json")
    comparison = REPORTS / "comparison.md"
    curves = plot_curves(histories, REPORTS / "training_curves.png")
    bars = plot_accuracy(evals, REPORTS / "accuracy.png")
    table = accuracy_table(evals)
    subset_info = evals[0][1]["info"].get("subset", {}) if evals else {}
    subset = (f"{subset_info.get('description')}, {subset_info.get('num_images')} images, "
              f"sha256 {str(subset_info.get('images_sha256'))[:16]}") if subset_info else "-"
    paired = paired_lines(paths, [("student", "teacher"), ("student", "reference")])

    md = [f"# Robust distillation report ({params.profile} profile)", "",
          f"Student `{params.distill.student.arch}` distilled with `{params.distill.method}` from a "
          f"`{params.teacher.model.arch}` teacher ({params.teacher.method}). Accuracy in percent at "
          f"eps = {params.evaluate.config.eps * 255:.0f}/255 (L-inf) on the test subset: {subset}; "
          "[95% Wilson interval]; an image wrong without attack counts as wrong under attack.", "",
          "## Accuracy under attack", "", table, ""]
    if evals:
        md += ["## Evaluation checks", ""] + checks_lines(evals) + [""]
    if paired:
        md += ["## Paired comparisons (same images)", ""] + paired + [""]
    if bars:
        md += [f"![accuracy]({bars.name})", ""]
    if curves:
        md += ["## Training curves", "", f"![curves]({curves.name})", ""]
    if comparison.exists():
        md += ["## Method comparison", "", comparison.read_text(), ""]
    attention = REPORTS / "attention.png"
    if attention.exists():
        md += ["## Attention maps (Grad-CAM)", "", f"![attention]({attention.name})", ""]
    if export:
        md += ["## ONNX export", "", f"- max |logit difference| torch vs onnxruntime: {export['max_abs_logit_diff']:.2e}",
               f"- prediction agreement: {100 * export['prediction_agreement']:.2f}% of {export['num_images']} images"]
        md += [f"- latency {k}: torch {v['torch_ms']:.2f} ms, onnxruntime {v['onnxruntime_ms']:.2f} ms "
               f"({v['speedup']:.2f}x)" for k, v in export["latency"].items()]
        md.append("")
    if ddpm:
        md += ["## Generated data", "", f"- source: {ddpm['source']}, images: {ddpm['num_images']}, "
               f"fraction per batch: {params.ddpm.fraction}", ""]
    if card:
        md += ["## Data card", "", f"- source: {card.get('source')} ({card.get('root')})"]
        for split in ("train", "heldout", "test"):
            if split in card:
                md.append(f"- {split}: {card[split]['num_images']} images, per class {card[split]['per_class']}, "
                          f"sha256 {card[split]['sha256'][:16]}")
        md.append("")
    text = "\n".join(md)
    with atomic_path(REPORTS / "report.md") as tmp:
        tmp.write_text(text)

    def img(path):
        return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'

    body = [f"<h1>{html.escape(md[0][2:])}</h1>", f"<p>{html.escape(md[2])}</p>",
            "<h2>Accuracy under attack</h2>", markdown_to_html_table(table)]
    if evals:
        body += ["<h2>Evaluation checks</h2>", "<pre>" + html.escape("\n".join(checks_lines(evals))) + "</pre>"]
    if paired:
        body += ["<h2>Paired comparisons (same images)</h2>", markdown_to_html_table("\n".join(paired))]
    if bars:
        body.append(img(bars))
    if curves:
        body += ["<h2>Training curves</h2>", img(curves)]
    if comparison.exists():
        body += ["<h2>Method comparison</h2>", markdown_to_html_table(comparison.read_text())]
    if attention.exists():
        body += ["<h2>Attention maps (Grad-CAM)</h2>", img(attention)]
    rest = text.split("## ONNX export", 1)
    if len(rest) == 2:
        body += ["<pre>" + html.escape("## ONNX export" + rest[1]) + "</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>robustkd report</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    with atomic_path(REPORTS / "report.html") as tmp:
        tmp.write_text(page)
    args.tracker.log_artifact(REPORTS, "reports")
    print(f"report written to {REPORTS / 'report.md'} and {REPORTS / 'report.html'}")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "report", ("profile",))

if __name__ == "__main__":
    run()
