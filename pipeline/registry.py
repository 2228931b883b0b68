"""The MLflow model registry of ONNX students: register, promote, compare.

``python -m pipeline.registry register`` registers ``models/student.onnx`` (MLflow's ONNX flavour)
with a signature (float32 N x 3 x 32 x 32 in [0, 1] -> logits) and an input example, a description
(method, teacher, data, evaluation with 95% intervals, a link to the distill stage's training run)
and tags for method, student, teacher, dataset, the headline figures (natural, PGD-20, CW, AutoAttack
and the per-image worst case, all on the same images: ``headline_images``) with their counts and
95% Wilson intervals, the cheaper attacks on the larger set under tags that name their count
(``pgd20_on_1000``), the evaluated subset's hash, whether the evaluation was flagged and the training run's id, then
decides its alias:

- a new version is ranked only against a champion evaluated on the same dataset, AutoAttack
  images (their SHA-256) and threat model (tag ``comparison_group``); against a champion of another
  group it is ranked within its own group and gets ``champion-<group>`` (or ``challenger-<group>``),
  with the reason;
- ``champion`` moves to the new version only if its AutoAttack accuracy is at least the current
  champion's (``registry.promotion: point_estimate``; with ``significant`` also an exact McNemar
  p-value below ``registry.alpha`` on the same images) and its natural accuracy is within
  ``registry.natural_tolerance`` percentage points of the champion's (the first version becomes
  champion);
- a version whose ONNX file is less robust than its PyTorch student (the export stage's Square on
  the ONNX session below the lower end of the 95% Wilson interval of the PyTorch PGD-20 accuracy,
  on the same images: ``metrics/export.json``, docs/pipeline.md "The deployed file attacked") is
  never promoted (``export.attack.block_promotion``), not even as the first version; its ONNX
  figures are version tags (``onnx_square``, ``onnx_pgd20_transfer``, ... with counts and intervals);
- otherwise the new version gets ``challenger``, and the reason is logged and kept in the
  version's ``alias_reason`` tag; the counts, intervals and the McNemar p-value against the
  champion are tags too.

An ONNX file already registered (same SHA-256) is not registered again.
``python -m pipeline.registry list`` prints the registered students side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustkd.stats import discordant_pairs, mcnemar_exact_counts
from services.results import per_image_path, read_evaluation
from services.params import load_params
from services.tables import (ATTACK_COLUMNS, HEADLINE, LARGER_SET, TABLE_COLUMNS, WORST, headline, headline_words,
                             images_of, larger_label, larger_set, onnx_block_reason)
from services.tracking import MLFLOW_ENV, MODEL_TRAINING_VIEW, filter_literal, git_commit, keep_environment, setup_mlflow

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    alias: str
    reason: str


# What makes two evaluations comparable: the same dataset, the same images (for AutoAttack,
# the images it ran on) and the same threat model. Each is a version tag.
COMPARABILITY_TAGS = ("dataset", "autoattack_images_sha256", "threat_model")
GROUP_TAG = "comparison_group"
PROMOTION_RULES = ("point_estimate", "significant")


def comparison_group(tags: dict) -> str:
    """A short name for the comparability key: versions with equal groups may be ranked."""
    key = "|".join(str(tags.get(k, "")) for k in COMPARABILITY_TAGS)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def group_alias(group: str) -> str:
    return f"{CHAMPION}-{group}"


def incomparable(new_tags: dict, champion_tags: dict) -> str:
    """Why two versions cannot be ranked ("" when they can): the tags that differ."""
    differ = [f"{k} {new_tags.get(k)!s:.16} vs the champion's {champion_tags.get(k)!s:.16}"
              for k in COMPARABILITY_TAGS if str(new_tags.get(k)) != str(champion_tags.get(k))]
    return "; ".join(differ)


def decide_alias(new: dict, champion: dict | None, natural_tolerance: float, promotion: str = "point_estimate",
                 p_value: float | None = None, alpha: float = 0.05, block_onnx: bool = True) -> Decision:
    """Champion or challenger for a new version, from accuracies in percent.

    ``new`` / ``champion``: {"natural": ..., "autoattack": ...}; ``champion`` None when there is none;
    ``new["onnx_attack"]``: the export stage's figures of the ONNX file attacked (``block_onnx``:
    a file less robust than its student, :func:`onnx_block_reason`, stays challenger).
    ``promotion``: "point_estimate" (AutoAttack accuracy >= the champion's) or "significant"
    (also the exact McNemar ``p_value`` of the AutoAttack outcomes on the same images < ``alpha``).
    """
    if promotion not in PROMOTION_RULES:
        raise ValueError(f"registry.promotion: expected one of {PROMOTION_RULES}, found {promotion!r}")
    blocked = onnx_block_reason(new.get("onnx_attack")) if block_onnx else ""
    if blocked:
        return Decision(CHALLENGER, f"not promoted: {blocked} (export.attack.block_promotion)")
    if champion is None:
        return Decision(CHAMPION, "first registered student")
    if new.get("autoattack") is None:
        return Decision(CHALLENGER, "no AutoAttack accuracy for the new version (evaluate.config.attacks)")
    if champion.get("autoattack") is None:
        return Decision(CHAMPION, "the champion has no AutoAttack accuracy")
    aa_new, aa_old = float(new["autoattack"]), float(champion["autoattack"])
    nat_new, nat_old = float(new["natural"]), float(champion["natural"])
    shown_p = f", McNemar p = {p_value:.3g}" if p_value is not None else ""
    if aa_new < aa_old:
        return Decision(CHALLENGER, f"AutoAttack {aa_new:.2f}% < champion's {aa_old:.2f}%{shown_p}")
    if promotion == "significant":
        if p_value is None:
            return Decision(CHALLENGER, "promotion: significant, but no paired outcomes to test against the champion")
        if aa_new == aa_old or p_value >= alpha:
            return Decision(CHALLENGER, f"AutoAttack {aa_new:.2f}% vs {aa_old:.2f}%: not a significant improvement"
                                        f" (McNemar p = {p_value:.3g} >= alpha {alpha:g})")
    if nat_new < nat_old - natural_tolerance:
        return Decision(CHALLENGER, f"natural {nat_new:.2f}% more than {natural_tolerance} points below "
                                    f"the champion's {nat_old:.2f}%")
    return Decision(CHAMPION, f"AutoAttack {aa_new:.2f}% >= {aa_old:.2f}%{shown_p}, natural {nat_new:.2f}% "
                              f"within {natural_tolerance} of {nat_old:.2f}% (promotion: {promotion})")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tag_float(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _version_metrics(version) -> dict:
    return {k: _tag_float(version.tags, k) for k, _ in ATTACK_COLUMNS}


def current_champion(client, model_name: str, alias: str = CHAMPION):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


PER_IMAGE_ARTIFACT = "evaluation/per_image.npz"


def autoattack_outcomes(per_image: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(test-set indices, 1/0 AutoAttack outcomes) from a per-image results file's arrays."""
    if per_image is None or "autoattack" not in per_image:
        return None
    return images_of(per_image, "autoattack"), per_image["autoattack"].astype(bool)


def champion_outcomes(client, version) -> tuple[np.ndarray, np.ndarray] | None:
    """The champion's per-image AutoAttack outcomes, from its registration run's artifact."""
    import tempfile

    import mlflow

    if not version.run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=PER_IMAGE_ARTIFACT,
                                                       dst_path=tmp)
            with np.load(path, allow_pickle=False) as npz:
                return autoattack_outcomes({k: npz[k] for k in npz.files})
    except Exception:  # an older version registered without the artifact: no paired test
        return None


