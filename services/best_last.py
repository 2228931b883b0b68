"""Best and last checkpoints (issue 24, item 3): the evaluate stage's runs of the best held-out
checkpoints (``models/<name>_best.pt``, services/training.py BestKeeper) for the models of
``evaluate.best_checkpoints``, and the report's "Best and last checkpoints" section.

Adversarial training overfits robustly (Rice, Wong, Kolter, "Overfitting in adversarially robust
deep learning", ICML 2020, https://arxiv.org/abs/2002.11569), and IAD's and AdaAD's official code
keep the best robust checkpoint: papers report either. The section shows both, labelled, each
attack's accuracy on the same images with its 95% Wilson interval, the epoch of each, and an exact
McNemar test on the paired per-image outcomes (robustkd/stats.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from robustkd.evaluation import ATTACKS, WORST_CASE
from robustkd.stats import discordant_pairs, mcnemar_exact_counts, wilson_interval
from robustkd.utils import atomic_path

from .results import details_path, info_path, per_image_path, read_per_image
from .tables import headline_images, outcome_on

LABELS = {"natural": "Natural", "pgd20": "PGD-20", "cw": "CW", "autoattack": "AA", WORST_CASE: "Worst case"}
COLUMNS = [*ATTACKS, WORST_CASE]


def best_name(name: str) -> str:
    """teacher -> teacher_best: the name of a best checkpoint's files (models/, metrics/evaluate/)."""
    return f"{name}_best"


def checkpoint_record(model_path: Path) -> dict:
    """What the evaluation records of a best checkpoint: its epoch, held-out accuracy, how it was
    chosen, and whether its weights are those of the last checkpoint beside it."""
    import torch

    from robustkd.checkpoints import load_checkpoint

    best = load_checkpoint(model_path)
    last_path = model_path.with_name(model_path.name.replace("_best", ""))
    meta = best.checkpoint_meta
    record = {"checkpoint": "best", "file": str(model_path), "last_file": str(last_path),
              "best_epoch": meta.get("best_epoch"), "best_heldout_pgd": meta.get("best_heldout_pgd"),
              "best_metric": meta.get("best_metric"), "selection": meta.get("selection")}
    if last_path.is_file():
        last = load_checkpoint(last_path)
        record["last_epoch"] = last.checkpoint_meta.get("epochs")
        state = last.state_dict()
        record["same_weights_as_last"] = all(torch.equal(v, state[k]) for k, v in best.state_dict().items())
    return record


def copy_results(last_out: Path, best_out: Path, record: dict) -> None:
    """The best's results are the last's (the same weights: the best epoch is the last, or the
    monitor was off): its files copied, the info saying so. No second evaluation."""
    for src, dst in ((details_path(last_out), details_path(best_out)), (per_image_path(last_out), per_image_path(best_out)),
                     (last_out, best_out)):
        if not src.is_file():   # results written before the details file existed
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    info = json.loads(info_path(last_out).read_text())
    info.update(model=record["file"], results_of=str(last_out), per_image=per_image_path(best_out).name)
    write_info(info_path(best_out), {**info, "best_checkpoint": record})


def annotate(best_out: Path, record: dict) -> None:
    """Add the checkpoint record to a best's info file (written by the evaluation)."""
    path = info_path(best_out)
    write_info(path, {**json.loads(path.read_text()), "best_checkpoint": record})


