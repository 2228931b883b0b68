"""Training objectives: TRADES and PGD-AT (teachers), ARD, IAD-I, RSLAD, AdaAD, DARWIN and
DARWIN-LF (students), and clean baselines. Formulas and defaults follow SPEC.md; every
[choice] there is a named field here.

Each objective returns ``(loss, parts)`` where ``parts`` maps names to detached scalar tensors,
and leaves the models in the train/eval modes it found them in. Teachers are only ever run
under ``torch.no_grad()``: they receive no gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks
from .attacks import kl_per_sample, model_modes
from .config import from_dict
from .distributed import global_max
from .grouped_bn import grouped_batchnorm
from .errors import InputError

EPS = 8 / 255     # L-inf radius, [0, 1] pixel units
ALPHA = 2 / 255   # attack step, [0, 1] pixel units


def reduce_kl(per_sample: torch.Tensor, num_classes: int, reduction: str) -> torch.Tensor:
    """'batchmean': mean over the batch of the class-summed KL (SPEC default).
    'elementwise_mean': mean over batch x classes, i.e. batchmean / C (``nn.KLDivLoss()``'s
    default, which ARD's and RSLAD's official code use)."""
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "elementwise_mean":
        return per_sample.mean() / num_classes
    raise InputError(f"unknown KL reduction {reduction!r}; expected 'batchmean' or 'elementwise_mean'")


# ====================================================================== DARWIN
@dataclass
class DarwinConfig:
    """DARWIN's objective (SPEC.md, "DARWIN"). Units: eps and step_size in [0, 1] pixels."""

    eps: float = EPS                      # L-inf radius
    step_size: float = ALPHA              # alpha, per attack step
    steps: int = 10                       # n, path length
    beta: float = 1.0                     # weight of the adversarial ARKD term [choice]
    gamma: float = 0.5                    # mix of the two terms of w(xh(i)|x)
    lambda_iakd: float = 1.0              # [choice]
    lambda_dbkd: float = 1.0              # [choice]
    margin: float = 1.0                   # triplet margin m [choice]
    distance: Literal["kl", "l2"] = "kl"  # D of the triplet: KL(a||.) or squared L2 [choice]
    weighting: Literal["adaptive", "uniform"] = "adaptive"
    random_start: bool = True             # xh(0) = x + U(-eps, eps) [choice]
    label_free: bool = False              # DARWIN-LF: teacher's argmax replaces every label [choice]
    use_iakd: bool = True
    use_dbkd: bool = True
    tau: float = 1.0                      # softmax temperature of every p(.)
    attack_bn_mode: Literal["eval", "train"] = "eval"   # student mode while walking the paths [choice]
    # How the student's loss forwards on the 2n+1 points are run when it is in train mode:
    # 'per_point' - each point normalised by its own mini-batch's statistics (the default, what a
    #               straightforward implementation computes);
    # 'joint'     - one forward over all points, batch norm sees them together (changes BN).
    loss_forward: Literal["per_point", "joint"] = "per_point"
    # How forwards over several mini-batches (the two attack branches, the teacher on the path,
    # the student's per-point loss forwards) are run; the values are the same either way:
    # 'joint' - concatenated into one large forward (per-point BN kept by robustkd.grouped_bn):
    #           better GPU utilisation; 'split' - one forward per mini-batch: faster on CPUs, where
    #           large batches fall out of cache; 'auto' - joint on CUDA, split elsewhere.
    batching: Literal["auto", "joint", "split"] = "auto"

    def __post_init__(self):
        if self.steps < 1:
            raise InputError(f"DarwinConfig.steps must be >= 1, found {self.steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise InputError(f"DarwinConfig.gamma must lie in [0, 1], found {self.gamma}")
        if self.distance not in ("kl", "l2"):
            raise InputError(f"DarwinConfig.distance must be 'kl' or 'l2', found {self.distance!r}")
        if self.weighting not in ("adaptive", "uniform"):
            raise InputError(f"DarwinConfig.weighting must be 'adaptive' or 'uniform', found {self.weighting!r}")
        if self.attack_bn_mode not in ("eval", "train"):
            raise InputError(f"DarwinConfig.attack_bn_mode must be 'eval' or 'train', found {self.attack_bn_mode!r}")
        if self.batching not in ("auto", "joint", "split"):
            raise InputError(f"DarwinConfig.batching must be 'auto', 'joint' or 'split', found {self.batching!r}")
        if self.loss_forward not in ("per_point", "joint"):
            raise InputError(f"DarwinConfig.loss_forward must be 'per_point' or 'joint', found {self.loss_forward!r}")


def path_weights(i: int, n: int, p_t_clean: torch.Tensor, p_s_point: torch.Tensor, y: torch.Tensor,
                 gamma: float, weighting: str) -> torch.Tensor:
    """w(xh(i)|x) = (1-gamma) i/n + gamma |p_t(x)_y - p_s(xh(i))_y| / max_batch |...|.

    Computed without gradient; a zero denominator gives a zero second term. Under torchrun the
    max is over the global batch (all ranks), so the weights are those of one process.
    """
    if weighting == "uniform":
        return torch.ones(len(y), device=y.device)
    with torch.no_grad():
        gap = (p_t_clean.gather(1, y[:, None]) - p_s_point.gather(1, y[:, None])).abs().squeeze(1)
        denom = global_max(gap.max())
        second = gap / denom if denom > 0 else torch.zeros_like(gap)
        return (1 - gamma) * i / n + gamma * second


def triplet(anchor: torch.Tensor, pos_logits: torch.Tensor, neg_logits: torch.Tensor, margin: float,
            distance: str, tau: float = 1.0) -> torch.Tensor:
    """L_tri(a, pos, neg) = max(0, D(a, pos) - D(a, neg) + m) per sample, a = teacher logits."""
    if distance == "kl":
        d_pos = kl_per_sample(anchor, pos_logits, tau)
        d_neg = kl_per_sample(anchor, neg_logits, tau)
    else:
        p_a = F.softmax(anchor.float() / tau, 1)
        d_pos = (p_a - F.softmax(pos_logits.float() / tau, 1)).pow(2).sum(1)
        d_neg = (p_a - F.softmax(neg_logits.float() / tau, 1)).pow(2).sum(1)
    return F.relu(d_pos - d_neg + margin)


def resolve_batching(batching: str, device: torch.device) -> bool:
    """True: join mini-batches into one forward ('auto': on CUDA only)."""
    return batching == "joint" or (batching == "auto" and device.type == "cuda")


def _student_forwards(student: nn.Module, points: list[torch.Tensor], mode: str,
                      join: bool = True) -> list[torch.Tensor]:
    """Student logits on each point; per point (own BN statistics) or in one joint-BN forward."""
    sizes = [len(p) for p in points]
    if mode == "joint":
        return list(student(torch.cat(points)).split(sizes))
    if not join:
        return [student(p) for p in points]
    if not student.training:  # eval mode: samples are independent, one forward is per-point
        return list(student(torch.cat(points)).split(sizes))
    if len(set(sizes)) == 1:
        with grouped_batchnorm(student, len(points)):
            return list(student(torch.cat(points)).split(sizes))
    return [student(p) for p in points]


def _no_grad_forward(model: nn.Module, points: list[torch.Tensor], join: bool) -> list[torch.Tensor]:
    """An eval-mode model's logits on several mini-batches, joined or one by one."""
    if join:
        return list(model(torch.cat(points)).float().split([len(p) for p in points]))
    return [model(p).float() for p in points]


def darwin_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                x_pair: torch.Tensor | None, y_pair: torch.Tensor | None, config: DarwinConfig,
                generator: torch.Generator | None = None, autocast=contextlib.nullcontext
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_ARKD + lambda_iakd L_IAKD + lambda_dbkd L_DBKD (SPEC.md), returning (loss, parts).

    ``x_pair``/``y_pair`` are the partners (a different class each); they may be None when
    DBKD is off. Parts: 'arkd', 'iakd', 'dbkd' (unweighted module values).
    """
    cfg = config
    n = cfg.steps
    if cfg.use_dbkd and x_pair is None:
        raise InputError("darwin_loss: DBKD is on but no partner images (x_pair) were given")
    student_mode = student.training
    join = resolve_batching(cfg.batching, x.device)
    with model_modes([teacher], [False]):
        with torch.no_grad(), autocast():
            t_clean = _no_grad_forward(teacher, [x, x_pair] if cfg.use_dbkd else [x], join)
        t_x = t_clean[0]
        t_xp = t_clean[1] if cfg.use_dbkd else None
        if cfg.label_free:
            y = t_x.argmax(1)
            y_pair = t_xp.argmax(1) if t_xp is not None else None

        start = "uniform" if cfg.random_start else None
        kw = dict(eps=cfg.eps, alpha=cfg.step_size, steps=n, start=start, bn_mode=cfg.attack_bn_mode,
                  generator=generator, autocast=autocast)
        if cfg.use_dbkd:
            path_u, path_t = attacks.dual_branch_paths(student, x, y, x_pair, target=y, joint=join, **kw)
        else:
            path_u, path_t = attacks.pgd_ce(student, x, y, return_path=True, **kw), []

        # Teacher on the untargeted path: xh(n) for ARKD, xh(1..n-1) for IAKD; one batched
        # forward (eval mode, so batching changes nothing).
        t_points = path_u if cfg.use_iakd else path_u[-1:]
        with torch.no_grad(), autocast():
            t_path = _no_grad_forward(teacher, t_points, join)
        if not cfg.use_iakd:
            t_path = [None] * (n - 1) + t_path

    student.train(student_mode)
    need_path = cfg.use_iakd or cfg.use_dbkd
    points = [x] + (path_u if need_path else path_u[-1:]) + (path_t if cfg.use_dbkd else [])
    with autocast():
        outs = _student_forwards(student, points, cfg.loss_forward, join)
    s_x = outs[0].float()
    s_u = [o.float() for o in outs[1:1 + (n if need_path else 1)]]
    s_t = [o.float() for o in outs[1 + n:]] if cfg.use_dbkd else []
    if not need_path:
        s_u = [None] * (n - 1) + s_u

    arkd = kl_per_sample(t_x, s_x, cfg.tau).mean() + cfg.beta * kl_per_sample(t_path[-1], s_u[-1], cfg.tau).mean()
    zero = torch.zeros((), device=x.device)
    iakd, dbkd = zero, zero
    if need_path:
        p_t_x = F.softmax(t_x / cfg.tau, 1)
        w_u = [path_weights(i, n, p_t_x, F.softmax(s_u[i - 1].detach() / cfg.tau, 1), y, cfg.gamma,
                            cfg.weighting) for i in range(1, n + 1)]
    if cfg.use_iakd:
        iakd = sum((w_u[i - 1] * kl_per_sample(t_path[i - 1], s_u[i - 1], cfg.tau)).mean()
                   for i in range(1, n)) if n > 1 else zero
    if cfg.use_dbkd:
        p_t_xp = F.softmax(t_xp / cfg.tau, 1)
        total = zero
        for i in range(1, n + 1):
            w_t = path_weights(i, n, p_t_xp, F.softmax(s_t[i - 1].detach() / cfg.tau, 1), y_pair,
                               cfg.gamma, cfg.weighting)
            total = total + (w_u[i - 1] * triplet(t_x, s_u[i - 1], s_t[i - 1], cfg.margin, cfg.distance, cfg.tau)).mean()
            total = total + (w_t * triplet(t_xp, s_t[i - 1], s_u[i - 1], cfg.margin, cfg.distance, cfg.tau)).mean()
        dbkd = total
    loss = arkd + cfg.lambda_iakd * iakd + cfg.lambda_dbkd * dbkd
    return loss, {"arkd": arkd.detach(), "iakd": iakd.detach(), "dbkd": dbkd.detach()}


# ====================================================================== teachers
@dataclass
class TradesConfig:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(p(x) || p(xh)), clean term not detached."""

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    beta: float = 6.0
    random_start: Literal["normal", "uniform"] = "normal"   # x + 0.001 N(0, 1) as the official code
    attack_bn_mode: Literal["eval", "train"] = "eval"


def trades_loss(model, x, y, cfg: TradesConfig, generator=None, autocast=contextlib.nullcontext):
    mode = model.training
    with model_modes([model], [False]), torch.no_grad(), autocast():
        target = model(x).float()
    x_adv = attacks.pgd_kl(model, x, target, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start=cfg.random_start, bn_mode=cfg.attack_bn_mode, generator=generator,
                           autocast=autocast)
    model.train(mode)
    with autocast():
        nat = model(x).float()
        adv = model(x_adv).float()
    ce = F.cross_entropy(nat, y)
    robust = kl_per_sample(nat, adv).mean()
    return ce + cfg.beta * robust, {"ce": ce.detach(), "kl": robust.detach()}


@dataclass
class PgdAtConfig:
    """PGD adversarial training (Madry et al.): CE(f(xh), y)."""

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    attack_bn_mode: Literal["eval", "train"] = "eval"


def pgd_at_loss(model, x, y, cfg: PgdAtConfig, generator=None, autocast=contextlib.nullcontext):
    x_adv = attacks.pgd_ce(model, x, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", bn_mode=cfg.attack_bn_mode, generator=generator,
                           autocast=autocast)
    with autocast():
        ce = F.cross_entropy(model(x_adv).float(), y)
    return ce, {"ce_adv": ce.detach()}


@dataclass
class NaturalConfig:
    """Clean training without adversarial examples (the non-robust reference)."""


def natural_loss(model, x, y, cfg: NaturalConfig, generator=None, autocast=contextlib.nullcontext):
    with autocast():
        ce = F.cross_entropy(model(x).float(), y)
    return ce, {"ce": ce.detach()}


# ====================================================================== baselines
@dataclass
class ArdConfig:
    """ARD (Goldblum et al. 2020): a T^2 KL(p_t^T(x) || p_s^T(xh)) + (1-a) CE(f_s(x), y)."""

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    temperature: float = 30.0
    alpha: float = 1.0
    attack_bn_mode: Literal["eval", "train"] = "train"   # official code attacks in train mode
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "elementwise_mean"  # official nn.KLDivLoss()


def ard_loss(student, teacher, x, y, cfg: ArdConfig, generator=None, autocast=contextlib.nullcontext):
    x_adv = attacks.pgd_ce(student, x, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", bn_mode=cfg.attack_bn_mode, generator=generator, autocast=autocast)
    with model_modes([teacher], [False]), torch.no_grad(), autocast():
        t_x = teacher(x).float()
    with autocast():
        s_adv = student(x_adv).float()
        s_x = student(x).float() if cfg.alpha < 1 else None
    T = cfg.temperature
    kd = reduce_kl(kl_per_sample(t_x, s_adv, T), t_x.shape[1], cfg.kl_reduction)
    ce = F.cross_entropy(s_x, y) if s_x is not None else torch.zeros((), device=x.device)
    loss = cfg.alpha * T * T * kd + (1 - cfg.alpha) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach()}


@dataclass
class IadConfig:
    """IAD-I (Zhu et al. 2022): T^2 KL(p_t(x)||p_s(xh)) + (1 - A) KL(p_s(x)||p_s(xh)), A = p_t(xh)_y^beta.

    Before ``introspection_start_epoch`` A = 1 (no introspection term). The student's own
    clean prediction p_s(x) is a detached target [choice].
    """

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    temperature: float = 1.0
    beta: float = 0.1
    introspection_start_epoch: int = 60
    attack_bn_mode: Literal["eval", "train"] = "train"
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "batchmean"


def iad_loss(student, teacher, x, y, cfg: IadConfig, epoch: int = 0, generator=None,
             autocast=contextlib.nullcontext):
    x_adv = attacks.pgd_ce(student, x, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", bn_mode=cfg.attack_bn_mode, generator=generator, autocast=autocast)
    introspect = epoch >= cfg.introspection_start_epoch
    with model_modes([teacher], [False]), torch.no_grad(), autocast():
        t_out = teacher(torch.cat([x, x_adv]) if introspect else x).float()
    t_x = t_out[:len(x)]
    with autocast():
        s_adv = student(x_adv).float()
        s_x = student(x).float() if introspect else None
    T = cfg.temperature
    C = t_x.shape[1]
    kd_per = kl_per_sample(t_x, s_adv, T) * T * T
    if introspect:
        a = F.softmax(t_out[len(x):], 1).gather(1, y[:, None]).squeeze(1).pow(cfg.beta)
        intro_per = (1 - a) * kl_per_sample(s_x.detach(), s_adv)
    else:
        intro_per = torch.zeros_like(kd_per)
    kd = reduce_kl(kd_per, C, cfg.kl_reduction)
    intro = reduce_kl(intro_per, C, cfg.kl_reduction)
    return kd + intro, {"kd": kd.detach(), "introspection": intro.detach()}


@dataclass
class RsladConfig:
    """RSLAD (Zi et al. 2021): 5/6 KL(p_t(x)||p_s(xh)) + 1/6 KL(p_t(x)||p_s(x)); the attack
    maximises KL(p_t(x)||p_s(xh)) from x + 0.001 N(0, 1) in eval mode."""

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    adv_weight: float = 5 / 6
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "elementwise_mean"  # official scaling
    kl_scale: float = 1.0     # the official code multiplies by 10 on CIFAR-100
    attack_bn_mode: Literal["eval", "train"] = "eval"


def rslad_loss(student, teacher, x, y, cfg: RsladConfig, generator=None, autocast=contextlib.nullcontext):
    with model_modes([teacher], [False]), torch.no_grad(), autocast():
        t_x = teacher(x).float()
    x_adv = attacks.pgd_kl(student, x, t_x, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="normal", bn_mode=cfg.attack_bn_mode, generator=generator, autocast=autocast)
    with autocast():
        s_adv = student(x_adv).float()
        s_x = student(x).float()
    C = t_x.shape[1]
    adv = reduce_kl(kl_per_sample(t_x, s_adv), C, cfg.kl_reduction) * cfg.kl_scale
    nat = reduce_kl(kl_per_sample(t_x, s_x), C, cfg.kl_reduction) * cfg.kl_scale
    loss = cfg.adv_weight * adv + (1 - cfg.adv_weight) * nat
    return loss, {"kl_adv": adv.detach(), "kl_nat": nat.detach()}


@dataclass
class AdaadConfig:
    """AdaAD: the attack maximises KL(p_t(xh)||p_s(xh)) with the teacher at the moving point;
    L = KL(p_t(xh)||p_s(xh))."""

    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    random_start: Literal["normal", "uniform"] = "normal"
    attack_bn_mode: Literal["eval", "train"] = "eval"


def adaad_loss(student, teacher, x, y, cfg: AdaadConfig, generator=None, autocast=contextlib.nullcontext):
    x_adv = attacks.random_start(x, cfg.eps, cfg.random_start, generator)
    plain_student = attacks.unwrap(student)
    with model_modes([plain_student, teacher], [cfg.attack_bn_mode == "train", False]), torch.enable_grad():
        for _ in range(cfg.steps):
            x_adv.requires_grad_(True)
            with autocast():
                kl = kl_per_sample(teacher(x_adv), plain_student(x_adv)).sum()
            grad, = torch.autograd.grad(kl, x_adv)
            x_adv = attacks.project(x_adv.detach() + cfg.step_size * grad.sign(), x, cfg.eps)
    with model_modes([teacher], [False]), torch.no_grad(), autocast():
        t_adv = teacher(x_adv).float()
    with autocast():
        s_adv = student(x_adv).float()
    loss = kl_per_sample(t_adv, s_adv).mean()
    return loss, {"kl_adv": loss.detach()}


@dataclass
class NaturalKdConfig:
    """Clean distillation KL(p_t(x)||p_s(x)), no adversarial examples (the non-robust reference)."""

    tau: float = 1.0


def natural_kd_loss(student, teacher, x, y, cfg: NaturalKdConfig, generator=None,
                    autocast=contextlib.nullcontext):
    with model_modes([teacher], [False]), torch.no_grad(), autocast():
        t_x = teacher(x).float()
    with autocast():
        kd = kl_per_sample(t_x, student(x).float(), cfg.tau).mean()
    return kd, {"kd": kd.detach()}


# ====================================================================== registry
@dataclass
class Objective:
    """A named objective bound to its config: ``objective(student, teacher, batch, epoch)``."""

    name: str
    config: object
    needs_teacher: bool
    needs_partners: bool
    fn: Callable = field(repr=False)

    def __call__(self, model, teacher, batch, epoch: int = 0, generator=None,
                 autocast=contextlib.nullcontext):
        cfg = self.config
        if self.name in ("darwin", "darwin_lf"):
            return darwin_loss(model, teacher, batch.x, batch.y, batch.x_pair, batch.y_pair, cfg,
                               generator=generator, autocast=autocast)
        if self.name == "iad":
            return iad_loss(model, teacher, batch.x, batch.y, cfg, epoch=epoch, generator=generator,
                            autocast=autocast)
        if self.needs_teacher:
            return self.fn(model, teacher, batch.x, batch.y, cfg, generator=generator, autocast=autocast)
        return self.fn(model, batch.x, batch.y, cfg, generator=generator, autocast=autocast)


_OBJECTIVES = {
    # name: (config class, function, needs teacher)
    "natural": (NaturalConfig, natural_loss, False),
    "trades": (TradesConfig, trades_loss, False),
    "pgd_at": (PgdAtConfig, pgd_at_loss, False),
    "natural_kd": (NaturalKdConfig, natural_kd_loss, True),
    "ard": (ArdConfig, ard_loss, True),
    "iad": (IadConfig, iad_loss, True),
    "rslad": (RsladConfig, rslad_loss, True),
    "adaad": (AdaadConfig, adaad_loss, True),
    "darwin": (DarwinConfig, darwin_loss, True),
    "darwin_lf": (DarwinConfig, darwin_loss, True),
}
TEACHER_METHODS = ("trades", "pgd_at", "natural")
DISTILL_METHODS = ("darwin", "darwin_lf", "rslad", "ard", "iad", "adaad", "natural_kd")


def available_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def create_objective(name: str, settings: dict | None = None, where: str | None = None) -> Objective:
    """Build a method's objective from a settings dict (unknown keys rejected)."""
    if name not in _OBJECTIVES:
        raise InputError(f"unknown method {name!r}; expected one of {available_objectives()}")
    cls, fn, needs_teacher = _OBJECTIVES[name]
    settings = dict(settings or {})
    if name == "darwin_lf":
        settings.setdefault("label_free", True)
    cfg = from_dict(cls, settings, where or f"method {name}")
    needs_partners = name in ("darwin", "darwin_lf") and cfg.use_dbkd
    return Objective(name, cfg, needs_teacher, needs_partners, fn)
