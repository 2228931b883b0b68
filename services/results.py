"""The evaluation result files: ``<model>.json`` (the headline numbers: a DVC metrics file),
``<model>_details.json`` (the other numbers: intervals, per-class accuracy, checks, the table
blocks; a plain output), ``<model>_info.json`` (text) and ``<model>_per_image.npz`` (per-image
outcomes, no pickle), and how to read them back as one dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def info_path(metrics_path: Path) -> Path:
    """``student.json`` -> ``student_info.json``: the text that goes with a numeric results file."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + "_info.json")


def details_path(metrics_path: Path) -> Path:
    """``student.json`` -> ``student_details.json``: the numbers that are not headline numbers."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + "_details.json")


# What the DVC metrics file of an evaluation holds: each attack's accuracy (%) on its own images,
# the evaluated count and the checks' verdict. `dvc metrics show` and `dvc exp show` list every
# leaf as a column, so the intervals, per-class accuracies and check details go to the details
# file (issue 28: the metrics table fits on a screen).
ACCURACY_NUMBERS = ("natural", "pgd20", "cw", "autoattack", "worst_case", "num_images")
HEADLINE_NUMBERS = (*ACCURACY_NUMBERS, "checks_failed", "flagged")


def split_headline(summary: dict) -> tuple[dict, dict]:
    """(the DVC metrics file, the details file) of an evaluation summary.

    The metrics file holds the headline table's numbers: every attack's accuracy, the worst case
    and ``num_images`` **on the same images** (``summary["headline"]``, the images AutoAttack ran
    on), so that `dvc metrics show` never puts a worst case beside columns of other images; and the
    failed checks. The details file is the whole summary (its top-level accuracies on every image
    each attack ran on, the intervals, the larger-set block): :func:`read_evaluation` reads it over
    the metrics file, so readers see what they saw before the split."""
    block = summary.get("headline")
    if isinstance(block, dict) and isinstance(block.get("accuracy"), dict):
        numbers = {k: record["percent"] for k, record in block["accuracy"].items() if k in HEADLINE_NUMBERS}
        numbers["num_images"] = block["images"]
    else:   # no per-image outcomes to build the block from: the summary's own numbers
        numbers = {k: summary[k] for k in ACCURACY_NUMBERS if k in summary}
    numbers.update({k: summary[k] for k in ("checks_failed", "flagged") if k in summary})
    return numbers, summary


def per_image_path(metrics_path: Path) -> Path:
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + "_per_image.npz")


def read_evaluation(metrics_path: Path) -> dict | None:
    """The numeric results of ``metrics_path`` (the details file beside it, the whole summary, when
    present; else the file itself, as written before the split) with their text under "info" ({} when the info file is absent); None when
    the results were not written."""
    import json

    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    details = details_path(metrics_path)
    results = {**json.loads(metrics_path.read_text()), **(json.loads(details.read_text()) if details.is_file() else {})}
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


# ---------------------------------------------------------------- which test images are evaluated
# One selection, used by the evaluate stage and by every stage that must look at the same images
# (the export stage attacks the ONNX file on the headline images).
def evaluated_indices(params, labels, num_classes: int):
    """Indices into the prepared test set of the evaluated subset: the first ``evaluate.per_class``
    images of each class (all when null), then its first ``evaluate.max_images`` (all when null)."""
    import torch

    from robustkd.data import stratified_first_k

    k = params.evaluate.per_class
    indices = stratified_first_k(labels, k, num_classes) if k is not None else torch.arange(len(labels))
    return indices[:params.evaluate.max_images]    # None: all


def autoattack_positions(params, labels, num_classes: int, attacks: list[str]) -> dict:
    """{"autoattack": positions in the evaluated subset}: its first ``evaluate.autoattack_per_class``
    images of each class, when that is smaller than the subset; {} otherwise. ``labels``: those of
    the evaluated subset."""
    from robustkd.data import stratified_first_k

    k = params.evaluate.autoattack_per_class
    if "autoattack" not in attacks or k is None:
        return {}
    positions = stratified_first_k(labels, k, num_classes)
    return {} if len(positions) == len(labels) else {"autoattack": positions}


def headline_indices(params, labels, num_classes: int):
    """Indices into the prepared test set of the images of the headline table (every attack of
    ``evaluate.config.attacks`` on the same images: AutoAttack's stratified subset when it has one,
    else the whole evaluated subset); ``labels``: those of the prepared test set. The same images
    as ``services.tables.headline_images`` reads back from the per-image results."""
    import torch

    labels = torch.as_tensor(labels)
    indices = evaluated_indices(params, labels, num_classes)
    subsets = autoattack_positions(params, labels[indices], num_classes, params.evaluate.config.attacks)
    return indices[subsets["autoattack"]] if subsets else indices
