"""Robustness evaluation (docs/methods.md, "Attacks and evaluation"): natural accuracy, PGD-20, CW-inf
and AutoAttack (standard, from ``pyautoattack``), with the protocol's checks.

Results are per image (a bool "still correct" vector), so a sharded evaluation can gather
them and sum exactly to a single-process run on the same images, and two models evaluated on
the same images can be compared image by image (McNemar, robustkd/stats.py).

The checks are the protocol's, and each can fail (tests/test_evaluation.py feeds each one a
broken attack or a gradient-masked model):

- perturbation: ``|x_adv - x|_inf <= eps + 1e-6`` and ``x_adv`` in [0, 1], per image;
- recomputed: the predictions on the returned ``x_adv`` by a *separate* eval-mode copy of the
  model (loaded again from disk by the stage, else a deep copy made before any attack) equal
  the attack's own;
- not above natural: no image wrong without attack is right under an attack (the attack then
  returned a point worse than ``x`` itself); reported figures count such images as wrong, and
  the per-image worst case over all attacks is reported;
- gradient masking (Carlini et al. 2019, "On evaluating adversarial robustness", section 5;
  Athalye et al. 2018): an unbounded attack drives accuracy to about chance or below, and
  accuracy does not rise along an eps sweep;
- AutoAttack's own warnings (logged by pyautoattack, e.g. Square succeeding where the
  white-box attacks did not, or points with zero gradient) are recorded.

A compiled model (torch.compile) gets the same checks and the same verdict as its eager copy:
every attack (PGD, CW, the masking checks, AutoAttack) runs on the eager module inside the
compile wrapper (``attacks.unwrap``), and pyautoattack's process-global counters of its
dynamic-defense check are reset before each of its runs (:func:`reset_autoattack_counters`), so
neither the compiler's own tracing nor an earlier model can flag a model. Only the natural
forward goes through the compiled module; the result says so (``compiled_parts``). Attacks run
in fp32 with TF32 off (:func:`fp32_matmuls`; ``PRECISION``) and with the attacked model's
parameters frozen (no weight gradients are computed by an input-gradient backward).

A failed check does not raise: the result carries every figure it measured and the failed
checks, with the reason, and is *flagged*; the caller decides whether that stops a pipeline.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn

from . import attacks
from .errors import InputError
from .stats import accuracy_record, percent
from .utils import make_generator

ATTACKS = ("natural", "pgd20", "cw", "autoattack")
WORST_CASE = "worst_case"
AUTOATTACK_LOGGER = "auto-attack"   # the logger pyautoattack writes its checks' warnings to
LINF_SLACK = 1e-6                   # float rounding allowed above eps, in [0, 1] pixel units
PRECISION = "fp32 (TF32 off)"       # what every attack and check runs in (fp32_matmuls)

AttackFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""(x batch, y batch, index of the batch's first image) -> (x_adv, the attack's predictions)."""


