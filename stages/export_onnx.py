"""Stage export_onnx: the student -> models/student.onnx (one file, dynamic batch, [0, 1]
pixel input with normalisation inside), onnx.checker, onnxruntime parity on the test subset,
the file attacked (Square on the onnxruntime session and the PyTorch student's PGD-20 transferred
to it, on the evaluation's headline images: services/onnx_attack.py) and latency of torch eager
and onnxruntime; the figures go to metrics/export.json."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from robustkd.data import stratified_first_k, to_float
from robustkd.errors import InputError
from robustkd.checkpoints import load_checkpoint

from robustkd.utils import atomic_path

from services.onnx_attack import attack_onnx
from services.onnx_export import INPUT_NAME, OUTPUT_NAME, export_to, median_latency_ms
from services.results import headline_indices
from services.training import selected_path
from services.common import METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params, write_json


def parity(model, session, test, cfg) -> tuple[float, float, int]:
    """(max |logit difference|, argmax agreement, images) of onnxruntime against torch on the
    first ``export.per_class`` test images of each class; a difference above
    ``export.parity_atol`` is refused."""
    if cfg.per_class is not None:
        test = test.subset(stratified_first_k(test.labels, cfg.per_class, test.num_classes))
    x = to_float(test.images)
    with torch.no_grad():
        ref = model(x).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    max_diff = float(np.abs(ref - got).max())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    if max_diff > cfg.parity_atol:
        raise InputError(f"onnxruntime parity: max |logit difference| {max_diff:.3g} exceeds "
                         f"export.parity_atol {cfg.parity_atol}")
    return max_diff, agreement, len(x)


def latencies(model, session, cfg) -> dict:
    """Median latency (ms) of torch eager and onnxruntime per batch size of export.latency_batch_sizes."""
    latency = {}
    for bs in cfg.latency_batch_sizes:
        xb = torch.rand(bs, 3, 32, 32)
        xn = xb.numpy()
        with torch.no_grad():
            t_torch = median_latency_ms(lambda xb=xb: model(xb), cfg.latency_repeats)
        t_ort = median_latency_ms(lambda xn=xn: session.run([OUTPUT_NAME], {INPUT_NAME: xn}), cfg.latency_repeats)
        latency[f"batch{bs}"] = {"torch_ms": t_torch, "onnxruntime_ms": t_ort, "speedup": t_torch / t_ort}
    return latency


def main(args) -> None:
    import onnx
    import onnxruntime as ort

    params = read_params(args)
    cfg = params.export
    args.tracker.log_params({"run": {"seed": params.run.seed}})   # the seed it ran with
    model = load_checkpoint(selected_path(MODELS / "student.pt", params.distill.select)).eval()  # last | best
    test = load_imageset(PREPARED / "test.npz")
    meta = model.checkpoint_meta
    path = MODELS / "student.onnx"
    # exported, checked and timed as a temporary file: the previous student.onnx (a persistent
    # output, dvc.yaml) is replaced only by one that passed the checker and the parity check
    with atomic_path(path) as staged:
        export_to(model, staged, cfg.opset, {
            "classes": json.dumps(test.classes), "arch": model.arch, "method": str(meta.get("method")),
            "teacher_arch": str(meta.get("teacher_arch")), "dataset": str(meta.get("dataset")),
            "input": "float32 NCHW RGB in [0, 1], 32x32; normalisation is inside the graph"})
        onnx.checker.check_model(onnx.load(str(staged)), full_check=True)
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        max_diff, agreement, n_images = parity(model, session, test, cfg)
        attacked = attack_on_headline(model, staged, test, params)
        latency = latencies(model, session, cfg)
    report = {"opset": cfg.opset, "num_images": n_images, "max_abs_logit_diff": max_diff,
              "prediction_agreement": agreement, "latency": latency, "torch_threads": torch.get_num_threads(),
              **attacked}
    write_json({"onnx": str(path), "input": INPUT_NAME, "output": OUTPUT_NAME, "checker": "passed"},
               METRICS / "export_info.json")
    write_json(report, METRICS / "export.json")  # numbers only: a DVC metric
    args.tracker.log_metrics({"max_abs_logit_diff": max_diff, "prediction_agreement": agreement,
                              "latency": latency, **attacked})
    args.tracker.log_artifact(METRICS / "export.json")
    args.tracker.log_artifact(path)
    timings = ", ".join(f"{k} {v['torch_ms']:.2f} ms torch / {v['onnxruntime_ms']:.2f} ms onnxruntime"
                        for k, v in latency.items())
    print(f"exported {path}: max |diff| {max_diff:.2e}, agreement {agreement:.4f}; latency {timings}")
    print(attacked_line(attacked))


def attack_on_headline(model, path, test, params) -> dict:
    """The ONNX file attacked on the evaluation's headline images (services.results.headline_indices),
    their first ``export.attack.per_class`` of each class: {} when ``export.attack.square_queries`` is 0."""
    settings = params.export.attack
    if settings.square_queries == 0:
        return {}
    indices = headline_indices(params, test.labels, test.num_classes)
    if settings.per_class is not None:
        indices = indices[first_per_class(test.labels[indices], settings.per_class)]
    cfg = replace(params.evaluate.config, seed=params.run.seed)
    print(f"attacking the ONNX file on {len(indices)} headline test images: Square ({settings.square_queries} "
          f"queries, eps {cfg.eps * 255:g}/255) and the PyTorch student's PGD-{cfg.pgd_steps} transferred")
    return attack_onnx(model, path, to_float(test.images[indices]), test.labels[indices], cfg,
                       settings.square_queries)


def first_per_class(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the first ``k`` images of each class, in order (fewer where a class has fewer:
    a smoke run's headline may hold two images; with k of each, as ``stratified_first_k``)."""
    seen: dict[int, int] = {}
    keep = []
    for pos, c in enumerate(labels.tolist()):
        if seen.get(c, 0) < k:
            keep.append(pos)
            seen[c] = seen.get(c, 0) + 1
    return torch.tensor(keep, dtype=torch.long)


def attacked_line(attacked: dict) -> str:
    if not attacked:
        return "the ONNX file was not attacked (export.attack.square_queries: 0)"
    n = attacked["robust_images"]
    shown = ", ".join(f"{k.removesuffix('_accuracy')} {attacked[k]['percent']:.2f}%"
                      for k in ("onnx_square_accuracy", "onnx_pgd20_transfer_accuracy", "torch_pgd20_accuracy"))
    return (f"on {n} images: {shown} (Square {attacked['square_seconds']:.1f} s, PGD-20 and transfer "
            f"{attacked['pgd20_seconds']:.1f} s)")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "export_onnx", ("export",), config=METRICS / "export_config.json")

if __name__ == "__main__":
    run()