def paired_p_value(new: tuple[np.ndarray, np.ndarray] | None,
                   old: tuple[np.ndarray, np.ndarray] | None) -> tuple[float | None, str]:
    """Exact McNemar p of the AutoAttack outcomes on the same images (None and why when not paired)."""
    if new is None or old is None:
        return None, "per-image AutoAttack outcomes missing"
    if not np.array_equal(new[0], old[0]):
        return None, "not the same images"
    only_new, only_old = discordant_pairs(new[1], old[1])
    return mcnemar_exact_counts(only_new, only_old), f"right only for the new: {only_new}, only for the champion: {only_old}"


def find_registered(client, model_name: str, sha: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = {filter_literal(model_name)}")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("onnx_sha256") == sha), None)


def input_example(n: int = 2, seed: int = 0):
    """What the registered model takes: N x 3 x 32 x 32 float32 RGB in [0, 1] (not normalised; the
    graph normalises). Batch 2, not 1, so nothing reads the example as fixing the batch size."""
    import numpy as np

    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def model_signature(onnx_path: Path):
    """The MLflow signature of the ONNX student: a float32 tensor (-1, 3, 32, 32) in, the logits
    (-1, classes) out (from the file's own output shape)."""
    import numpy as np
    import onnxruntime as ort
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    classes = session.run(None, {session.get_inputs()[0].name: input_example(1)})[0].shape[1]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))