@dataclass
class EvalConfig:
    """Evaluation settings. eps and step sizes are in [0, 1] pixel units; accuracy thresholds
    and tolerances in percentage points."""

    eps: float = attacks.EPS_DEFAULT          # 8/255, [0, 1] pixel units
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    # PGD's uniform random start projected into [0, 1] before the first gradient (the project's,
    # IAD's); false: the first gradient at the unclamped x + U(-eps, eps) (ARD's official test())
    pgd_clamp_start: bool = True
    cw_steps: int = 30
    cw_step_size: float = 0.003
    cw_kappa: float = 50.0
    autoattack_version: str = "standard"   # standard | plus | rand | custom (pyautoattack)
    # custom only: the attacks run (e.g. [apgd-ce], the cheapest: the presets' smoke runs) and the
    # APGD iterations (100 in every published version), one restart each
    autoattack_attacks: list[str] = field(default_factory=list)
    autoattack_iterations: int = 100
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    batch_size: int = 256
    seed: int = 0
    checks: bool = True                # the protocol's checks on every evaluation
    fail_on_check: bool = False        # the stage exits non-zero (after writing its results) on a failed check
    # gradient-masking checks, on the first `masking_images` images of the evaluated subset
    masking_images: int = 50           # images (the first of the subset): chance-level needs a few dozen
    unbounded_eps: float = 1.0         # "unbounded": the whole [0, 1] cube
    unbounded_steps: int = 100
    unbounded_margin: float = 5.0      # accuracy allowed above chance (100 / classes) under the unbounded attack
    sweep_eps: list[float] = field(default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    sweep_steps: int = 20
    sweep_tolerance: float = 2.0       # accuracy allowed to rise along the sweep (noise of small subsets)

    def __post_init__(self):
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise InputError(f"evaluation.attacks: unknown attack(s) {unknown}; expected a subset of {list(ATTACKS)}")
        if self.autoattack_version not in ("standard", "plus", "rand", "custom"):
            raise InputError(f"evaluation.autoattack_version: expected standard|plus|rand|custom, "
                             f"found {self.autoattack_version!r}")
        if (self.autoattack_version == "custom") != bool(self.autoattack_attacks):
            raise InputError("evaluation.autoattack_attacks: a non-empty list of AutoAttack's attacks (apgd-ce, "
                             "apgd-t, fab-t, square, ...) with autoattack_version: custom, and only then; found "
                             f"{list(self.autoattack_attacks)} with version {self.autoattack_version!r}")
        if self.autoattack_iterations < 1:
            raise InputError(f"evaluation.autoattack_iterations must be >= 1, found {self.autoattack_iterations}")
        if self.masking_images < 0 or self.unbounded_steps < 0 or self.sweep_steps < 0:
            raise InputError("evaluation: masking_images, unbounded_steps and sweep_steps must be >= 0")
        if any(e < 0 for e in self.sweep_eps) or list(self.sweep_eps) != sorted(self.sweep_eps):
            raise InputError(f"evaluation.sweep_eps must be increasing and >= 0, found {self.sweep_eps}")


# ----------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A paper's evaluation settings by name (``evaluate.protocol``): the EvalConfig keys it sets,
    and where each value comes from. Keys it does not set keep ``evaluate.config``'s values."""

    name: str
    settings: dict
    sources: dict          # key -> source (repository, file, commit; paper; or "[choice]")
    description: str


PROTOCOLS: dict[str, Protocol] = {
    # the project's documented protocol (docs/methods.md, "Attacks and evaluation"): evaluate.config
    # as written (its defaults: PGD-20 2/255 uniform start, CW-inf 30 x 0.003 kappa 50, AutoAttack standard)
    "project": Protocol("project", {}, {}, "the project's protocol: evaluate.config as written"),
    # RSLAD, Zi et al., "Revisiting Adversarial Robustness Distillation: Robust Soft Labels Make Student
    # Better", ICCV 2021, https://arxiv.org/abs/2108.07969; code github.com/zibojia/RSLAD @ c40e04f6.
    "rslad": Protocol("rslad", {
        "eps": 8 / 255, "pgd_steps": 20, "pgd_step_size": 0.003, "pgd_clamp_start": True,
        "cw_steps": 30, "cw_step_size": 0.003, "cw_kappa": 50.0, "autoattack_version": "standard"},
        {"eps": "zibojia/RSLAD resnet18_rslad_cifar10.py:72 @ c40e04f6 (epsilon=8.0/255.0)",
         "pgd_steps": "zibojia/RSLAD resnet18_rslad_cifar10.py:72 @ c40e04f6 (attack_iters=20)",
         "pgd_step_size": "zibojia/RSLAD resnet18_rslad_cifar10.py:72 @ c40e04f6 (step_size=0.003)",
         "pgd_clamp_start": "[choice] attack_pgd is called but not defined in the repository: its start is "
                            "unknown; the project's uniform start, clamped",
         "cw_steps": "RSLAD paper, section 4 (CW-inf, 30 steps of 0.003); no CW code in the repository",
         "cw_step_size": "RSLAD paper, section 4 (CW-inf, 30 steps of 0.003); no CW code in the repository",
         "cw_kappa": "[choice] not given; kappa 50 as IAD's and the project's CW",
         "autoattack_version": "RSLAD paper, section 4 (AutoAttack, standard version)"},
        "RSLAD's: PGD-20 step 0.003, CW-inf 30 x 0.003, AutoAttack standard, eps 8/255"),
    # ARD, Goldblum et al., "Adversarially Robust Distillation", AAAI 2020, https://arxiv.org/abs/1905.09747;
    # code github.com/goldblum/AdversariallyRobustDistillation main.py @ 779ade36: test() attacks with
    # the AttackPGD of its config (main.py:60-78, 100-104, 143-160).
    "ard": Protocol("ard", {"eps": 8 / 255, "pgd_steps": 10, "pgd_step_size": 2 / 255, "pgd_clamp_start": False},
                    {"eps": "goldblum/AdversariallyRobustDistillation main.py:101 @ 779ade36 (epsilon 8/255)",
                     "pgd_steps": "goldblum/AdversariallyRobustDistillation main.py:102 @ 779ade36 (num_steps 10, "
                                  "the attack test() uses)",
                     "pgd_step_size": "goldblum/AdversariallyRobustDistillation main.py:103 @ 779ade36 (2/255)",
                     "pgd_clamp_start": "goldblum/AdversariallyRobustDistillation main.py:70 @ 779ade36 (x + "
                                        "U(-eps, eps), not clamped before the first gradient)",
                     "cw": "[choice] ARD's code has no CW or AutoAttack: evaluate.config's values",
                     "autoattack": "[choice] ARD's code has no CW or AutoAttack: evaluate.config's values"},
                    "ARD's official test(): PGD-10 step 2/255, uniform start unclamped, eps 8/255"),
    # IAD, Zhu et al., "Reliable Adversarial Distillation with Unreliable Teachers", ICLR 2022,
    # https://arxiv.org/abs/2106.04928; code github.com/ZFancy/IAD basic_eval.py, attack_generator.py @ a8091a8c.
    "iad": Protocol("iad", {
        "eps": 8 / 255, "pgd_steps": 20, "pgd_step_size": 2 / 255, "pgd_clamp_start": True,
        "cw_steps": 30, "cw_step_size": 2 / 255, "cw_kappa": 50.0, "autoattack_version": "standard"},
        {"eps": "ZFancy/IAD basic_eval.py:51, 53 @ a8091a8c (epsilon=8/255)",
         "pgd_steps": "ZFancy/IAD basic_eval.py:51 @ a8091a8c (PGD20: perturb_steps=20, loss cent)",
         "pgd_step_size": "ZFancy/IAD basic_eval.py:51 @ a8091a8c (step_size=2/255)",
         "pgd_clamp_start": "ZFancy/IAD attack_generator.py:25-26 @ a8091a8c (category Madry: x + U(-eps, eps), "
                            "clamped to [0, 1])",
         "cw_steps": "ZFancy/IAD basic_eval.py:53 @ a8091a8c (CW: perturb_steps=30, loss cw)",
         "cw_step_size": "ZFancy/IAD basic_eval.py:53 @ a8091a8c (step_size=2/255)",
         "cw_kappa": "ZFancy/IAD attack_generator.py:5 @ a8091a8c (cwloss confidence=50)",
         "autoattack_version": "[choice] the IAD paper reports AutoAttack; basic_eval.py runs none: standard"},
        "IAD's basic_eval.py: PGD-20 step 2/255, CW-inf 30 x 2/255 kappa 50, AutoAttack standard, eps 8/255"),
    # AutoAttack standard: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    # diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690 (github.com/fra31/auto-attack;
    # RobustBench's Linf CIFAR-10 threat model, eps 8/255).
    "autoattack": Protocol("autoattack", {"eps": 8 / 255, "autoattack_version": "standard"},
                           {"eps": "RobustBench Linf CIFAR-10 (8/255)",
                            "autoattack_version": "Croce & Hein 2020: version standard (APGD-CE, APGD-T, FAB-T, "
                                                  "Square)",
                            "pgd/cw": "[choice] not part of AutoAttack: evaluate.config's values"},
                           "AutoAttack standard (Croce & Hein 2020) at eps 8/255"),
}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


def protocol_conflicts(cfg: EvalConfig, name: str) -> list[tuple[str, object, object]]:
    """(key, value in cfg, the protocol's value) for each key protocol ``name`` sets that cfg
    gives another value than both the protocol's and the project's default (EvalConfig's): such
    a key is a contradiction, not an override. [] for an unknown name (checked elsewhere)."""
    protocol = PROTOCOLS.get(name)
    if protocol is None:
        return []
    project = EvalConfig()
    return [(key, getattr(cfg, key), value) for key, value in protocol.settings.items()
            if not _same(getattr(cfg, key), value) and not _same(getattr(cfg, key), getattr(project, key))]


def apply_protocol(cfg: EvalConfig, name: str) -> EvalConfig:
    """``cfg`` with protocol ``name``'s settings (the keys it does not set as they were)."""
    protocol = PROTOCOLS.get(name)
    if protocol is None:
        raise InputError(f"evaluate.protocol: expected one of {list(PROTOCOLS)}, found {name!r}")
    conflicts = protocol_conflicts(cfg, name)
    if conflicts:
        key, found, value = conflicts[0]
        raise InputError(f"evaluate.config.{key}: {found!r} contradicts evaluate.protocol {name!r}, which sets "
                         f"{value!r}; remove the key (or give it the protocol's value), or use protocol 'project'")
    return replace(cfg, **protocol.settings)


@dataclass
class Check:
    """One check's verdict and, either way, what it measured."""

    passed: bool
    detail: str


@dataclass
class EvaluationResult:
    """Per-image outcomes, the checks and what the gradient-masking checks measured.

    ``correct``: the reported outcome per attack (natural included): an image wrong without
    attack counts as wrong under every attack. ``own``: each attack's own per-image figure, as
    it returned it. ``worst_case``: right under every evaluated attack (None with natural alone).
    ``masking``: the unbounded attack's and the sweep's per-image outcomes on the first images.
    ``positions``: for an attack run on a subset only (AutoAttack on a stratified subset, the
    expensive one), the positions in x of the images its vectors describe.
    """

    def images_of(self, name: str, n: int) -> torch.Tensor:
        """Positions in x of the outcomes ``name`` describes (all ``n`` when not a subset)."""
        return self.positions.get(name, torch.arange(n))

    correct: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor] = field(default_factory=dict)
    worst_case: torch.Tensor | None = None
    # attacks run on part of the images: their positions in x (sorted); absent: every image.
    # The worst case is then over the positions every attack saw (positions["worst_case"]).
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    masking: dict[str, torch.Tensor] = field(default_factory=dict)
    autoattack_warnings: list[str] = field(default_factory=list)
    num_classes: int = 0
    # wall-clock seconds each attack took on this process (its share of the images, in parallel
    # across processes): images / seconds is the evaluation's throughput per attack; the masking
    # checks' attacks under their own names ("unbounded", "sweep_8", ...)
    seconds: dict[str, float] = field(default_factory=dict)
    # the parts that ran through a torch.compile'd module ([] for an eager model): the natural
    # forward only; every attack and check runs on the eager module (attacks.unwrap)
    compiled_parts: list[str] = field(default_factory=list)
    precision: str = PRECISION

    def images_of_attack(self, name: str) -> int:
        """Images attack ``name`` (an attack or a masking check's) ran on."""
        return len(self.correct[name]) if name in self.correct else len(self.masking.get(name, ()))

    def images_per_s(self) -> dict[str, float]:
        """Throughput of each attack: its images over its wall-clock seconds."""
        return {name: self.images_of_attack(name) / max(sec, 1e-9) for name, sec in self.seconds.items()
                if name in self.correct or name in self.masking}

    @property
    def failed(self) -> list[str]:
        return [name for name, c in self.checks.items() if not c.passed]

    @property
    def flagged(self) -> bool:
        return bool(self.failed)


