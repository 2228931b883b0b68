"""The MLflow model registry of ONNX students: register, promote, compare.

``python -m pipeline.registry register`` registers ``models/student.onnx`` (MLflow's ONNX flavour)
with a signature (float32 N x 3 x 32 x 32 in [0, 1] -> logits) and an input example, a description
(method, teacher, data, evaluation with 95% intervals, a link to the distill stage's training run)
and tags for method, student, teacher, dataset, each attack's accuracy and its 95% Wilson interval,
the evaluated subset's hash, whether the evaluation was flagged and the training run's id, then
decides its alias:

- ``champion`` moves to the new version only if its AutoAttack accuracy is at least the current
  champion's and its natural accuracy is within ``registry.natural_tolerance`` percentage points of
  the champion's (the first version becomes champion);
- otherwise the new version gets ``challenger``, and the reason is logged and kept in the
  version's ``alias_reason`` tag.

An ONNX file already registered (same SHA-256) is not registered again.
``python -m pipeline.registry list`` prints the registered students side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from services.results import read_evaluation
from services.params import load_params
from services.tables import ATTACK_COLUMNS
from services.tracking import MLFLOW_ENV, git_commit, keep_environment, setup_mlflow

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    alias: str
    reason: str


def decide_alias(new: dict, champion: dict | None, natural_tolerance: float) -> Decision:
    """Champion or challenger for a new version, from accuracies in percent.

    ``new`` / ``champion``: {"natural": ..., "autoattack": ...}; ``champion`` None when there is none.
    """
    if champion is None:
        return Decision(CHAMPION, "first registered student")
    if new.get("autoattack") is None:
        return Decision(CHALLENGER, "no AutoAttack accuracy for the new version (evaluate.config.attacks)")
    if champion.get("autoattack") is None:
        return Decision(CHAMPION, "the champion has no AutoAttack accuracy")
    aa_new, aa_old = float(new["autoattack"]), float(champion["autoattack"])
    nat_new, nat_old = float(new["natural"]), float(champion["natural"])
    if aa_new < aa_old:
        return Decision(CHALLENGER, f"AutoAttack {aa_new:.2f}% < champion's {aa_old:.2f}%")
    if nat_new < nat_old - natural_tolerance:
        return Decision(CHALLENGER, f"natural {nat_new:.2f}% more than {natural_tolerance} points below "
                                    f"the champion's {nat_old:.2f}%")
    return Decision(CHAMPION, f"AutoAttack {aa_new:.2f}% >= {aa_old:.2f}%, natural {nat_new:.2f}% within "
                              f"{natural_tolerance} of {nat_old:.2f}%")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tag_float(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _version_metrics(version) -> dict:
    return {k: _tag_float(version.tags, k) for k, _ in ATTACK_COLUMNS}


def current_champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def find_registered(client, model_name: str, sha: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
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
        filters.append(f"tags.checkpoint_sha256 = '{sha256_file(checkpoint)}' and tags.stage = 'distill'")
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.dvc_stage = 'distill'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    for f in filters:
        runs = mlflow.search_runs(experiment_ids=experiments, filter_string=f, order_by=["start_time DESC"],
                                  max_results=1, output_format="list")
        if runs:
            return runs[0]
    return None


def version_description(metrics: dict, tags: dict, train_run=None) -> str:
    """The registered version's description (Markdown, shown by the MLflow UI): method, teacher,
    data, evaluation with 95% intervals, the training run and the input format."""
    lines = [f"Student `{tags.get('student')}` distilled with **{tags.get('method')}** from a "
             f"`{tags.get('teacher')}` teacher on {tags.get('dataset')} (profile {tags.get('profile', '-')}).", ""]
    records = metrics.get("accuracy") or {}
    shown = [(k, label) for k, label in ATTACK_COLUMNS if metrics.get(k) is not None]
    if shown:
        eps = metrics.get("eps_255")
        lines += [f"Evaluation on {tags.get('eval_images', '-')} test images ({tags.get('eval_subset', '-')}, "
                  f"images sha256 `{str(tags.get('eval_images_sha256', '-'))[:16]}`)"
                  + (f", L-inf eps {eps:g}/255" if eps is not None else "")
                  + ("; FLAGGED by the evaluation checks" if str(tags.get("eval_flagged")) in ("1", "True") else "")
                  + ":", "", "| attack | accuracy (%) | 95% Wilson interval |", "|---|---|---|"]
        for k, label in shown:
            rec = records.get(k)
            ci = f"[{rec['ci95_low']:.1f}, {rec['ci95_high']:.1f}]" if rec else "-"
            lines.append(f"| {label} | {float(metrics[k]):.2f} | {ci} |")
        lines.append("")
    if train_run is not None:
        lines += [f"Training run: [{train_run.info.run_name or 'distill'} ({train_run.info.run_id})]"
                  f"(#/experiments/{train_run.info.experiment_id}/runs/{train_run.info.run_id}).", ""]
    lines.append("Input: float32 N x 3 x 32 x 32, RGB in [0, 1], not normalised. Output: logits N x classes; "
                 "the class names are in the ONNX metadata (`classes`).")
    return "\n".join(lines)


def register_onnx(onnx_path: Path, metrics: dict, tags: dict, model_name: str, natural_tolerance: float,
                  parent_run_id: str | None = None, log=print, checkpoint: Path | None = None,
                  ) -> tuple[str, Decision | None]:
    """Register ``onnx_path`` (unless already registered); returns (version, decision or None).

    ``metrics``: {attack: percent}, optionally "accuracy" (counts and intervals as in
    metrics/evaluate/student.json) and "eps_255"; ``checkpoint``: the torch checkpoint the ONNX file
    was exported from, to link the version to its training run."""
    import mlflow
    import onnx

    client = mlflow.MlflowClient()
    sha = sha256_file(onnx_path)
    existing = find_registered(client, model_name, sha)
    if existing is not None:
        log(f"{onnx_path} (sha256 {sha[:12]}) is already version {existing.version} of {model_name}: "
            "nothing registered")
        return str(existing.version), None
    version_tags = {**{k: str(v) for k, v in tags.items()},
                    **{k: f"{metrics[k]:.2f}" for k, _ in ATTACK_COLUMNS if metrics.get(k) is not None},
                    "onnx_sha256": sha}
    train_run = training_run(client, checkpoint, parent_run_id)
    if train_run is not None:
        version_tags.update(training_run_id=train_run.info.run_id)
    with keep_environment(*MLFLOW_ENV), mlflow.start_run(
            run_name="register", parent_run_id=parent_run_id,
            tags={"stage": "register", "git_commit": tags.get("git_commit", ""),
                  **({"training_run_id": train_run.info.run_id} if train_run is not None else {})}):
        mlflow.log_metrics({k: float(metrics[k]) for k, _ in ATTACK_COLUMNS if metrics.get(k) is not None})
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="student",
                                     registered_model_name=model_name,
                                     onnx_execution_providers=["CPUExecutionProvider"],
                                     pip_requirements=["onnx==1.23.2", "onnxruntime==1.32.0"],
                                     signature=model_signature(onnx_path), input_example=input_example(),
                                     save_as_external_data=False)
    version = str(info.registered_model_version)
    for k, v in version_tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    client.update_model_version(model_name, version, description=version_description(metrics, tags, train_run))
    if not client.get_registered_model(model_name).description:
        client.update_registered_model(model_name, description=(
            "Adversarially robust distilled CIFAR students (ONNX, onnxruntime), registered by the robustkd "
            "pipeline. Alias `champion`: the version served; it moves only to a version at least as robust "
            "under AutoAttack and within `registry.natural_tolerance` of its natural accuracy; otherwise "
            "`challenger`. Each version's description has its method, teacher, data and evaluation."))
    champion = current_champion(client, model_name)
    decision = decide_alias(metrics, _version_metrics(champion) if champion else None, natural_tolerance)
    client.set_registered_model_alias(model_name, decision.alias, version)
    client.set_model_version_tag(model_name, version, "alias_reason", decision.reason)
    log(f"{model_name} version {version} -> {decision.alias}: {decision.reason}")
    return version, decision


def interval_tags(metrics: dict) -> dict:
    """{"<attack>_ci95": "[low, high]"}: each accuracy's 95% Wilson interval, in percent."""
    records = metrics.get("accuracy") or {}
    return {f"{k}_ci95": f"[{records[k]['ci95_low']:.2f}, {records[k]['ci95_high']:.2f}]"
            for k, _ in ATTACK_COLUMNS if k in records}