def training_run(client, checkpoint: Path | None, parent_run_id: str | None = None):
    """The MLflow run of the distill stage that wrote ``checkpoint`` (its ``checkpoint_sha256``
    tag; the newest when several wrote the same bytes), else the distill run under
    ``parent_run_id``; None when neither is found."""
    import mlflow

    filters = []
    if checkpoint is not None and Path(checkpoint).is_file():
        filters.append(f"tags.checkpoint_sha256 = {filter_literal(sha256_file(checkpoint))} and tags.stage = 'distill'")
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = {filter_literal(parent_run_id)} and tags.dvc_stage = 'distill'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    for f in filters:
        runs = mlflow.search_runs(experiment_ids=experiments, filter_string=f, order_by=["start_time DESC"],
                                  max_results=1, output_format="list")
        if runs:
            return runs[0]
    return None


def version_description(metrics: dict, tags: dict, train_run=None) -> str:
    """The registered version's description (Markdown, shown by the MLflow UI): method, teacher,
    data, the headline evaluation (every attack and the worst case on the same images, with
    counts and 95% intervals), the cheaper attacks on the larger set as a table of its own, the
    training run and the input format."""
    lines = [f"Student `{tags.get('student')}` distilled with **{tags.get('method')}** from a "
             f"`{tags.get('teacher')}` teacher on {tags.get('dataset')} (profile {tags.get('profile', '-')}); "
             f"checkpoint: {tags.get('checkpoint', 'last')} (distill.select).", ""]
    eps = metrics.get("eps_255")
    threat = (f", L-inf eps {eps:g}/255" if eps is not None else "") \
        + ("; FLAGGED by the evaluation checks" if str(tags.get("eval_flagged")) in ("1", "True") else "")
    block = metrics.get(HEADLINE)
    if block and block.get("accuracy"):
        n = block["images"]
        lines += [f"Evaluation, every attack on the same {n} test images ({tags.get('eval_subset', '-')}, images "
                  f"sha256 `{str(tags.get('eval_images_sha256', '-'))[:16]}`){threat}; the worst case is per "
                  "image over these attacks:", "",
                  "| attack | accuracy (%) | 95% Wilson interval | correct / images |", "|---|---|---|---|"]
        lines += [_record_line(label, rec) for k, label in TABLE_COLUMNS if (rec := block["accuracy"].get(k))]
        lines.append("")
        larger = metrics.get(LARGER_SET)
        if larger and larger.get("accuracy"):
            m = larger["images"]
            lines += [f"Cheaper attacks on the larger set ({m} test images; not AutoAttack, not comparable with "
                      "the table above):", "",
                      "| attack | accuracy (%) | 95% Wilson interval | correct / images |", "|---|---|---|---|"]
            lines += [_record_line(larger_label(label, m), rec) for k, label in ATTACK_COLUMNS
                      if (rec := larger["accuracy"].get(k))]
            lines.append("")
    elif any(metrics.get(k) is not None for k, _ in ATTACK_COLUMNS):
        records = metrics.get("accuracy") or {}
        lines += [f"Evaluation{threat}; no per-image outcomes to put the attacks on the same images: each "
                  "attack on its own count of images, no worst case:", "",
                  "| attack | accuracy (%) | 95% Wilson interval | correct / images |", "|---|---|---|---|"]
        lines += [_record_line(label, records[k]) if k in records else f"| {label} | {float(metrics[k]):.2f} | - | - |"
                  for k, label in ATTACK_COLUMNS if metrics.get(k) is not None]
        lines.append("")
    attacked = metrics.get("onnx_attack")
    if attacked:
        n = attacked["robust_images"]
        lines += [f"The deployed file attacked, on {n} of the headline images (Square: "
                  f"{attacked.get('square_queries')} queries on the ONNX session; PGD-20 crafted on PyTorch):", "",
                  "| attack | accuracy (%) | 95% Wilson interval | correct / images |", "|---|---|---|---|"]
        lines += [_record_line(f"{key} on {n}", rec) for key in ONNX_ATTACK_KEYS
                  if (rec := attacked.get(f"{key}_accuracy"))]
        lines.append("")
    if train_run is not None:
        lines += [f"Training run: [{train_run.info.run_name or 'distill'} ({train_run.info.run_id})]"
                  f"(#/experiments/{train_run.info.experiment_id}/runs/{train_run.info.run_id}"
                  f"{MODEL_TRAINING_VIEW}).", ""]
    lines.append("Input: float32 N x 3 x 32 x 32, RGB in [0, 1], not normalised. Output: logits N x classes; "
                 "the class names are in the ONNX metadata (`classes`).")
    return "\n".join(lines)


