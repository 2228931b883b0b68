"""What the benchmarks share: peak memory, pass counting, FLOP estimates and the matmul peak.

benchmarks/bench.py (the CPU/GPU benchmark of every case) and benchmarks/gpu.py (the GPU fast-path
benchmark) both measure with these, so neither imports the other for them (no import circle,
tests/test_layout.py). Which model a step trains is read from the registry (``Method.role``).
"""

from __future__ import annotations

import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of the measured block: CUDA allocator peak, or resident-set high-water mark
    (reset through /proc/self/clear_refs) above the RSS at the start."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mib = max(_rss_kib("VmHWM") * 1024 - self.base, 0) / 2**20
        return False


# ---------------------------------------------------------------- pass counting


class PassCounter:
    """Forward and backward passes per model, in units of one batch of ``batch`` images."""

    def __init__(self, models: dict, batch: int):
        self.batch = batch
        self.counts = {f"{name}_{kind}": 0.0 for name in models for kind in ("fwd", "bwd")}
        self.handles = []
        for name, model in models.items():
            first = next(m for m in model.modules() if m.__class__.__name__ == "Conv2d")
            self.handles.append(first.register_forward_hook(self._fwd(name)))
            self.handles.append(first.register_full_backward_hook(self._bwd(name)))
        self.enabled = False

    def _fwd(self, name):
        def hook(module, inputs, output):
            if self.enabled:
                self.counts[f"{name}_fwd"] += len(inputs[0]) / self.batch
        return hook

    def _bwd(self, name):
        def hook(module, grad_input, grad_output):
            if self.enabled:
                self.counts[f"{name}_bwd"] += len(grad_output[0]) / self.batch
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def trains_teacher(method: str) -> bool:
    """A teacher method (``Method.role``) trains the teacher model itself: its passes are the
    teacher's alone, counted as the trained model's."""
    from robustkd.methods import get_method

    return get_method(method).role == "teacher"


def counted_models(method: str, student, teacher) -> dict:
    """The models whose passes a step of ``method`` makes: the trained one alone for a teacher
    method, student and teacher for a distillation."""
    return {"model": teacher} if trains_teacher(method) else {"student": student, "teacher": teacher}


# ---------------------------------------------------------------- cases


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops_per_image(model, device) -> float:
    """FLOPs of one image through ``model`` (torch.utils.flop_counter on an eval-mode forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mode = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.rand(2, 3, 32, 32, device=device))
    model.train(mode)
    return fc.get_total_flops() / 2


def estimate_flops(counts: dict, student, teacher, method: str, batch: int, device) -> float:
    """FLOPs of one step from the counted passes: forward = 1, backward = 2 forwards (an upper
    bound: the attacks' input-gradient backwards skip the weight gradients). The FLOP counter
    cannot run the step itself (it does not support the attacks' autograd.grad)."""
    models = counted_models(method, student, teacher)
    total = 0.0
    for name, model in models.items():
        per_image = forward_flops_per_image(model, device)
        total += per_image * batch * (counts.get(f"{name}_fwd", 0) + 2 * counts.get(f"{name}_bwd", 0))
    return total


def matmul_case(device) -> dict:
    """Measured bf16 (GPU) / fp32 (CPU) matmul throughput: the denominator of 'fraction of peak'."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"case": "matmul", "kind": "matmul", "dtype": str(dtype), "tflops": 2 * size**3 * reps / elapsed / 1e12}
