"""Stage evaluate: natural, PGD-20, CW-inf and AutoAttack (standard) accuracy of the teacher and
the student (and the non-adversarial reference student) on the stratified test subset
"first k per class", with the protocol's checks (docs/methods.md, "Attacks and evaluation").

Writes, per model, next to each other (``metrics/evaluate/<model>``):

- ``<model>.json``: the headline table's numbers only (a DVC metrics file, services/results.py
  split_headline): each attack's percentage and the worst case on the same images (those
  AutoAttack ran on), their count, the failed checks, "flagged";
- ``<model>_details.json``: every number (a plain output): each attack's accuracy on every image
  it ran on, counts, totals and 95% Wilson intervals under "accuracy", per-class accuracy, the
  checks as 1/0, the gradient-masking figures, the report's two table blocks;
- ``<model>_info.json``: the words: model, method, the subset's identity (indices and image
  SHA-256), the threat model, the attack settings, each check's verdict and reason;
- ``<model>_per_image.npz``: per-image outcomes (no pickle), for McNemar tests between models.

A failed check flags the results and is printed; with ``evaluate.config.fail_on_check`` the
stage then exits 1, after every model's results are written.
"""

from __future__ import annotations

import sys
from typing import cast
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from robustkd.capability import resolve_fast_path
from robustkd.errors import InputError
from robustkd.data import to_float
from robustkd.evaluation import (PROTOCOLS, WORST_CASE, EvaluationResult, attack_settings, check_details,
                                 evaluate_model, sha256_tensor, summarize)
from robustkd.checkpoints import load_checkpoint

from services.best_last import best_name, evaluate_best, remove_unlisted_best
from services.results import (autoattack_positions, details_path, evaluated_indices, info_path, per_image_path,
                              read_per_image, split_headline)
from services.tables import table_blocks
from services.common import (METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params, save_arrays,
                     setup_distributed, write_json, write_stage_config)


def subset_identity(params, indices: torch.Tensor, images: torch.Tensor, k: int | None = None) -> dict:
    """What was evaluated, exactly: two runs on the same images have the same two hashes."""
    return {"dataset": params.data.source, "split": "test", "per_class": k, "num_images": int(len(indices)),
            "description": (f"first {k} per class" if k is not None else "full test set")
            + (f", its first {params.evaluate.max_images}" if params.evaluate.max_images else ""),
            "indices_of": str(PREPARED / "test.npz"),
            "indices_sha256": sha256_tensor(indices.to(torch.int64)),
            "images_sha256": sha256_tensor(images)}


def subset_hashes(identity: dict) -> dict:
    """Of a subset's identity, what the stage's configuration records: its size and two hashes."""
    return {key: identity[key] for key in ("num_images", "indices_sha256", "images_sha256")}