def write_info(path: Path, info: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def evaluate_best(names: list[str], models: Path, out: Path, attacks_of: Callable[[str], list[str]],
                  evaluate: Callable[[Path, Path, list[str]], bool], is_main: bool = True) -> list[str]:
    """Evaluate ``models/<name>_best.pt`` -> ``<out>/<name>_best.json`` for each name (after the last
    checkpoints were evaluated: ``<out>/<name>.json``); the same weights as the last: its results
    copied. Returns the flagged model files."""
    flagged = []
    for name in names:
        model_path, best_out, last_out = models / f"{best_name(name)}.pt", out / f"{best_name(name)}.json", \
            out / f"{name}.json"
        record = checkpoint_record(model_path)
        if record.get("same_weights_as_last") and last_out.is_file():
            if is_main:
                copy_results(last_out, best_out, record)
                print(f"{model_path}: the weights of the last checkpoint (best epoch {record['best_epoch']}, "
                      f"{record['selection']}): its results copied to {best_out}")
            continue
        if evaluate(model_path, best_out, attacks_of(name)):
            flagged.append(str(model_path))
        if is_main:
            annotate(best_out, record)
    return flagged


def unlisted_best_files(out: Path, names: list[str]) -> list[Path]:
    """The files of a best checkpoint's results in ``out`` (``<name>_best.json``, its ``_details.json``,
    ``_info.json`` and ``_per_image.npz``) whose name ``evaluate.best_checkpoints`` no longer lists: left by an
    earlier run, since the outputs persist (dvc.yaml). Without their removal DVC and the report
    would take them for this run's."""
    listed = {best_name(n) for n in names}
    stale = []
    for path in sorted(out.glob("*_best*")) if out.is_dir() else []:
        stem = path.name
        for suffix in ("_details.json", "_info.json", "_per_image.npz", ".json"):
            if stem.endswith(suffix):
                stem = stem[:-len(suffix)]
                break
        if stem.endswith("_best") and stem not in listed and path.is_file():
            stale.append(path)
    return stale


def remove_unlisted_best(out: Path, names: list[str]) -> list[Path]:
    """Remove :func:`unlisted_best_files`, saying so; called after every evaluation succeeded."""
    stale = unlisted_best_files(out, names)
    for path in stale:
        path.unlink()
        print(f"{path}: removed, the result of a best checkpoint that evaluate.best_checkpoints "
              f"({names}) no longer lists (remove its outputs from dvc.yaml too)")
    return stale


def _cell(outcomes: np.ndarray) -> str:
    k, n = int(outcomes.sum()), len(outcomes)
    low, high = wilson_interval(k, n)
    return f"{100 * k / n:.2f} [{100 * low:.1f}, {100 * high:.1f}] ({n})"


def _epoch(info: dict, which: str) -> str:
    record = info.get("best_checkpoint") or {}
    value = record.get("best_epoch" if which == "best" else "last_epoch")
    return "-" if value is None else str(value)


def on_shared_images(per_image: dict, cols: list[str]) -> dict[str, np.ndarray]:
    """Each column's outcomes on the headline images, those *every* attack ran on (AutoAttack's
    subset when it ran; services.tables.headline_images), in the order of the evaluated subset:
    one set of images per row, so that the worst case is never beside a column of other images."""
    images = headline_images(per_image)
    return {c: outcome_on(per_image, c, images).astype(np.asarray(per_image[c]).dtype) for c in cols}


def best_last_markdown(evaluate_dir: Path, names: list[str]) -> str:
    """The report's "Best and last checkpoints" section (Markdown; "" when no best was evaluated):
    per model, a row for the last and for the best checkpoint, each attack's accuracy on the same
    images (those every attack of the row ran on) [95% Wilson interval] (images), the epoch of each,
    and the exact McNemar test per attack on those images."""
    rows, tests, notes = [], [], []
    for name in names:
        last_out, best_out = evaluate_dir / f"{name}.json", evaluate_dir / f"{best_name(name)}.json"
        pl, pb = read_per_image(last_out), read_per_image(best_out)
        if pl is None or pb is None:
            continue
        info = json.loads(info_path(best_out).read_text()) if info_path(best_out).is_file() else {}
        record = info.get("best_checkpoint") or {}
        cols = [c for c in COLUMNS if c in pl and c in pb
                and np.array_equal(pl.get(f"{c}_index", pl["index"]), pb.get(f"{c}_index", pb["index"]))]
        last, best = on_shared_images(pl, cols), on_shared_images(pb, cols)
        for which, outcomes in (("last", last), ("best", best)):
            cells = [_cell(outcomes[c]) if c in cols else "-" for c in COLUMNS]
            rows.append(f"| {name} ({which}) | {_epoch(info, which)} | " + " | ".join(cells) + " |")
        for c in cols:
            only_last, only_best = discordant_pairs(last[c], best[c])
            tests.append(f"| {name} | {LABELS[c]} | {len(last[c])} | {only_last} | {only_best} | "
                         f"{mcnemar_exact_counts(only_last, only_best):.3g} |")
        held = record.get("best_heldout_pgd")
        how = (f"the best epoch {record.get('best_epoch')} by the held-out monitor ({record.get('best_metric')} "
               f"{held:.2f}%)"
               if isinstance(held, (int, float)) else f"{record.get('selection') or 'no best recorded'}")
        same = " (the same weights as the last: one evaluation)" if record.get("same_weights_as_last") else ""
        notes.append(f"- {name}: {how}{same}.")
    if not rows:
        return ""
    header = "| checkpoint | epoch | " + " | ".join(LABELS[c] for c in COLUMNS) + " |"
    lines = ["Each training stage keeps the checkpoint of its best held-out PGD accuracy beside the last "
             "(teacher.select, distill.select: which one is used downstream). Accuracy in percent on the same "
             "test images for both rows [95% Wilson interval] (images); the best is chosen on the held-out "
             "slice, never on these images.", "",
             header, "|" + "---|" * (len(COLUMNS) + 2), *rows, "", *notes, "",
             "| model | attack | images | right only for the last | right only for the best | exact McNemar p |",
             "|---|---|---|---|---|---|", *tests]
    return "\n".join(lines)