def _record_line(label: str, rec: dict) -> str:
    return (f"| {label} | {rec['percent']:.2f} | [{rec['ci95_low']:.1f}, {rec['ci95_high']:.1f}] | "
            f"{rec['correct']}/{rec['total']} |")


def with_blocks(metrics: dict, per_image: dict | None) -> dict:
    """``metrics`` with its headline and larger-set blocks (computed from ``per_image`` when the
    results predate them; unchanged without either)."""
    if metrics.get(HEADLINE) or per_image is None:
        return metrics
    return {**metrics, HEADLINE: headline(metrics, per_image), LARGER_SET: larger_set(metrics, per_image)}


def on_headline(metrics: dict) -> dict:
    """The figures a version is tagged and ranked by: every attack's accuracy, its record and the
    worst case from the headline block (the same images), when there is one."""
    block = metrics.get(HEADLINE)
    if not (block and block.get("accuracy")):
        return metrics
    return {**metrics, **{k: rec["percent"] for k, rec in block["accuracy"].items()},
            "accuracy": block["accuracy"], "num_images": block["images"]}


def register_onnx(onnx_path: Path, metrics: dict, tags: dict, model_name: str, natural_tolerance: float,
                  parent_run_id: str | None = None, log=print, promotion: str = "point_estimate",
                  alpha: float = 0.05, per_image: Path | None = None, checkpoint: Path | None = None,
                  block_onnx: bool = True) -> tuple[str, Decision | None]:
    """Register ``onnx_path`` (unless already registered); returns (version, decision or None).

    ``metrics``: {attack: percent}, optionally "accuracy" (counts and intervals as in
    metrics/evaluate/student.json) and "eps_255". The new version is ranked only against a champion
    of its comparison group (same dataset, AutoAttack images and threat model); ``per_image``: its
    per-image evaluation outcomes, kept with the version for the McNemar test of later versions
    against it; ``checkpoint``: the torch checkpoint the ONNX file was exported from, to link the
    version to its training run; ``metrics["onnx_attack"]``: the ONNX file attacked (metrics/export.json),
    tagged and, with ``block_onnx``, a file less robust than its student is not promoted.
    """
    import mlflow
    import onnx

    client = mlflow.MlflowClient()
    sha = sha256_file(onnx_path)
    existing = find_registered(client, model_name, sha)
    if existing is not None:
        log(f"{onnx_path} (sha256 {sha[:12]}) is already version {existing.version} of {model_name}: "
            "nothing registered")
        return str(existing.version), None
    metrics = with_blocks(metrics, read_npz(per_image))
    version_tags = {**{k: str(v) for k, v in tags.items()},
                    **{k: f"{metrics[k]:.2f}" for k, _ in TABLE_COLUMNS if metrics.get(k) is not None},
                    **block_tags(metrics), **onnx_attack_tags(metrics.get("onnx_attack")), "onnx_sha256": sha}
    version_tags[GROUP_TAG] = comparison_group(version_tags)
    train_run = training_run(client, checkpoint, parent_run_id)
    if train_run is not None:
        version_tags.update(training_run_id=train_run.info.run_id)
        log_evaluation_on_training_run(client, train_run.info.run_id, metrics)
    with keep_environment(*MLFLOW_ENV), mlflow.start_run(
            run_name="register", parent_run_id=parent_run_id,
            tags={"stage": "register", "git_commit": tags.get("git_commit", ""),
                  **({"training_run_id": train_run.info.run_id} if train_run is not None else {})}):
        mlflow.log_metrics({k: float(metrics[k]) for k, _ in TABLE_COLUMNS if metrics.get(k) is not None})
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="student",
                                     registered_model_name=model_name,
                                     onnx_execution_providers=["CPUExecutionProvider"],
                                     pip_requirements=["onnx==1.23.2", "onnxruntime==1.32.0"],
                                     signature=model_signature(onnx_path), input_example=input_example(),
                                     save_as_external_data=False)
        if per_image is not None and Path(per_image).is_file():
            mlflow.log_artifact(str(per_image), artifact_path=Path(PER_IMAGE_ARTIFACT).parent.as_posix())
    version = str(info.registered_model_version)
    for k, v in version_tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    client.update_model_version(model_name, version, description=version_description(metrics, tags, train_run))
    if not client.get_registered_model(model_name).description:
        client.update_registered_model(model_name, description=(
            "Adversarially robust distilled CIFAR students (ONNX, onnxruntime), registered by the robustkd "
            "pipeline. Alias `champion`: the version served; it moves only to a version at least as robust "
            "under AutoAttack and within `registry.natural_tolerance` of its natural accuracy; otherwise "
            "`challenger`. Versions are ranked only within their comparison group (dataset, AutoAttack "
            "images, threat model): `champion-<group>` / `challenger-<group>` for other groups. Each "
            "version's description has its method, teacher, data and evaluation."))
    decision = rank_version(client, model_name, version, version_tags, metrics, natural_tolerance, promotion,
                            alpha, per_image, block_onnx)
    log(f"{model_name} version {version} -> {decision.alias}: {decision.reason}")
    return version, decision


