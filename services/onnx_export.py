"""Export a [0, 1]-input student to one ONNX file (dynamic batch, metadata inside) and time a
callable: shared by the export stage and the benchmark."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from robustkd.utils import atomic_path

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export(model, path, opset: int, metadata: dict[str, str]) -> None:
    """One .onnx file; ``metadata`` (class names, method, ...) goes into its metadata_props so
    the server and the predict CLI need nothing but the file. Written atomically."""
    with atomic_path(path) as tmp:
        export_to(model, tmp, opset, metadata)


def export_to(model, tmp, opset: int, metadata: dict[str, str]) -> None:
    """:func:`export` into ``tmp`` as it is, for a caller that renames the file itself once it has
    checked it (stages/export_onnx.py: the previous student.onnx stays until the new one passed)."""
    import onnx

    example = torch.rand(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(tmp))


def median_latency_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))