def evaluate_file(model_path: Path, out_path: Path, params, attacks: list[str], device, tracker,
                  dist_info=None) -> EvaluationResult:
    """Evaluate one checkpoint; under torchrun each rank attacks its share of the batches and
    rank 0 writes the gathered results."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    test = load_imageset(PREPARED / "test.npz")
    if rank == 0:
        tracker.log_imageset(test, PREPARED / "test.npz", "test", "testing")
    k = params.evaluate.per_class
    indices = evaluated_indices(params, test.labels, test.num_classes)
    test = test.subset(indices)
    model = load_checkpoint(model_path).to(device)
    separate = load_checkpoint(model_path)  # loaded again: recomputes each attack's accuracy, never attacked
    attacked = compiled_for_attacks(model, params.evaluate.compile, device, rank == 0)
    cfg = replace(params.evaluate.config, attacks=list(attacks), seed=params.run.seed)
    if rank == 0:
        print(f"evaluating {model_path} ({model.arch}) on {len(test)} test images: {attacks}"
              + (f" over {world} processes" if world > 1 else ""))
        print(protocol_line(params.evaluate))
    subsets = autoattack_positions(params, test.labels, test.num_classes, attacks)
    if rank == 0 and subsets:
        print(f"autoattack on the first {params.evaluate.autoattack_per_class} of each class: "
              f"{len(subsets['autoattack'])} of {len(test)} images")
    result = evaluate_model(attacked, to_float(test.images), test.labels, cfg, device,
                            log=print if rank == 0 else (lambda *_: None), rank=rank, world_size=world,
                            reference=separate, subsets=subsets,
                            progress=sys.stderr if rank == 0 and params.evaluate.progress else None)
    if rank != 0:
        return result
    summary = summarize(result, test.labels, test.classes)
    summary.update(eps=cfg.eps, eps_255=round(cfg.eps * 255, 4), processes=world)
    if k is not None:
        summary["per_class"] = k
    subset = subset_identity(params, indices, test.images, k)
    attack_subsets = {name: subset_identity(params, indices[pos], test.images[pos], params.evaluate.autoattack_per_class)
                      for name, pos in result.positions.items()}
    info = {"model": str(model_path), "arch": model.arch, "method": model.checkpoint_meta.get("method"),
            "optimiser": model.checkpoint_meta.get("optimiser"), "subset": subset, "attack_subsets": attack_subsets,
            "threat_model": {"norm": "Linf", "eps": cfg.eps, "eps_255": round(cfg.eps * 255, 4)},
            "attacks": attack_settings(cfg), "config": asdict(cfg),
            "intervals": "95% Wilson score intervals (robustkd/stats.py)",
            "reported": "an image wrong without attack counts as wrong under every attack",
            "checks": check_details(result), "failed_checks": result.failed,
            "autoattack_warnings": result.autoattack_warnings, "flagged": result.flagged,
            "protocol": protocol_record(params.evaluate),
            # what ran through torch.compile (the natural forward at most: every attack and check
            # runs on the eager module, so the verdict is the eager model's), and in what precision
            "compiled_parts": result.compiled_parts, "precision": result.precision, "processes": world,
            "speed": {name: {"images": result.images_of_attack(name), "seconds": round(sec, 3),
                             "images_per_s": round(result.images_of_attack(name) / max(sec, 1e-9), 2)}
                      for name, sec in result.seconds.items()},
            "per_image": per_image_path(out_path).name}
    save_per_image(result, indices, test.labels, per_image_path(out_path))
    # the report's two tables: every column on the same images, and the cheaper attacks on all
    summary.update({k: b for k, b in table_blocks(summary, read_per_image(out_path)).items() if b is not None})
    numbers, details = split_headline(summary)
    write_json(details, details_path(out_path))
    write_json(info, info_path(out_path))
    write_json(numbers, out_path)   # last: its presence says the three beside it are complete
    tracker.log_params({"evaluated": {model_path.stem: {   # the identity of what was evaluated
        "subset": subset_hashes(subset), **{f"{name}_subset": subset_hashes(s) for name, s in attack_subsets.items()}}}})
    tracker.log_metrics(summary, prefix=f"{model_path.stem}/")
    tracker.log_metrics({f"images_per_s_{k}": v for k, v in result.images_per_s().items()},
                        prefix=f"{model_path.stem}/")
    for path in (out_path, details_path(out_path), info_path(out_path), per_image_path(out_path)):
        tracker.log_artifact(path, "metrics")
    if result.flagged:
        print(f"warning: {model_path} evaluation flagged, failed checks: {', '.join(result.failed)} "
              f"(reasons in {info_path(out_path)})", file=sys.stderr)
    return result


def protocol_line(evaluate) -> str:
    """One line: the protocol, what it means and the evaluate.config keys it replaced."""
    protocol = PROTOCOLS[evaluate.protocol]
    replaced = getattr(evaluate, "protocol_replaced", [])
    return (f"evaluate.protocol {protocol.name}: {protocol.description}"
            + (f" (replaced evaluate.config {', '.join(replaced)})" if replaced else ""))


def protocol_record(evaluate) -> dict:
    """The info file's record of the protocol: name, description, its settings and their sources."""
    protocol = PROTOCOLS[evaluate.protocol]
    return {"name": protocol.name, "description": protocol.description, "settings": dict(protocol.settings),
            "sources": dict(protocol.sources), "replaced": list(getattr(evaluate, "protocol_replaced", []))}