def rank_version(client, model_name: str, version: str, version_tags: dict, metrics: dict,
                 natural_tolerance: float, promotion: str, alpha: float, per_image: Path | None,
                 block_onnx: bool = True) -> Decision:
    """Set the new version's alias: ``champion``/``challenger`` against a comparable champion;
    with a champion of another comparison group, its own group's ``champion-<group>`` alias."""
    group = version_tags[GROUP_TAG]
    champion = current_champion(client, model_name)
    why_not = incomparable(version_tags, champion.tags) if champion is not None else ""
    in_group = current_champion(client, model_name, group_alias(group)) if why_not else champion
    outcomes = autoattack_outcomes(read_npz(per_image))
    p_value, pairing = (paired_p_value(outcomes, champion_outcomes(client, in_group)) if in_group is not None
                        else (None, "no champion to test against"))
    decision = decide_alias(metrics, _version_metrics(in_group) if in_group else None, natural_tolerance,
                            promotion, p_value, alpha, block_onnx)
    if why_not:  # ranked within its own group only; the main champion stays
        alias = group_alias(group) if decision.alias == CHAMPION else f"{CHALLENGER}-{group}"
        decision = Decision(alias, f"not comparable with the champion ({why_not}); within its group "
                                   f"{group}: {decision.reason}")
    elif decision.alias == CHAMPION:  # the champion is also its group's champion
        client.set_registered_model_alias(model_name, group_alias(group), version)
    client.set_registered_model_alias(model_name, decision.alias, version)
    client.set_model_version_tag(model_name, version, "alias_reason", decision.reason)
    if p_value is not None:
        client.set_model_version_tag(model_name, version, "autoattack_mcnemar_p_vs_champion", f"{p_value:.4g}")
    client.set_model_version_tag(model_name, version, "paired_with_champion", pairing)
    return decision


