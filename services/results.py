"""The evaluation result files: ``<model>.json`` (numbers), ``<model>_info.json`` (text) and
``<model>_per_image.npz`` (per-image outcomes, no pickle), and how to read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def info_path(metrics_path: Path) -> Path:
    """``student.json`` -> ``student_info.json``: the text that goes with a numeric results file."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + "_info.json")


def per_image_path(metrics_path: Path) -> Path:
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + "_per_image.npz")


def read_evaluation(metrics_path: Path) -> dict | None:
    """The numeric results of ``metrics_path`` with their text under "info" ({} when the info
    file is absent); None when the results were not written."""
    import json

    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    results = json.loads(metrics_path.read_text())
    text = info_path(metrics_path)
    results["info"] = json.loads(text.read_text()) if text.is_file() else {}
    return results


def read_per_image(metrics_path: Path) -> dict[str, np.ndarray] | None:
    """The per-image outcomes saved beside ``metrics_path`` (None when absent)."""
    path = per_image_path(metrics_path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
