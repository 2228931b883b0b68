"""The method registry: every training method (teacher or student) by name.

A method is one module of this package holding its settings dataclass (units and the source of
each default), its training attack and its loss, registered here with :func:`register`. The stages,
the params validation, the comparison pipeline and the benchmark all read this registry, so a new
method is one module (imported in the package's ``__init__``), one test module and its docs row
(docs/methods.md, "Adding a method"); nothing else names it: smoke runs, tests, benchmarks and the
cost model read ``Method.role`` and ``Method.tiny``.

A loss has the signature ``loss(model, teacher, batch, cfg, step) -> (loss, parts)`` where
``parts`` maps names to detached scalars; it leaves the models in the train/eval modes it found
them in, and runs the teacher only under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from ..config import from_dict
from ..errors import InputError


@dataclass(frozen=True)
class Schedule:
    """A method's official optimiser recipe for one dataset (SGD, piecewise lr by ``gamma``).

    ``milestones`` are epochs; ``source`` names the file and commit they were read from.
    ``official``: False where no official recipe exists and the module chose one (DARWIN, the
    reconstructions CRDND and GACD): the run then records "the method's recipe [choice]", not
    "official"."""

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    schedule: str = "piecewise"
    source: str = ""
    official: bool = True

    def optim_dict(self) -> dict:
        """The fields of ``robustkd.engine.OptimConfig`` this schedule sets."""
        return {"epochs": self.epochs, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "milestones": list(self.milestones), "gamma": self.gamma, "schedule": self.schedule}


@dataclass
class Step:
    """What a loss may need besides the batch: the epoch (0-based), the attack generator, the
    autocast context and the method's state module (heads, memory bank; None for most).
    ``epoch_float`` is the fractional epoch at the end of this step (epoch + (i + 1) / batches per
    epoch, as AT-PRM's ``epoch_now``); None where the caller has no steps (then ``epoch``)."""

    epoch: int = 0
    generator: torch.Generator | None = None
    autocast: Callable = contextlib.nullcontext
    state: nn.Module | None = None
    epoch_float: float | None = None

    @property
    def progress(self) -> float:
        return float(self.epoch) if self.epoch_float is None else float(self.epoch_float)


@dataclass(frozen=True)
class DataInfo:
    """What a stateful method needs to build its state: the training pool (real, then generated)."""

    num_classes: int
    labels: torch.Tensor                    # label of every pool index (real then generated)
    student_feature_dim: int = 0
    teacher_feature_dim: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    config: type                                   # the settings dataclass
    loss: Callable[..., tuple[torch.Tensor, dict]]
    role: Literal["teacher", "student"]
    summary: str                                   # one line for tables and --help
    source: str                                    # official repository, file and commit, or paper
    uses_labels: bool = True                       # the loss or its attack reads the ground-truth labels
    # The slides' comparison table's check column for this method (True: marked, False: x,
    # None: not in that table). Where it differs from ``uses_labels`` the docs say why
    # (docs/methods.md, "Labels").
    slides_labels: bool | None = None
    reconstruction: bool = False                   # no official code: rebuilt from descriptions
    needs_partners: Callable[[Any], bool] = lambda cfg: False
    # How the data pipeline draws the partners (robustkd.data.TrainBatches' partner_* keywords)
    partner_options: Callable[[Any], dict] = lambda cfg: {}
    needs_index: bool = False                      # batches carry pool indices (memory banks)
    build_state: Callable[[Any, DataInfo], nn.Module] | None = None
    schedules: dict[str, Schedule] = field(default_factory=dict)    # official, per dataset
    dataset_defaults: Callable[[str], dict] = lambda dataset: {}     # official per-dataset branches
    check_run: Callable[[Any, torch.device, bool], None] | None = None  # (cfg, device, sync_bn)
    # Stand-in settings: what the method needs to run on the tiny CNN stand-ins and pools of a few
    # images used by smoke runs, tests and pass counting (a memory bank shrunk, attention gates off
    # on models without attention), without changing the passes a step makes. See standin_settings.
    tiny: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name shown in tables; reconstructions say so."""
        return f"{self.name} (reconstruction)" if self.reconstruction else self.name


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    if not dataclasses.is_dataclass(method.config):
        raise TypeError(f"method {method.name!r}: config must be a dataclass")
    _METHODS[method.name] = method
    return method


def available_methods(role: str | None = None) -> list[str]:
    return sorted(n for n, m in _METHODS.items() if role is None or m.role == role)


def attack_steps(name: str, steps: int) -> dict:
    """``{"steps": steps}`` where ``name``'s settings have attack steps (a ``steps`` field;
    natural training and natural KD have none), else ``{}``: how the smoke profile and the
    benchmarks shorten every method's attack without naming methods."""
    return {"steps": steps} if "steps" in {f.name for f in dataclasses.fields(get_method(name).config)} else {}


