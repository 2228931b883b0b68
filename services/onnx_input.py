"""What an ONNX student must take: one float32 input N x 3 x H x W (RGB in [0, 1], normalised
inside the graph, as services/onnx_export.py writes it). Checked from the session's declared input
when a file is loaded (the attack of the export stage, the server), so a file of another layout
fails at load with one line, not with onnxruntime's message on the first request.

No torch here: the server (pipeline/onnx_student.py) imports it.
"""

from __future__ import annotations

from pathlib import Path

from robustkd.errors import InputError

EXPECTED_INPUT = "one float32 input N x 3 x H x W (RGB in [0, 1])"


def _shown(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def check_onnx_input(session, path: str | Path) -> str:
    """The name of the session's image input; InputError naming ``path``, what was expected and
    what was found when the file has not exactly one input of element type float and rank 4 with 3
    channels. (A symbolic or fixed batch is accepted; a fixed H x W too: the caller resizes to it.)
    The [0, 1] range cannot be read from a graph: the file's metadata ``input`` states it."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        found = ", ".join(f"{i.name} {i.type} {_shown(i.shape)}" for i in inputs) or "none"
        raise InputError(f"{path}: ONNX input: expected {EXPECTED_INPUT}, found {len(inputs)} inputs ({found})")
    inp = inputs[0]
    shape = list(inp.shape or [])
    if inp.type != "tensor(float)" or len(shape) != 4 or shape[1] != 3:
        raise InputError(f"{path}: ONNX input {inp.name!r}: expected {EXPECTED_INPUT}, found {inp.type} "
                         f"{_shown(shape)}")
    return str(inp.name)