# ----------------------------------------------------------------------------- batching
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def batch_starts(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Start indices of this rank's evaluation batches: whole batches, dealt round-robin.

    Sharding whole batches, with every batch's randomness seeded by its own index, makes each
    image's result independent of how many ranks share the work: the gathered totals equal a
    single-process run on the same images exactly.
    """
    return list(range(0, n, batch_size))[rank::world_size]


def _batch_seed(seed: int, start: int) -> int:
    return seed * 1_000_003 + start


class BatchProgress:
    """One line per batch on ``stream`` (None: silent): the attack, batch i/n, images done,
    images/s so far and the ETA. Lines, not carriage returns, so DVC, Prefect and CI logs stay
    readable."""

    def __init__(self, stream, desc: str, batches: int, images: int):
        self.stream, self.desc, self.batches, self.images = stream, desc, batches, images
        self.start = time.perf_counter()
        self.done_batches = self.done_images = 0

    def line(self, text: str) -> None:
        if self.stream is not None:
            print(f"[evaluate {self.desc}] {text}", file=self.stream, flush=True)

    def step(self, images: int) -> None:
        self.done_batches += 1
        self.done_images += images
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done_images / elapsed
        eta = (self.images - self.done_images) / max(rate, 1e-9)
        self.line(f"batch {self.done_batches}/{self.batches}, {self.done_images}/{self.images} images, "
                  f"{rate:.2f} images/s, {elapsed:.0f}s elapsed, eta {eta:.0f}s")


def _batched_attack(attack: AttackFn, x, y, starts: list[int], batch_size, device, desc, progress=None):
    """Run ``attack(xb, yb, batch_start)`` on each batch of ``starts``; returns (x_adv, pred).
    ``progress``: a stream for one line per batch (None: silent)."""
    outs, preds = [], []
    sizes = [len(x[i:i + batch_size]) for i in starts]
    bar = BatchProgress(progress, desc, len(starts), sum(sizes))
    for i, size in zip(starts, sizes):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with _autoattack_progress(bar if desc == "autoattack" else None):
            xa, pa = attack(xb, yb, i)
        outs.append(xa.detach().cpu())
        preds.append(pa.detach().cpu())
        bar.step(size)
    if not outs:
        return x[:0].clone(), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(preds)


def _select(t: torch.Tensor, starts: list[int], batch_size: int) -> torch.Tensor:
    if not starts:
        return t[:0]
    return torch.cat([t[i:i + batch_size] for i in starts])


# ----------------------------------------------------------------------------- attacks
def pgd_attack(model: nn.Module, cfg: EvalConfig, device, eps: float, alpha: float, steps: int,
               start: str | None = "uniform", clamp_start: bool = True) -> AttackFn:
    """PGD on the cross-entropy; each batch's random start seeded by the batch's index."""
    def attack(xb, yb, first):
        gen = make_generator(_batch_seed(cfg.seed, first), device)
        xa = attacks.pgd_ce(model, xb, yb, eps=eps, alpha=alpha, steps=steps, start=start, generator=gen,
                            clamp_start=clamp_start)
        with torch.no_grad():
            return xa, model(xa).argmax(1)
    return attack


def cw_attack(model: nn.Module, cfg: EvalConfig, device) -> AttackFn:
    def attack(xb, yb, first):
        gen = make_generator(_batch_seed(cfg.seed, first), device)
        xa = attacks.cw_inf(model, xb, yb, eps=cfg.eps, alpha=cfg.cw_step_size, steps=cfg.cw_steps,
                            kappa=cfg.cw_kappa, start="uniform", generator=gen)
        with torch.no_grad():
            return xa, model(xa).argmax(1)
    return attack


def autoattack_attack(model: nn.Module, cfg: EvalConfig, device) -> AttackFn:
    # The eager module: a compiled one traces its first gradient-enabled forward through
    # AOTAutograd, whose calls pyautoattack's dynamic-defense check counts (a false alarm).
    adversary = _autoattack_adversary(attacks.unwrap(model), cfg, device)

    def attack(xb, yb, first):
        # one call per batch, seeded at each call: a batch's result depends on it alone; the
        # dynamic-defense counters zeroed first, so each call judges this model's forward alone
        reset_autoattack_counters()
        return adversary.run_standard_evaluation(xb, yb, batch_size=len(xb))
    return attack


def reset_autoattack_counters() -> None:
    """Zero pyautoattack's dynamic-defense counters (``pyautoattack.checks.funcs``: calls to
    functions named grad/backward/_make_grads seen during one forward). They are module globals
    that pyautoattack never resets: once any forward in the process made such a call (a dynamic
    defense, or torch.compile tracing a backward), every later run was flagged."""
    try:
        from pyautoattack import checks
    except ImportError:   # pragma: no cover - installed with the pipeline extra
        return
    for key in checks.funcs:
        checks.funcs[key] = 0


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls and convolutions inside the block: TF32 off for CUDA matmuls
    (``torch.backends.cuda.matmul.allow_tf32``) and for cuDNN (``torch.backends.cudnn.allow_tf32``,
    on by default); the flags found are restored. TF32 rounds inputs to a 10-bit mantissa, which
    changes gradients (and can mask them). The legacy flags only: torch refuses to read the
    precision once the legacy and the new (``fp32_precision``) APIs are mixed."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """The model's parameters with ``requires_grad`` off inside the block (restored after): an
    attack's backward then computes the input gradient only, no weight gradient."""
    params = list(attacks.unwrap(model).parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


class _ForwardAutoAttack(logging.Handler):
    """pyautoattack's own progress (its DEBUG lines: "running apgd-ce", "robust accuracy after
    APGD-CE: ... (total time ... s)") as progress lines of the batch being attacked."""

    def __init__(self, bar: "BatchProgress"):
        super().__init__(level=logging.DEBUG)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.bar.line(f"batch {self.bar.done_batches + 1}/{self.bar.batches}: AutoAttack warning: {message}")
        elif message.startswith(("running ", "robust accuracy after ")):
            self.bar.line(f"batch {self.bar.done_batches + 1}/{self.bar.batches}: {message}")


@contextmanager
def _autoattack_progress(bar: "BatchProgress | None") -> Iterator[None]:
    """Inside the block, pyautoattack's per-attack DEBUG lines go to ``bar`` (and only there: the
    logger does not propagate them meanwhile; its warnings are echoed on the bar's line)."""
    if bar is None or bar.stream is None:
        yield
        return
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = _ForwardAutoAttack(bar)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def make_attack(name: str, model: nn.Module, cfg: EvalConfig, device) -> AttackFn:
    """The protocol's attack ``name`` ("natural" leaves the images as they are)."""
    if name == "natural":
        def natural(xb, yb, first):
            with torch.no_grad():
                return xb, model(xb).argmax(1)
        return natural
    if name == "pgd20":
        return pgd_attack(model, cfg, device, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps,
                          clamp_start=cfg.pgd_clamp_start)
    if name == "cw":
        return cw_attack(model, cfg, device)
    if name == "autoattack":
        return autoattack_attack(model, cfg, device)
    raise InputError(f"unknown attack {name!r}; expected one of {list(ATTACKS)}")


def _autoattack_adversary(model, cfg: EvalConfig, device):
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - installed with the pipeline extra
        raise InputError("AutoAttack needs the 'pyautoattack' package (pip install pyautoattack==0.2.0)") from exc
    logging.getLogger(AUTOATTACK_LOGGER).setLevel(logging.INFO)
    if cfg.autoattack_version != "custom":
        return AutoAttack(model, norm="Linf", eps=cfg.eps, version=cfg.autoattack_version, device=device,
                          seed=cfg.seed)
    adversary = AutoAttack(model, norm="Linf", eps=cfg.eps, version="custom", attacks=list(cfg.autoattack_attacks),
                           device=device, seed=cfg.seed)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter, apgd.n_restarts = cfg.autoattack_iterations, 1
    return adversary


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def captured_warnings(logger_name: str = AUTOATTACK_LOGGER) -> Iterator[list[str]]:
    """The WARNING-and-above messages ``logger_name`` emits inside the block (pyautoattack
    reports its own checks this way, and only this way, when it has a logger)."""
    handler = _Collect()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, cfg: EvalConfig,
               device, starts: list[int] | None = None) -> torch.Tensor:
    """The attack's own per-image correctness under ``name`` on the batches ``starts``
    (default: all), in the order of ``starts``; no checks (benchmarks time the attack alone)."""
    model.eval()
    starts = batch_starts(len(x), cfg.batch_size) if starts is None else starts
    with fp32_matmuls(), frozen_parameters(model):
        _, pred = _batched_attack(make_attack(name, model, cfg, device), x, y, starts, cfg.batch_size, device, name)
    return pred == _select(y, starts, cfg.batch_size)