def standin_settings(name: str, settings: dict | None = None, steps: int | None = None) -> dict:
    """``name``'s settings for a run on stand-in models and data: ``steps`` attack steps (see
    :func:`attack_steps`), then ``settings``, then the method's :attr:`Method.tiny`. The one place
    tests and the cost model's pass counting get a method's stand-in settings from (no name
    special cases)."""
    short = attack_steps(name, steps) if steps is not None else {}
    return {**short, **dict(settings or {}), **get_method(name).tiny}


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; expected one of {available_methods()}")
    return _METHODS[name]


def build_config(name: str, settings: dict | None = None, dataset: str = "cifar10",
                 where: str | None = None):
    """The typed settings of ``name``: the official per-dataset defaults, then ``settings``
    (unknown keys rejected, naming ``where``)."""
    method = get_method(name)
    merged = {**method.dataset_defaults(dataset), **dict(settings or {})}
    return from_dict(method.config, merged, where or f"method {name}")


class Objective(nn.Module):
    """A method bound to its settings (and its state, for the contrastive methods):
    ``objective(model, teacher, batch, epoch=..., generator=..., autocast=...) -> (loss, parts)``.

    An ``nn.Module`` so that a method's trainable heads and memory bank are found by the
    optimiser (``parameters()``) and the checkpoint (``state_dict()``)."""

    def __init__(self, method: Method, config, state: nn.Module | None = None):
        super().__init__()
        self.method = method
        self.config = config
        self.state = state

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def needs_teacher(self) -> bool:
        return self.method.role == "student"

    @property
    def needs_partners(self) -> bool:
        return self.method.needs_partners(self.config)

    @property
    def partner_options(self) -> dict:
        """The method's partner settings for the data pipeline (empty: its defaults)."""
        return self.method.partner_options(self.config) if self.needs_partners else {}

    @property
    def needs_index(self) -> bool:
        return self.method.needs_index

    def check_run(self, device: torch.device, sync_bn: bool = False) -> None:
        """Refuse run settings the method cannot honour (before any training)."""
        if self.method.check_run is not None:
            self.method.check_run(self.config, device, sync_bn)

    def forward(self, model, teacher, batch, epoch: int = 0, generator=None,
                autocast=contextlib.nullcontext, epoch_float: float | None = None):
        step = Step(epoch=epoch, generator=generator, autocast=autocast, state=self.state,
                    epoch_float=epoch_float)
        return self.method.loss(model, teacher, batch, self.config, step)


def create_objective(name: str, settings: dict | None = None, dataset: str = "cifar10",
                     where: str | None = None, data: DataInfo | None = None) -> Objective:
    """Build ``name``'s objective from a settings dict. Stateful methods (GACD) need ``data``."""
    method = get_method(name)
    cfg = build_config(name, settings, dataset, where)
    state = None
    if method.build_state is not None:
        if data is None:
            raise InputError(f"method {name!r} keeps a memory bank over the training images: "
                             "create_objective needs data=DataInfo(...)")
        state = method.build_state(cfg, data)
    return Objective(method, cfg, state)
