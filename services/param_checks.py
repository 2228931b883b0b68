"""Ranges and units of params.yaml, checked as a whole when it is loaded (stages/params.py).

Types and unknown keys are checked while the typed params are built; this module adds what a
type cannot say: eps and step sizes are [0, 1] pixel units (docs/methods.md#conventions), counts
are positive, fractions lie in [0, 1]. Every message names the file, the key, what was expected and
what was found.
"""

from __future__ import annotations

import re
from pathlib import Path

from robustkd.config import _convert
from robustkd.errors import InputError

# Keys of method settings that are pixel-unit radii or steps.
PIXEL_KEYS = ("eps", "step_size")


def fail(path: str, key: str, expected: str, found, hint: str = "") -> None:
    raise InputError(f"{path}: {key}: expected {expected}, found {found!r}{hint}")


def pixel_unit(path: str, key: str, value) -> None:
    """eps and step sizes in (0, 1]; 8 is almost surely 8/255."""
    if not 0 < value <= 1:
        hint = f"; did you mean {value:g}/255?" if value > 1 else ""
        fail(path, key, "a value in (0, 1] (pixel units, e.g. 8/255)", value, hint)


def positive(path: str, key: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        fail(path, key, "a number >= 0" if allow_zero else "a positive number", value)


def fraction(path: str, key: str, value) -> None:
    if not 0 <= value <= 1:
        fail(path, key, "a fraction in [0, 1]", value)


def check_settings(path: str, where: str, settings: dict) -> None:
    """eps/step_size of a raw method-settings block ("8/255" accepted, as the methods accept it)."""
    for key in PIXEL_KEYS:
        if key in settings:
            value = _convert(float, settings[key], f"{path}:{where}.{key}")
            pixel_unit(path, f"{where}.{key}", value)


def check_optim(path: str, where: str, optim) -> None:
    for key in ("epochs", "batch_size", "lr"):
        positive(path, f"{where}.{key}", getattr(optim, key))
    positive(path, f"{where}.weight_decay", optim.weight_decay, allow_zero=True)
    fraction(path, f"{where}.momentum", optim.momentum)
    fraction(path, f"{where}.onecycle_warmup", optim.onecycle_warmup)


def check_teacher(path: str, teacher) -> None:
    """The teacher's settings block itself is built and checked once, with every method's
    (services.params.validate_methods, before these checks)."""
    check_settings(path, "teacher.settings", teacher.settings)
    check_optim(path, "teacher.optim", teacher.optim)
    positive(path, "teacher.monitor_pgd_steps", teacher.monitor_pgd_steps, allow_zero=True)
    if teacher.source == "checkpoint" and not Path(teacher.checkpoint).is_file():
        fail(path, "teacher.checkpoint", "an existing checkpoint file (teacher.source is checkpoint)",
             teacher.checkpoint)
    if teacher.source == "zoo":
        check_zoo_teacher(path, teacher)


def check_zoo_teacher(path: str, teacher) -> None:
    """A known zoo name, and teacher.model naming the entry's architecture (the report and the
    stages describe the teacher by it). The file itself is checked by the stage: it may still be
    downloaded there."""
    from robustkd.teachers import ZOO

    entry = ZOO.get(teacher.zoo.name)
    if entry is None:
        fail(path, "teacher.zoo.name", f"one of {sorted(ZOO)}", teacher.zoo.name)
    if teacher.model.arch != entry.arch or dict(teacher.model.options) != dict(entry.options):
        fail(path, "teacher.model", f"the architecture of zoo teacher {entry.name!r}: "
             f"{{arch: {entry.arch}, options: {dict(entry.options)}}}",
             f"{{arch: {teacher.model.arch}, options: {dict(teacher.model.options)}}}")


def check_data(path: str, data) -> None:
    positive(path, "data.train_per_class", data.train_per_class)
    positive(path, "data.heldout_per_class", data.heldout_per_class, allow_zero=True)
    positive(path, "data.test_per_class", data.test_per_class)


def check_ddpm(path: str, ddpm) -> None:
    fraction(path, "ddpm.fraction", ddpm.fraction)
    positive(path, "ddpm.num_images", ddpm.num_images, allow_zero=True)
    positive(path, "ddpm.max_class_imbalance", ddpm.max_class_imbalance, allow_zero=True)
    positive(path, "ddpm.diffusers.inference_steps", ddpm.diffusers.inference_steps)
    positive(path, "ddpm.diffusers.batch_size", ddpm.diffusers.batch_size)


def check_distill(path: str, distill) -> None:
    for method, block in (distill.settings or {}).items():
        if isinstance(block, dict):
            check_settings(path, f"distill.settings.{method}", block)
    check_optim(path, "distill.optim", distill.optim)
    positive(path, "distill.monitor_pgd_steps", distill.monitor_pgd_steps, allow_zero=True)


def check_evaluate(path: str, evaluate) -> None:
    from robustkd.evaluation import PROTOCOLS

    if evaluate.protocol not in PROTOCOLS:
        fail(path, "evaluate.protocol", f"one of {list(PROTOCOLS)}", evaluate.protocol)
    for key, found, value in getattr(evaluate, "protocol_conflicts", []):
        fail(path, f"evaluate.config.{key}", f"the value of evaluate.protocol {evaluate.protocol!r} ({value!r}) "
             f"or the project's (the key is then replaced); use evaluate.protocol 'project' for your own", found)
    cfg = evaluate.config
    for key in ("eps", "pgd_step_size", "cw_step_size"):
        pixel_unit(path, f"evaluate.config.{key}", getattr(cfg, key))
    for key in ("pgd_steps", "cw_steps", "batch_size"):
        positive(path, f"evaluate.config.{key}", getattr(cfg, key))
    positive(path, "evaluate.per_class", evaluate.per_class)
    positive(path, "evaluate.autoattack_per_class", evaluate.autoattack_per_class)
    positive(path, "evaluate.max_images", evaluate.max_images)
    if None not in (evaluate.per_class, evaluate.autoattack_per_class) and \
            evaluate.autoattack_per_class > evaluate.per_class:
        raise InputError(f"{path}: evaluate.autoattack_per_class must be <= evaluate.per_class "
                         f"({evaluate.per_class}), found {evaluate.autoattack_per_class}")


def check_export(path: str, export) -> None:
    positive(path, "export.per_class", export.per_class)
    positive(path, "export.latency_repeats", export.latency_repeats)
    positive(path, "export.parity_atol", export.parity_atol)
    for i, bs in enumerate(export.latency_batch_sizes):
        positive(path, f"export.latency_batch_sizes[{i}]", bs)
    positive(path, "export.attack.square_queries", export.attack.square_queries, allow_zero=True)
    positive(path, "export.attack.per_class", export.attack.per_class)


# Images per class of the torchvision sources (train, test): what data.*_per_class: null means there,
# and the most a count may ask for (CIFAR-10: 5000/1000, CIFAR-100: 500/100; Krizhevsky 2009,
# "Learning Multiple Layers of Features from Tiny Images", https://www.cs.toronto.edu/~kriz/cifar.html).
KNOWN_SOURCES = {"cifar10": (10, 5000, 1000), "cifar100": (100, 500, 100)}   # classes, train, test


def check_counts(path: str, params) -> None:
    """Counts of later stages against what prepare_data keeps, so that a profile whose evaluation,
    export or attention asks for more test images than it prepares stops at load, before any
    training (export_onnx would otherwise fail only after teacher, student and reference trained)."""
    data = params.data
    known = KNOWN_SOURCES.get(data.source)
    if known and data.train_per_class is not None and data.train_per_class + data.heldout_per_class > known[1]:
        fail(path, "data.train_per_class + data.heldout_per_class",
             f"at most the {known[1]} training images per class of {data.source}",
             data.train_per_class + data.heldout_per_class)
    if known and data.test_per_class is not None and data.test_per_class > known[2]:
        fail(path, "data.test_per_class", f"at most the {known[2]} test images per class of {data.source}",
             data.test_per_class)
    if data.test_per_class is not None:
        available, what = data.test_per_class, f"data.test_per_class ({data.test_per_class})"
    elif known:
        available, what = known[2], f"the {known[2]} test images per class of {data.source} (data.test_per_class: null)"
    else:
        available = None   # an image folder, all of it: its size is known once prepare_data read it
    if available is not None:
        for key, value in (("evaluate.per_class", params.evaluate.per_class),
                           ("evaluate.autoattack_per_class", params.evaluate.autoattack_per_class),
                           ("export.per_class", params.export.per_class)):
            if value is not None and value > available:
                fail(path, key, f"at most {what} test images per class", value,
                     f"; lower {key} or raise data.test_per_class")
    if known and params.attention.images > known[0]:
        fail(path, "attention.images", f"at most the {known[0]} classes of {data.source} "
             "(one test image of each of the first k classes)", params.attention.images)


def check_device(path: str, name: str) -> None:
    """run.device names a device this machine has: a CUDA index beyond torch.cuda.device_count()
    would otherwise fail in the first training stage, after prepare_data ran."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        fail(path, "run.device", "auto, cpu, cuda, cuda:N or mps (a torch device string)", name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(path, "run.device", "a device of this machine (it has no CUDA device; use auto or cpu)", name)
        if device.index is not None and device.index >= count:
            fail(path, "run.device", f"a device of this machine (CUDA devices 0..{count - 1})", name)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        fail(path, "run.device", "a device of this machine (MPS is not available; use auto or cpu)", name)
    elif device.type not in ("cpu", "cuda", "mps"):
        fail(path, "run.device", "auto, cpu, cuda, cuda:N or mps", name)


# A registered model name: it goes into models:/<name>@champion URIs and MLflow search filters
# (services.tracking.filter_literal quotes it there as well). [choice]: letters, digits, '.', '_',
# '-' and spaces, at most 256 characters; no quotes, slashes, '@' or ':'.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,255}")


def check_registry(path: str, registry) -> None:
    if not MODEL_NAME.fullmatch(registry.model_name):
        fail(path, "registry.model_name", "a name of letters, digits, '.', '_', '-' and spaces "
             "(used in models:/<name>@champion and MLflow search filters)", registry.model_name)


BEST_MODELS = ("teacher", "student", "reference")   # the trained models with a models/<name>_best.pt


def monitor_off(monitor_steps: int, heldout_per_class: int) -> bool:
    """The per-epoch held-out PGD monitor does not run: no held-out slice or no PGD steps."""
    return not monitor_steps or not heldout_per_class


def check_selection(path: str, params) -> None:
    """``teacher.select`` / ``distill.select: best`` need the per-epoch held-out PGD monitor (the
    best is by its accuracy); the registered best student needs its evaluation."""
    for key, select, steps_key, steps in (
            ("teacher.select", params.teacher.select, "teacher.monitor_pgd_steps", params.teacher.monitor_pgd_steps),
            ("distill.select", params.distill.select, "distill.monitor_pgd_steps", params.distill.monitor_pgd_steps)):
        if select != "best":
            continue
        if monitor_off(steps, params.data.heldout_per_class):
            fail(path, key, f"last while the held-out monitor is off ({steps_key} {steps}, data.heldout_per_class "
                 f"{params.data.heldout_per_class}): best is chosen by it", select)
    if params.teacher.select == "best" and params.teacher.source != "train":
        fail(path, "teacher.select", f"last with teacher.source {params.teacher.source} (nothing is trained here)",
             "best")
    names = params.evaluate.best_checkpoints
    if len(set(names)) != len(names) or any(n not in BEST_MODELS for n in names):
        fail(path, "evaluate.best_checkpoints", f"distinct names of {list(BEST_MODELS)}", names)
    if params.distill.select == "best" and "student" not in names:
        fail(path, "evaluate.best_checkpoints", "a list naming student (distill.select is best: the best "
             "student is exported and registered, so it is evaluated)", names)


def check_params(params, path: str) -> None:
    """Every range check of the whole file; the first problem raises InputError."""
    check_data(path, params.data)
    check_teacher(path, params.teacher)
    check_ddpm(path, params.ddpm)
    check_distill(path, params.distill)
    check_evaluate(path, params.evaluate)
    check_export(path, params.export)
    check_selection(path, params)
    positive(path, "run.threads", params.run.threads, allow_zero=True)
    positive(path, "registry.natural_tolerance", params.registry.natural_tolerance, allow_zero=True)
    if not 0 < params.registry.alpha < 1:
        fail(path, "registry.alpha", "a significance level in (0, 1)", params.registry.alpha)
    positive(path, "attention.images", params.attention.images)
    check_counts(path, params)
    check_device(path, params.run.device)
    check_registry(path, params.registry)