# ----------------------------------------------------------------------------- measuring
def perturbation_stats(x_adv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: ``|x_adv - x|_inf`` and whether ``x_adv`` lies in [0, 1] (NaN does not)."""
    if len(x) == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    if x_adv.shape != x.shape:
        raise InputError(f"an attack returned x_adv of shape {tuple(x_adv.shape)} for images {tuple(x.shape)}")
    diff = (x_adv.float() - x.float()).abs().flatten(1)
    linf = torch.where(diff.isnan().any(1), torch.full_like(diff[:, 0], float("inf")), diff.amax(1))
    flat = x_adv.flatten(1)
    in_range = ((flat >= 0) & (flat <= 1)).all(1)
    return linf, in_range


def measure(attack: AttackFn, name: str, x, y, starts: list[int], cfg: EvalConfig, device,
            reference: nn.Module | None, progress=None) -> dict[str, torch.Tensor]:
    """Per-image figures of one attack on the batches ``starts``: the attack's own correctness
    ("own"), and with a ``reference`` model the recomputed correctness, |x_adv - x|_inf and
    whether x_adv is in [0, 1]. ``progress``: a stream for one line per batch (None: silent)."""
    bs = cfg.batch_size
    x_adv, pred = _batched_attack(attack, x, y, starts, bs, device, name, progress)
    x_mine, y_mine = _select(x, starts, bs), _select(y, starts, bs)
    out = {"own": pred == y_mine}
    if reference is not None:
        linf, in_range = perturbation_stats(x_adv, x_mine)
        out.update(recomputed=predict(reference, x_adv, bs, device) == y_mine, linf=linf, in_range=in_range)
    return out


def separate_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy made before any attack, when no copy loaded from disk is given:
    whatever an attack does to the model it attacks (modes, buffers, weights) cannot reach it."""
    return copy.deepcopy(attacks.unwrap(model)).eval()


def _num_classes(model: nn.Module, x: torch.Tensor, device) -> int:
    """The model's class count: from its options (robustkd.models.Classifier) or a
    ``num_classes`` attribute, else one forward of the *eager* module (never a compiled graph
    traced only to read a shape)."""
    eager = attacks.unwrap(model)
    options = getattr(eager, "options", None)
    if isinstance(options, dict) and isinstance(options.get("num_classes"), int):
        return options["num_classes"]
    declared = getattr(eager, "num_classes", None)
    if isinstance(declared, int):
        return declared
    with torch.no_grad():
        return int(eager(x[:1].to(device)).shape[1])


def compiled_parts(model: nn.Module) -> list[str]:
    """What runs through a torch.compile'd module: the natural forward when ``model`` is one
    (every attack and check unwraps it); nothing for an eager model."""
    return ["natural"] if hasattr(model, "_orig_mod") else []


# ----------------------------------------------------------------------------- checks
def check_perturbation(linf: torch.Tensor, eps: float, name: str) -> Check:
    """Every image within the eps-ball (plus float slack)."""
    worst = linf.max().item() if len(linf) else 0.0
    outside = int((linf > eps + LINF_SLACK).sum())
    detail = (f"{name}: max |x_adv - x|_inf = {worst:.6g}, eps = {eps:.6g}; "
              f"{outside} of {len(linf)} image(s) outside the ball")
    return Check(outside == 0, detail)


def check_range(in_range: torch.Tensor, name: str) -> Check:
    bad = int((~in_range).sum())
    return Check(bad == 0, f"{name}: {bad} of {len(in_range)} adversarial image(s) leave [0, 1]")


def check_recomputed(own: torch.Tensor, recomputed: torch.Tensor, name: str) -> Check:
    """The attack's figure against a separate forward of the model as loaded, on its own x_adv."""
    n = len(own)
    differ = int((own != recomputed).sum())
    detail = (f"{name}: attack's own accuracy {percent(int(own.sum()), n)}% "
              f"({int(own.sum())}/{n}), recomputed from x_adv by a separate eval-mode forward "
              f"{percent(int(recomputed.sum()), n)}% ({int(recomputed.sum())}/{n}); {differ} image(s) differ")
    return Check(differ == 0, detail)


def check_not_above_natural(natural: torch.Tensor, own: torch.Tensor, name: str) -> Check:
    """Images wrong without attack must stay wrong: x itself is in the ball, so an attack that
    returns a correctly classified point for them returned something worse than doing nothing."""
    n = len(natural)
    above = int((own & ~natural).sum())
    detail = (f"{name}: {percent(int(own.sum()), n)}% by its own figure, natural {percent(int(natural.sum()), n)}%; "
              f"{above} image(s) wrong without attack are right under it")
    return Check(above == 0, detail)


def check_unbounded(correct: torch.Tensor, num_classes: int, margin: float, eps: float) -> Check:
    """An unbounded attack must reach about chance or below: if it does not, its gradient
    does not lead anywhere (masked, obfuscated) and the bounded figures are not evidence."""
    n = len(correct)
    chance = 100.0 / num_classes
    acc = 100.0 * int(correct.sum()) / n if n else 0.0
    detail = (f"unbounded PGD (eps = {eps:g}): {percent(int(correct.sum()), n) if n else '-'}% on {n} image(s); "
              f"chance {chance:.2f}%, allowed up to {chance + margin:.2f}%")
    return Check(acc <= chance + margin, detail)


def check_eps_sweep(accuracy: dict[float, float], tolerance: float) -> Check:
    """Accuracy (percent, by eps) must not rise as eps grows: a larger ball contains the smaller
    one, so a rise means the attack finds less in more room (a masking symptom)."""
    items = sorted(accuracy.items())
    worst_rise, at = 0.0, None
    lowest = float("inf")
    for eps, acc in items:
        if acc - lowest > worst_rise:
            worst_rise, at = acc - lowest, eps
        lowest = min(lowest, acc)
    shown = ", ".join(f"{e * 255:g}/255: {a:.2f}%" for e, a in items)
    detail = f"PGD accuracy along eps: {shown}; largest rise {worst_rise:.2f} points (tolerance {tolerance:g})"
    if at is not None and worst_rise > tolerance:
        detail += f" at eps = {at * 255:g}/255"
    return Check(worst_rise <= tolerance, detail)


def check_autoattack_warnings(messages: list[str]) -> Check:
    if not messages:
        return Check(True, "AutoAttack logged no warning")
    unique = list(dict.fromkeys(messages))
    return Check(False, f"AutoAttack warned {len(messages)} time(s): " + " | ".join(unique))


# ----------------------------------------------------------------------------- the evaluation
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
                   device, log: Callable[[str], None] = print, rank: int = 0,
                   world_size: int = 1, reference: nn.Module | None = None,
                   subsets: dict[str, torch.Tensor] | None = None,
                   progress="stderr") -> EvaluationResult:
    """Per-image correctness for each configured attack on (x, y), with the protocol's checks.

    ``subsets``: {attack: positions in x} for attacks run on part of the images only (the
    protocol's AutoAttack on a stated stratified subset); the others see every image.

    ``reference``: a separate copy of the model as loaded from disk, used only to recompute
    each attack's accuracy from its x_adv (default: a deep copy made here, before any attack).
    With ``world_size`` > 1 (an initialised process group), each rank attacks its share of
    whole batches and the per-image results are gathered: every rank returns the full result,
    equal to a single-process run on the same images. Failed checks flag the result; nothing
    is raised for them.

    Every attack runs in fp32 with TF32 off (:func:`fp32_matmuls`) on the model's parameters
    frozen; ``progress``: the stream for one line per attack and batch (AutoAttack's attacks and
    the masking checks included), None for silence.
    """
    progress = sys.stderr if progress == "stderr" else progress   # the stream at call time (captured in tests)
    with ExitStack() as stack:
        stack.enter_context(fp32_matmuls())
        stack.enter_context(frozen_parameters(model))
        return _evaluate_model(model, x, y, cfg, device, log, rank, world_size, reference, subsets, progress)


