"""Stage export_onnx: the student -> models/student.onnx (one file, dynamic batch, [0, 1]
pixel input with normalisation inside), onnx.checker, onnxruntime parity on the test subset
and latency of torch eager and onnxruntime; the figures go to metrics/export.json."""

from __future__ import annotations

import json

import numpy as np
import torch

from robustkd.data import stratified_first_k, to_float
from robustkd.errors import InputError
from robustkd.models import load_checkpoint

from robustkd.utils import atomic_path

from services.onnx_export import INPUT_NAME, OUTPUT_NAME, export_to, median_latency_ms
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
        latency = latencies(model, session, cfg)
    report = {"opset": cfg.opset, "num_images": n_images, "max_abs_logit_diff": max_diff,
              "prediction_agreement": agreement, "latency": latency, "torch_threads": torch.get_num_threads()}
    write_json({"onnx": str(path), "input": INPUT_NAME, "output": OUTPUT_NAME, "checker": "passed"},
               METRICS / "export_info.json")
    write_json(report, METRICS / "export.json")  # numbers only: a DVC metric
    args.tracker.log_metrics({"max_abs_logit_diff": max_diff, "prediction_agreement": agreement,
                              "latency": latency})
    args.tracker.log_artifact(METRICS / "export.json")
    args.tracker.log_artifact(path)
    print(f"exported {path}: max |diff| {max_diff:.2e}, agreement {agreement:.4f}, latency {latency}")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "export_onnx", ("export",))

if __name__ == "__main__":
    run()