def read_npz(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def interval_tags(metrics: dict) -> dict:
    """{"<attack>_ci95": "[low, high]", "<attack>_count": "k/n"}: each accuracy's 95% Wilson
    interval in percent and its count."""
    records = metrics.get("accuracy") or {}
    out = {f"{k}_ci95": f"[{records[k]['ci95_low']:.2f}, {records[k]['ci95_high']:.2f}]"
           for k, _ in TABLE_COLUMNS if k in records}
    out.update({f"{k}_count": f"{records[k]['correct']}/{records[k]['total']}"
                for k, _ in TABLE_COLUMNS if k in records})
    return out


ONNX_ATTACK_KEYS = ("onnx_natural", "onnx_square", "onnx_pgd20_transfer", "torch_natural", "torch_pgd20")


def onnx_attack_tags(attacked: dict | None) -> dict:
    """The ONNX file attacked (metrics/export.json): {"onnx_square": "31.00", "onnx_square_ci95":
    "[22.8, 40.6]", "onnx_square_count": "31/100", ...}, the image count, Square's queries and
    whether the promotion rule blocks the version; {} for an export without them."""
    if not attacked:
        return {}
    out = {"onnx_attack_images": str(attacked.get("robust_images")),
           "onnx_square_queries": str(attacked.get("square_queries")),
           "onnx_blocked": "1" if onnx_block_reason(attacked) else "0"}
    for key in ONNX_ATTACK_KEYS:
        if (rec := attacked.get(f"{key}_accuracy")):
            out.update({key: f"{rec['percent']:.2f}", f"{key}_ci95": f"[{rec['ci95_low']:.2f}, {rec['ci95_high']:.2f}]",
                        f"{key}_count": f"{rec['correct']}/{rec['total']}"})
    return out


def read_onnx_attack(path: Path) -> dict | None:
    """The attack figures of the export stage's ``metrics/export.json`` (None when absent or from
    an export that did not attack the file)."""
    import json

    if not Path(path).is_file():
        return None
    figures = json.loads(Path(path).read_text())
    return figures if "robust_images" in figures else None


def log_evaluation_on_training_run(client, run_id: str, metrics: dict) -> None:
    """The student's headline evaluation (every attack on the same images, ``eval_<attack>`` and
    ``eval_images``) on the distill run that trained it, so that MLflow's own run comparison puts
    two students side by side with their robustness, not only their training losses."""
    figures = {f"eval_{k}": float(metrics[k]) for k, _ in TABLE_COLUMNS if metrics.get(k) is not None}
    block = metrics.get(HEADLINE)
    if block:
        figures["eval_images"] = float(block["images"])
    for key, value in figures.items():
        client.log_metric(run_id, key, value)


def block_tags(metrics: dict) -> dict:
    """The image counts of the two blocks and the larger set's figures, each named with its count
    ("pgd20_on_1000": "19.60 [17.26, 22.17]"): never mixed with the headline tags."""
    out = {}
    block, larger = metrics.get(HEADLINE), metrics.get(LARGER_SET)
    if block:
        out["headline_images"] = str(block["images"])
    if larger:
        m = larger["images"]
        out["larger_set_images"] = str(m)
        out.update({f"{k}_on_{m}": f"{r['percent']:.2f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
                    for k, r in larger["accuracy"].items() if k != WORST})
    return out


def workspace_metadata(root: Path) -> tuple[dict, dict]:
    """(accuracies, tags) of the pipeline's student from its evaluation results and ONNX metadata."""
    import onnx

    onnx_path = root / "models/student.onnx"
    select = load_params(root / "params.yaml").distill.select   # last | best: the checkpoint exported
    eval_path = root / f"metrics/evaluate/{'student_best' if select == 'best' else 'student'}.json"
    for p in (onnx_path, eval_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} missing: run the pipeline (make run / dvc repro) first")
    metrics = on_headline(with_blocks(read_evaluation(eval_path), read_npz(per_image_path(eval_path))))
    info = metrics["info"]
    subset = info.get("subset", {})
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    params = load_params(root / "params.yaml")
    aa_subset = (info.get("attack_subsets") or {}).get("autoattack", subset)
    on_aa = metrics.get(HEADLINE) and metrics["num_images"] == aa_subset.get("num_images")
    shown = aa_subset if on_aa else subset   # the images of the headline block
    threat = info.get("threat_model") or {}
    tags = {"method": props.get("method", info.get("method")), "student": props.get("arch", info.get("arch")),
            "teacher": props.get("teacher_arch"), "dataset": props.get("dataset", params.data.source),
            "profile": params.profile, "eval_images": metrics.get("num_images"),
            "eval_subset": headline_words(metrics) if metrics.get(HEADLINE) else subset.get("description"),
            "eval_images_sha256": shown.get("images_sha256"),
            "autoattack_subset": aa_subset.get("description"),
            "autoattack_images_sha256": aa_subset.get("images_sha256"),
            "threat_model": f"{threat.get('norm', 'Linf')} eps={threat.get('eps_255', metrics.get('eps_255'))}/255",
            "eval_flagged": metrics.get("flagged", 0), **interval_tags(metrics), "git_commit": git_commit(root),
            "checkpoint": select}
    return {**{k: metrics.get(k) for k, _ in TABLE_COLUMNS}, "accuracy": metrics.get("accuracy") or {},
            "eps_255": metrics.get("eps_255"), HEADLINE: metrics.get(HEADLINE),
            LARGER_SET: metrics.get(LARGER_SET), "onnx_attack": read_onnx_attack(root / "metrics/export.json")}, tags


def register_workspace(root: Path = Path("."), parent_run_id: str | None = None, log=print):
    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    setup_mlflow(root)
    metrics, tags = workspace_metadata(root)
    stem = "student_best" if tags["checkpoint"] == "best" else "student"   # distill.select
    return register_onnx(root / "models/student.onnx", metrics, tags, params.registry.model_name,
                         params.registry.natural_tolerance, parent_run_id=parent_run_id, log=log,
                         promotion=params.registry.promotion, alpha=params.registry.alpha,
                         per_image=per_image_path(root / f"metrics/evaluate/{stem}.json"),
                         checkpoint=root / f"models/{stem}.pt", block_onnx=params.export.attack.block_promotion)


def _shown(tags: dict, key: str) -> str:
    """"52.3 [42.4-61.9]" when the version has the interval, else the accuracy alone."""
    value = tags.get(key, "-")
    bounds = re.findall(r"-?\d+(?:\.\d+)?", tags.get(key + "_ci95", ""))
    try:
        return f"{float(value):.1f} [{float(bounds[0]):.1f}-{float(bounds[1]):.1f}]" if len(bounds) == 2 \
            else f"{float(value):.1f}"
    except ValueError:
        return str(value)


def _images(tags: dict) -> str:
    """The one image count of a version's row: every column on these images ("mixed" for a
    version registered before the headline block, whose columns had their own counts)."""
    if "headline_images" in tags:
        return tags["headline_images"]
    totals = {tags[f"{k}_count"].split("/")[-1] for k, _ in ATTACK_COLUMNS if f"{k}_count" in tags}
    return totals.pop() if len(totals) == 1 else "mixed: " + "/".join(sorted(totals))


# the columns printed once above the table when every version has the same value
SHARED_COLUMNS = ("method", "student", "teacher", "dataset", "group")


def students_lines(versions: list, aliases: dict[str, list[str]]) -> list[str]:
    """The registered versions (newest first) as an aligned text table: the columns every version
    shares on one line above it, so that a row fits a terminal (issue 28: under 200 characters);
    accuracy (%) [95% Wilson interval], all columns of a row on its ``images``."""
    head = (["version", "aliases", "method", "student", "teacher", "dataset", "group"]
            + [label for _, label in TABLE_COLUMNS] + ["images", "p vs champion", "flagged"])
    rows = []
    for v in versions:
        t = v.tags
        rows.append([str(v.version), ",".join(aliases.get(str(v.version), [])) or "-", t.get("method", "-"),
                     t.get("student", "-"), t.get("teacher", "-"), t.get("dataset", "-"), t.get(GROUP_TAG, "-")]
                    + [_shown(t, k) for k, _ in TABLE_COLUMNS]
                    + [_images(t), t.get("autoattack_mcnemar_p_vs_champion", "-"), str(t.get("eval_flagged", "-"))])
    if not rows:
        return ["no registered versions"]
    shared = [i for i, name in enumerate(head) if name in SHARED_COLUMNS and len({r[i] for r in rows}) == 1]
    lines = (["every version: " + ", ".join(f"{head[i]} {rows[0][i]}" for i in shared)] if shared else [])
    keep = [i for i in range(len(head)) if i not in shared]
    table = [[row[i] for i in keep] for row in [head] + rows]
    widths = [max(len(r[j]) for r in table) for j in range(len(keep))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return lines + [text[0], "-" * len(text[0])] + text[1:]


def students_table(model_name: str) -> str:
    """Registered versions side by side (newest first), as an aligned text table."""
    import mlflow

    client = mlflow.MlflowClient()
    versions = sorted(client.search_model_versions(f"name = {filter_literal(model_name)}"), key=lambda v: -int(v.version))
    aliases: dict[str, list[str]] = {}
    if versions:  # search results leave aliases empty: take them from the registered model
        for alias, version in client.get_registered_model(model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    return "\n".join(students_lines(versions, aliases))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["register", "list"])
    p.add_argument("--root", default=".", help="project directory (default: .)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    if args.command == "register":
        try:
            register_workspace(root)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        setup_mlflow(root)
        print(students_table(load_params(root / "params.yaml").registry.model_name))


if __name__ == "__main__":
    main()