def _evaluate_model(model, x, y, cfg: EvalConfig, device, log, rank, world_size, reference, subsets,
                    progress) -> EvaluationResult:
    model = model.to(device).eval()
    if cfg.checks:
        reference = (reference if reference is not None else separate_copy(model)).to(device).eval()
    else:
        reference = None
    positions = _check_subsets(subsets or {}, len(x), cfg)
    names = ["natural"] + [a for a in cfg.attacks if a != "natural"]
    local: dict[str, dict[str, torch.Tensor]] = {}
    messages: list[str] = []
    seconds: dict[str, float] = {}
    for name in names:
        xs, ys = (x[positions[name]], y[positions[name]]) if name in positions else (x, y)
        starts = batch_starts(len(xs), cfg.batch_size, rank, world_size)
        start = time.perf_counter()
        with captured_warnings() as caught:
            local[name] = measure(make_attack(name, model, cfg, device), name, xs, ys, starts, cfg, device,
                                  reference if name != "natural" else None, progress)
        if device_type(device) == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start
        messages += caught
    n_mask = min(cfg.masking_images, len(x)) if cfg.checks else 0
    masking_local = _measure_masking(model, x[:n_mask], y[:n_mask], cfg, device, rank, world_size, seconds,
                                     progress)
    if world_size > 1:
        local = {name: _gather({name: m}, len(positions.get(name, x)), cfg.batch_size, world_size)[name]
                 for name, m in local.items()}
        masking_local = _gather(masking_local, n_mask, cfg.batch_size, world_size)
        messages = [m for part in _all_gather(messages) for m in part]
    result = _assemble(local, masking_local, messages, cfg, _num_classes(model, x, device) if len(x) else 0,
                       positions)
    result.seconds = seconds
    result.compiled_parts = compiled_parts(model)
    speed = result.images_per_s()
    for name, correct in result.correct.items():
        log(f"{name}: {percent(int(correct.sum()), len(correct))}% of {len(correct)} images "
            f"({speed[name]:.1f} images/s)")
    if result.worst_case is not None:
        log(f"worst case over attacks: {percent(int(result.worst_case.sum()), len(result.worst_case))}% "
            f"of {len(result.worst_case)} images")
    masking_speed = {name: v for name, v in speed.items() if name in result.masking}
    if masking_speed:
        log("masking checks: " + ", ".join(f"{name} {v:.1f} images/s" for name, v in masking_speed.items()))
    for name in result.failed:
        log(f"CHECK FAILED {name}: {result.checks[name].detail}")
    return result


