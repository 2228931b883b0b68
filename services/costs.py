"""What a full run of a preset costs: training FLOPs and GPU-hours on one H200.

The passes of one training step are counted as benchmarks/common.py counts them (PassCounter: a
forward and a backward hook on each model's first convolution, in units of one batch), here on
tiny stand-in models (the counts depend on the method and its settings, not on the architecture),
then priced with the preset's real architectures' forward FLOPs per image (torch's FLOP counter on
the meta device; a backward counted as 2 forwards, as in benchmarks/common.py's estimate_flops). Throughput is
the one measured on an H200 for the DARWIN paper preset (ResNet-18 student, WRN-34-10 teacher,
n = 10, batch 128): 402 images/s in fp32 eager, 806 with bf16 + channels_last + compile. Every preset is priced at the FLOP rate those imply (the same
fraction of the GPU for every model and method: an assumption). Training only (teacher when
trained here, student, reference student); evaluation is not included.
"""

from __future__ import annotations

import functools

import torch

from robustkd.data import Batch
from robustkd.methods import DataInfo, create_objective, standin_settings
from robustkd.models import create_model

from .params import Params, dataset_key, method_settings, resolve_optim

# images/s of the DARWIN paper preset on one H200, measured: fp32 eager defaults, the fast path
H200_IMAGES_PER_S = {"fp32": 402.0, "fast": 806.0}
REFERENCE = {"student": "resnet18", "teacher": "wrn34_10", "method": "darwin", "settings": {"steps": 10}}
FULL_TRAIN = {"cifar10": 50_000, "cifar100": 50_000}   # training images of the torchvision sources
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@functools.lru_cache(maxsize=None)
def forward_flops(arch: str, num_classes: int, options: tuple = ()) -> float:
    """FLOPs of one image through ``arch`` (eval-mode forward, counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(arch, num_classes, **dict(options)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.empty(1, 3, 32, 32, device="meta"))
    return float(fc.get_total_flops())


def count_passes(method: str, settings: dict, num_classes: int, batch: int = 2) -> dict[str, float]:
    """{"student_fwd", "student_bwd", "teacher_fwd", "teacher_bwd"} of one training step, in units
    of one batch (a teacher method's own model counts as the student)."""
    import json

    return dict(_count_passes(method, json.dumps(settings, sort_keys=True, default=str), num_classes, batch))


@functools.lru_cache(maxsize=None)
def _count_passes(method: str, settings_json: str, num_classes: int, batch: int) -> tuple:
    import json
    import warnings

    settings = json.loads(settings_json)
    torch.manual_seed(0)
    student = create_model("resnet10_w8", num_classes)
    teacher = create_model("resnet10_w8", num_classes).eval()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(batch) % num_classes
    b = Batch(torch.rand(batch, 3, 32, 32, generator=g), y, torch.rand(batch, 3, 32, 32, generator=g),
              (y + 1) % num_classes, torch.arange(batch))
    pool = torch.arange(max(batch, 64)) % num_classes
    # The stand-ins are CNNs: each method's Method.tiny (a memory bank shrunk, attention gates
    # that make no pass of their own off) keeps the passes of the real settings.
    objective = create_objective(method, standin_settings(method, settings),
                                 dataset="cifar100" if num_classes == 100 else "cifar10",
                                 data=DataInfo(num_classes, pool, student.feature_dim, teacher.feature_dim))
    counts = {f"{m}_{k}": 0.0 for m in ("student", "teacher") for k in ("fwd", "bwd")}

    def hooks(name, model):
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def fwd(_m, inputs, _out):
            counts[f"{name}_fwd"] += len(inputs[0]) / batch

        def bwd(_m, _gin, gout):
            counts[f"{name}_bwd"] += len(gout[0]) / batch
        return [first.register_forward_hook(fwd), first.register_full_backward_hook(bwd)]

    handles = hooks("student", student) + hooks("teacher", teacher)
    student.train()
    with warnings.catch_warnings():   # the hooks also fire for the attacks' input gradients: counted
        warnings.simplefilter("ignore", UserWarning)
        loss, _ = objective(student, teacher if objective.needs_teacher else None, b,
                            generator=torch.Generator().manual_seed(0))
        loss.backward()
    for h in handles:
        h.remove()
    return tuple(counts.items())


def step_flops_per_image(method: str, settings: dict, student: tuple, teacher: tuple | None,
                         num_classes: int) -> float:
    """Training FLOPs per image of ``method`` with these (arch, options) models."""
    passes = count_passes(method, settings, num_classes)
    total = 0.0
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        per_image = forward_flops(model[0], num_classes, tuple(sorted(model[1].items())))
        total += per_image * (passes[f"{name}_fwd"] + 2 * passes[f"{name}_bwd"])
    return total


@functools.lru_cache(maxsize=None)
def _reference_rate() -> tuple:
    return tuple(reference_rate().items())


def reference_rate() -> dict[str, float]:
    """FLOP/s the H200 measurements imply for each path."""
    flops = step_flops_per_image(REFERENCE["method"], REFERENCE["settings"], (REFERENCE["student"], {}),
                                 (REFERENCE["teacher"], {}), 10)
    return {path: flops * ips for path, ips in H200_IMAGES_PER_S.items()}


def estimate(params: Params) -> dict:
    """Training FLOPs and GPU-hours on one H200 of a full run of ``params``."""
    source = params.data.source
    if source not in FULL_TRAIN:
        raise ValueError("costs are estimated for the torchvision sources (cifar10, cifar100)")
    classes = NUM_CLASSES[source]
    train = FULL_TRAIN[source] if params.data.train_per_class is None else \
        (params.data.train_per_class) * classes
    train -= params.data.heldout_per_class * classes
    parts = {}
    t = params.teacher
    teacher_model = (t.model.arch, dict(t.model.options))
    if t.source == "train":
        batches = train // t.optim.batch_size
        parts["teacher"] = t.optim.epochs * batches * t.optim.batch_size * step_flops_per_image(
            t.method, t.settings, teacher_model, None, classes)
    student = (params.distill.student.arch, dict(params.distill.student.options))
    for name, method in (("student", params.distill.method), ("reference", params.distill.reference_method)):
        optim, _ = resolve_optim(params, method, classes)
        batches = max(1, train // optim.batch_size)   # an epoch: floor(real / batch) batches (robustkd.data)
        parts[name] = optim.epochs * batches * optim.batch_size * step_flops_per_image(
            method, method_settings(params, method), student, teacher_model, classes)
    rates = dict(_reference_rate())
    total = sum(parts.values())
    return {"train_images": train, "flops": parts, "total_flops": total,
            "h200_hours": {path: total / rate / 3600 for path, rate in rates.items()},
            "dataset": dataset_key(classes)}


def describe(name: str, est: dict) -> str:
    h = est["h200_hours"]
    parts = ", ".join(f"{k} {v / 1e15:,.0f} PFLOP" for k, v in est["flops"].items())
    return (f"{name}: about {h['fast']:.1f} H200-hours with the fast path ({h['fp32']:.1f} in fp32 eager) "
            f"for training ({parts}; {est['train_images']:,} real training images; "
            f"evaluation not included)")