def compiled_for_attacks(model: torch.nn.Module, setting, device, verbose: bool) -> torch.nn.Module:
    """The model evaluated: torch.compile'd where ``evaluate.compile`` (probed first,
    robustkd/capability.py) says so, else the model itself. Only its natural forward runs
    compiled (robustkd.evaluation.compiled_parts: every attack and check unwraps it). Each model
    gets its own compile: dynamo's caches and recompile limit are reset first, so a later model
    of the stage does not fall back to eager silently. Evaluation stays fp32 (TF32 off)."""
    try:
        path = resolve_fast_path(torch.device(device), precision="fp32", channels_last=False, compile=setting)
    except InputError as exc:   # the probe's message names run.compile: this setting is evaluate.compile
        raise InputError(str(exc).replace("run.compile", "evaluate.compile")) from None
    for note in path.notes:
        print(note.replace("run.compile", "evaluate.compile"))
    if not path.compile:
        return model
    if verbose:
        print("evaluate.compile: the natural forward runs compiled (torch.compile, fp32, TF32 off); "
              "the attacks and checks run on the eager module")
    torch._dynamo.reset()
    return cast(torch.nn.Module, torch.compile(model))   # an OptimizedModule: a Module


def save_per_image(result: EvaluationResult, indices: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """Per image: its index in the prepared test set, its label and 1/0 under each attack; an
    attack on a subset (and then the worst case) also gets ``<attack>_index``, its images' indices."""
    arrays = {"index": indices.to(torch.int64).numpy(), "label": labels.to(torch.int64).numpy()}
    arrays.update({name: c.numpy().astype(np.uint8) for name, c in result.correct.items()})
    if result.worst_case is not None:
        arrays[WORST_CASE] = result.worst_case.numpy().astype(np.uint8)
    for name, pos in result.positions.items():
        arrays[f"{name}_index"] = indices[pos].to(torch.int64).numpy()
    save_arrays(path, **arrays)


def check_inputs(model_paths: list[Path]) -> None:
    """The test set and every checkpoint read before the first result is written: a missing,
    truncated or foreign file fails the stage (one line) with every previous result in place
    (the outputs persist, dvc.yaml), not after the teacher's results were replaced."""
    load_imageset(PREPARED / "test.npz")
    for path in model_paths:
        load_checkpoint(path)


def main(args) -> None:
    params = read_params(args)
    dist_info, device = setup_distributed(params)
    attacks = params.evaluate.config.attacks
    if args.model:
        jobs = [(Path(args.model), Path(args.out), args.attacks or attacks)]
        args.config_path = config_path(Path(args.out))
    else:
        out = METRICS / "evaluate"
        jobs = [(MODELS / "teacher.pt", out / "teacher.json", attacks),
                (MODELS / "student.pt", out / "student.json", attacks),
                (MODELS / "reference.pt", out / "reference.json", params.evaluate.reference_attacks)]
    best = [] if args.model else [MODELS / f"{best_name(n)}.pt" for n in params.evaluate.best_checkpoints]
    check_inputs([model for model, _, _ in jobs] + best)
    flagged = [str(model) for model, out_path, names in jobs
               if evaluate_file(model, out_path, params, names, device, args.tracker, dist_info).flagged]
    if not args.model:   # the best held-out checkpoints beside the last (evaluate.best_checkpoints)
        flagged += evaluate_best(
            params.evaluate.best_checkpoints, MODELS, METRICS / "evaluate",
            lambda name: params.evaluate.reference_attacks if name == "reference" else attacks,
            lambda model, out_path, names: evaluate_file(model, out_path, params, names, device, args.tracker,
                                                         dist_info).flagged,
            is_main=dist_info.is_main)
        if dist_info.is_main:
            remove_unlisted_best(METRICS / "evaluate", params.evaluate.best_checkpoints)
    if flagged and params.evaluate.config.fail_on_check:
        write_stage_config(args)   # the results are written (flagged): so is what produced them
        print(f"error: evaluation checks failed for {', '.join(flagged)} (evaluate.config.fail_on_check: true); "
              "results written and flagged", file=sys.stderr)
        raise SystemExit(1)


def config_path(out: Path) -> Path:
    """metrics/compare/rslad_seed0.json -> metrics/compare/rslad_seed0_config.json (--model, --out)."""
    return out.with_name(f"{out.stem}_config.json")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--seed", type=int, help="override run.seed (the comparison pipeline's seeds); recorded as run.seed")
    p.add_argument("--model", help="evaluate this checkpoint only (with --out)")
    p.add_argument("--out", help="headline results JSON written for --model (_details.json, _info.json and "
                                 "_per_image.npz beside it)")
    p.add_argument("--attacks", nargs="*", help="attacks for --model (default: evaluate.config.attacks)")
    return p


run = cli(main, build_parser, "evaluate", ("evaluate", "run"), config=METRICS / "evaluate_config.json")

if __name__ == "__main__":
    run()