def _measure_masking(model, x, y, cfg: EvalConfig, device, rank: int, world_size: int,
                     seconds: dict | None = None, progress=None) -> dict:
    """The gradient-masking attacks on (x, y): unbounded PGD and the eps sweep, from x itself;
    each one's wall-clock seconds into ``seconds`` (under its own name).

    No random start: at eps = 1 a uniform start is a random image, which would "succeed" even
    against a model whose gradient leads nowhere. Step sizes 2.5 eps / steps (Madry et al. 2018).
    """
    if len(x) == 0:
        return {}
    starts = batch_starts(len(x), cfg.batch_size, rank, world_size)
    out = {}

    def pgd_from_x(eps: float, steps: int) -> AttackFn:
        return pgd_attack(model, cfg, device, eps, 2.5 * eps / max(steps, 1), steps, start=None)

    seconds = {} if seconds is None else seconds

    def timed(name: str, attack: AttackFn) -> None:
        start = time.perf_counter()
        out[name] = measure(attack, f"masking {name}", x, y, starts, cfg, device, None, progress)
        if device_type(device) == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start

    timed("unbounded", pgd_from_x(cfg.unbounded_eps, cfg.unbounded_steps))
    for eps in cfg.sweep_eps:
        timed(sweep_key(eps), make_attack("natural", model, cfg, device) if eps == 0
              else pgd_from_x(eps, cfg.sweep_steps))
    return out