def workspace_metadata(root: Path) -> tuple[dict, dict]:
    """(accuracies, tags) of the pipeline's student from its evaluation results and ONNX metadata."""
    import onnx

    onnx_path = root / "models/student.onnx"
    eval_path = root / "metrics/evaluate/student.json"
    for p in (onnx_path, eval_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} missing: run the pipeline (make run / dvc repro) first")
    metrics = read_evaluation(eval_path)
    info = metrics["info"]
    subset = info.get("subset", {})
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    params = load_params(root / "params.yaml")
    tags = {"method": props.get("method", info.get("method")), "student": props.get("arch", info.get("arch")),
            "teacher": props.get("teacher_arch"), "dataset": props.get("dataset", params.data.source),
            "profile": params.profile, "eval_images": metrics.get("num_images"),
            "eval_subset": subset.get("description"), "eval_images_sha256": subset.get("images_sha256"),
            "eval_flagged": metrics.get("flagged", 0), **interval_tags(metrics), "git_commit": git_commit(root)}
    return {**{k: metrics.get(k) for k, _ in ATTACK_COLUMNS}, "accuracy": metrics.get("accuracy") or {},
            "eps_255": metrics.get("eps_255")}, tags


def register_workspace(root: Path = Path("."), parent_run_id: str | None = None, log=print):
    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    setup_mlflow(root)
    metrics, tags = workspace_metadata(root)
    return register_onnx(root / "models/student.onnx", metrics, tags, params.registry.model_name,
                         params.registry.natural_tolerance, parent_run_id=parent_run_id, log=log,
                         checkpoint=root / "models/student.pt")


def _shown(tags: dict, key: str) -> str:
    """"52.26 [42.41, 61.94]" when the version has the interval, else the accuracy alone."""
    value = tags.get(key, "-")
    return f"{value} {tags[key + '_ci95']}" if key + "_ci95" in tags else value


def students_table(model_name: str) -> str:
    """Registered versions side by side (newest first), as a Markdown table."""
    import mlflow

    client = mlflow.MlflowClient()
    versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: -int(v.version))
    aliases: dict[str, list[str]] = {}
    if versions:  # search results leave aliases empty: take them from the registered model
        for alias, version in client.get_registered_model(model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    header = (["version", "aliases", "method", "student", "teacher", "dataset"] + [label for _, label in ATTACK_COLUMNS]
              + ["flagged"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in versions:
        t = v.tags
        cells = [v.version, ",".join(aliases.get(str(v.version), [])) or "-", t.get("method", "-"), t.get("student", "-"),
                 t.get("teacher", "-"), t.get("dataset", "-")] + [_shown(t, k) for k, _ in ATTACK_COLUMNS] \
            + [t.get("eval_flagged", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


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
