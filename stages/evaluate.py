"""Stage evaluate: natural, PGD-20, CW-inf and AutoAttack (standard) accuracy of the teacher and
the student (and the non-adversarial reference student) on the stratified test subset
"first k per class", with the protocol's checks. Writes metrics/evaluate/<model>.json."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from robustkd.data import stratified_first_k, to_float
from robustkd.evaluation import evaluate_model, summarize
from robustkd.models import load_checkpoint

from .common import METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params, setup_distributed, write_json


def evaluate_file(model_path: Path, out_path: Path, params, attacks: list[str], device, tracker,
                  dist_info=None) -> dict:
    """Evaluate one checkpoint; under torchrun each rank attacks its share of the batches and
    rank 0 writes the gathered totals."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    test = load_imageset(PREPARED / "test.npz")
    k = params.evaluate.per_class
    if k is not None:
        test = test.subset(stratified_first_k(test.labels, k, test.num_classes))
    model = load_checkpoint(model_path).to(device)
    cfg = replace(params.evaluate.config, attacks=list(attacks), seed=params.run.seed)
    if rank == 0:
        print(f"evaluating {model_path} ({model.arch}) on {len(test)} test images: {attacks}"
              + (f" over {world} processes" if world > 1 else ""))
    results = evaluate_model(model, to_float(test.images), test.labels, cfg, device,
                             log=print if rank == 0 else (lambda *_: None), rank=rank, world_size=world)
    summary = summarize(results, test.labels, test.num_classes)
    summary.update({"model": str(model_path), "arch": model.arch, "per_class": k,
                    "subset": f"first {k} per class" if k is not None else "full test set",
                    "method": model.checkpoint_meta.get("method"), "eps": cfg.eps, "processes": world})
    if rank != 0:
        return summary
    write_json(summary, out_path)
    tracker.log_metrics(summary, prefix=f"{model_path.stem}/")
    tracker.log_artifact(out_path, "metrics")
    return summary


def main(args) -> None:
    params = read_params(args)
    dist_info, device = setup_distributed(params)
    attacks = params.evaluate.config.attacks
    if args.model:
        evaluate_file(Path(args.model), Path(args.out), params, args.attacks or attacks, device, args.tracker, dist_info)
        return
    out = METRICS / "evaluate"
    evaluate_file(MODELS / "teacher.pt", out / "teacher.json", params, attacks, device, args.tracker, dist_info)
    evaluate_file(MODELS / "student.pt", out / "student.json", params, attacks, device, args.tracker, dist_info)
    evaluate_file(MODELS / "reference.pt", out / "reference.json", params,
                  params.evaluate.reference_attacks, device, args.tracker, dist_info)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--model", help="evaluate this checkpoint only (with --out)")
    p.add_argument("--out", help="JSON written for --model")
    p.add_argument("--attacks", nargs="*", help="attacks for --model (default: evaluate.config.attacks)")
    return p


run = cli(main, build_parser, "evaluate", ("evaluate", "run"))

if __name__ == "__main__":
    run()