def device_type(device) -> str:
    return torch.device(device).type


def sweep_key(eps: float) -> str:
    """'sweep_8' for eps = 8/255 (eps in 255ths, the unit people read)."""
    return f"sweep_{eps * 255:g}"


def _check_subsets(subsets: dict[str, torch.Tensor], n: int, cfg: EvalConfig) -> dict[str, torch.Tensor]:
    """Sorted, unique, in-range positions per attack; at most one subset size below n (the
    worst case is taken over the images every attack saw)."""
    out = {}
    for name, pos in subsets.items():
        if name not in cfg.attacks or name == "natural":
            raise InputError(f"evaluation subset for {name!r}: expected one of the evaluated attacks "
                             f"{[a for a in cfg.attacks if a != 'natural']}")
        pos = torch.as_tensor(pos, dtype=torch.long)
        if len(pos) and (pos.min() < 0 or pos.max() >= n or len(pos.unique()) != len(pos)):
            raise InputError(f"evaluation subset for {name!r}: expected distinct positions in [0, {n}), "
                             f"found {len(pos)} positions in [{int(pos.min())}, {int(pos.max())}]")
        out[name] = pos.sort().values
    if len({tuple(p.tolist()) for p in out.values()}) > 1:
        raise InputError("evaluation subsets: every attack on a subset must use the same images")
    return out


def _assemble(measured: dict, masking: dict, messages: list[str], cfg: EvalConfig,
              num_classes: int, positions: dict[str, torch.Tensor] | None = None) -> EvaluationResult:
    positions = positions or {}
    natural = measured["natural"]["own"]
    own = {name: m["own"] for name, m in measured.items()}
    # wrong naturally: wrong under attack (natural taken on the attack's own images)
    correct = {name: own[name] & (natural[positions[name]] if name in positions else natural)
               for name in cfg.attacks}
    worst = None
    result_positions = dict(positions)
    if any(a != "natural" for a in cfg.attacks):
        common = next(iter(positions.values())) if positions else None
        worst = natural.clone() if common is None else natural[common].clone()
        for name, c in correct.items():
            worst &= c if (common is None or name in positions) else c[common]
        if common is not None:
            result_positions["worst_case"] = common
    result = EvaluationResult(correct=correct, own=own, worst_case=worst, num_classes=num_classes,
                              masking={k: v["own"] for k, v in masking.items()},
                              autoattack_warnings=list(messages), positions=result_positions)
    if cfg.checks:
        result.checks = _run_checks(measured, result, cfg)
    return result


