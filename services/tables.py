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


def paired_lines(paths: dict[str, Path], pairs: list[tuple[str, str]]) -> list[str]:
    """Exact McNemar tests between models evaluated on the same images, per common attack."""
    lines = []
    for a, b in pairs:
        pa, pb = (read_per_image(paths[n]) if n in paths else None for n in (a, b))
        if pa is None or pb is None:
            continue
        for key, label in TABLE_COLUMNS:
            if key in pa and key in pb and same_images(pa, pb, key):
                only_a, only_b = discordant_pairs(pa[key], pb[key])
                p = mcnemar_exact_counts(only_a, only_b)
                lines.append(f"| {a} vs {b} | {label} | {only_a} | {only_b} | {p:.3g} |")
    if not lines:
        return []
    return ["| pair | attack | right only for the first | right only for the second | exact McNemar p |",
            "|---|---|---|---|---|"] + lines


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