def _run_checks(measured: dict, result: EvaluationResult, cfg: EvalConfig) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    natural = measured["natural"]["own"]
    for name, m in measured.items():
        if name == "natural":
            continue
        checks[f"{name}/linf"] = check_perturbation(m["linf"], cfg.eps, name)
        checks[f"{name}/range"] = check_range(m["in_range"], name)
        checks[f"{name}/recomputed"] = check_recomputed(m["own"], m["recomputed"], name)
        nat = natural[result.positions[name]] if name in result.positions else natural
        checks[f"{name}/not_above_natural"] = check_not_above_natural(nat, m["own"], name)
    if "unbounded" in result.masking:
        checks["masking/unbounded"] = check_unbounded(result.masking["unbounded"], result.num_classes,
                                                      cfg.unbounded_margin, cfg.unbounded_eps)
        sweep = {eps: 100.0 * result.masking[sweep_key(eps)].float().mean().item() for eps in cfg.sweep_eps}
        checks["masking/eps_sweep"] = check_eps_sweep(sweep, cfg.sweep_tolerance)
    if "autoattack" in measured:
        checks["autoattack/warnings"] = check_autoattack_warnings(result.autoattack_warnings)
    return checks


def _all_gather(obj) -> list:
    from .distributed import all_gather_objects

    return all_gather_objects(obj)


def _gather(local: dict[str, dict[str, torch.Tensor]], n: int, batch_size: int, world_size: int) -> dict:
    """Each rank's per-image figures put back in image order (every rank gets the whole)."""
    gathered = _all_gather({k: {f: (v.dtype, v.tolist()) for f, v in m.items()} for k, m in local.items()})
    rank_images = [torch.cat([torch.arange(i, min(i + batch_size, n))
                              for i in batch_starts(n, batch_size, rank, world_size)]
                             or [torch.empty(0, dtype=torch.long)]) for rank in range(world_size)]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, fields in local.items():
        out[name] = {}
        for f, v in fields.items():
            full = torch.zeros(n, dtype=v.dtype)
            for idx, part in zip(rank_images, gathered):
                dtype, values = part[name][f]
                full[idx] = torch.tensor(values, dtype=dtype)
            out[name][f] = full
    return out


# ----------------------------------------------------------------------------- reporting
def sha256_tensor(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, CPU, as stored): names a subset exactly."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def summarize(result: EvaluationResult, labels: torch.Tensor, classes: list[str]) -> dict:
    """The numeric results: percentages (rounded, from counts) at the top level, counts, totals
    and 95% Wilson intervals under "accuracy", per-class accuracy, what the gradient-masking
    checks measured, and the checks as 1 (passed) / 0 (failed); "flagged" is 1 if any failed."""
    labels = labels.cpu()
    n = int(len(labels))
    outcomes = dict(result.correct)
    if result.worst_case is not None:
        outcomes[WORST_CASE] = result.worst_case
    out: dict = {"num_images": n}
    # each record carries its own count and total: an attack on a subset has a smaller total
    out["accuracy"] = {name: accuracy_record(int(c.sum()), len(c)) for name, c in outcomes.items()}
    out.update({name: rec["percent"] for name, rec in out["accuracy"].items()})
    out["per_class_accuracy"] = {}
    for name, c in outcomes.items():
        lab = labels[result.images_of(name, n)]
        out["per_class_accuracy"][name] = {cls: percent(int(c[lab == i].sum()), int((lab == i).sum()))
                                           for i, cls in enumerate(classes) if (lab == i).any()}
    if result.masking:
        out["gradient_masking"] = _masking_summary(result)
    if result.checks:
        out["checks"] = _nest({name: int(c.passed) for name, c in result.checks.items()})
    out["checks_failed"] = len(result.failed)
    out["autoattack_warnings"] = len(result.autoattack_warnings)
    out["flagged"] = int(result.flagged)
    return out


def _masking_summary(result: EvaluationResult) -> dict:
    unbounded = result.masking["unbounded"]
    m = len(unbounded)
    sweep = {k[len("sweep_"):]: percent(int(v.sum()), m) for k, v in result.masking.items() if k.startswith("sweep_")}
    return {"num_images": m, "chance": round(100.0 / result.num_classes, 2),
            "unbounded": percent(int(unbounded.sum()), m), "eps_sweep_255": sweep}


def _nest(flat: dict[str, int]) -> dict:
    """{"pgd20/linf": 1} -> {"pgd20": {"linf": 1}}."""
    out: dict = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        out.setdefault(group, {})[name] = value
    return out


def check_details(result: EvaluationResult) -> dict:
    """The checks in words, for the text side of the results."""
    return {name: {"passed": c.passed, "detail": c.detail} for name, c in result.checks.items()}


def attack_settings(cfg: EvalConfig) -> dict:
    """What each evaluated attack was, in the protocol's terms."""
    all_settings = {
        "natural": {"attack": "none"},
        "pgd20": {"attack": "PGD", "loss": "cross-entropy", "steps": cfg.pgd_steps,
                  "step_size": cfg.pgd_step_size, "random_start": "uniform",
                  "start_clamped_to_0_1": cfg.pgd_clamp_start},
        "cw": {"attack": "CW-inf (PGD on the margin loss)", "kappa": cfg.cw_kappa, "steps": cfg.cw_steps,
               "step_size": cfg.cw_step_size, "random_start": "uniform"},
        "autoattack": {"attack": "AutoAttack", "package": "pyautoattack", "version": cfg.autoattack_version,
                       **({"attacks": list(cfg.autoattack_attacks), "apgd_iterations": cfg.autoattack_iterations}
                          if cfg.autoattack_version == "custom" else {})},
    }
    out = {name: all_settings[name] for name in ATTACKS if name in cfg.attacks}
    if cfg.checks:
        out["masking"] = {"images": cfg.masking_images, "unbounded_eps": cfg.unbounded_eps,
                          "unbounded_steps": cfg.unbounded_steps, "unbounded_margin_points": cfg.unbounded_margin,
                          "sweep_eps": list(cfg.sweep_eps), "sweep_steps": cfg.sweep_steps,
                          "sweep_tolerance_points": cfg.sweep_tolerance,
                          "step_size": "2.5 eps / steps", "random_start": "none"}
    return out
