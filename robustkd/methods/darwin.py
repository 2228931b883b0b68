"""DARWIN (Dong, Koniusz, Chen, Wang, Ong, CVPR 2024): robust distillation on untargeted and
targeted intermediate adversarial samples. Source: the paper's slides; the formulas as
implemented are in docs/methods.md ("DARWIN"), every [choice] a field of :class:`DarwinConfig`.

    L = L_ARKD + lambda_iakd L_IAKD + lambda_dbkd L_DBKD
    L_ARKD = KL(p_t(x) || p_s(x)) + beta KL(p_t(xh) || p_s(xh))
    L_IAKD = sum_{i=1}^{n-1} w(xh(i)|x) KL(p_t(xh(i)) || p_s(xh(i)))
    L_DBKD = sum_{i=1}^{n} [w(xh(i)|x) L_tri(p_t(x), p_s(xh(i)), p_s(xt(i)))
                           + w(xt(i)|x') L_tri(p_t(x'), p_s(xt(i)), p_s(xh(i)))]

No official code exists; every [choice] is a named setting of :class:`DarwinConfig` with its
row in docs/choices.md: beta, the lambdas, the margin and distance, the random start (on/off, its
kind, its clamp), the attack's batch-norm mode, the KL reduction, the partner's sampling, pool and
augmentation (read by the data pipeline through ``Method.partner_options``), the targeted path's
class and loss, and DARWIN-LF's partner repair.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks
from ..attacks import kl_per_sample, model_modes
from ..distributed import global_max
from ..errors import InputError
from ..grouped_bn import grouped_batchnorm
from .common import ALPHA, EPS, check_attack, reduce_kl
from .registry import Method, Schedule, register

# The allowed values of the [choice]s below (their defaults are the first).
CHOICES = {
    "distance": ("kl", "l2"),
    "weighting": ("adaptive", "uniform"),
    "attack_bn_mode": ("eval", "train"),
    "batching": ("auto", "joint", "split"),
    "loss_forward": ("per_point", "joint"),
    "start_kind": ("uniform", "normal"),
    "kl_reduction": ("batchmean", "elementwise_mean"),
    "partner_sampling": ("uniform_other_class", "uniform_other_image"),
    "partner_pool": ("same", "real"),
    "target_class": ("anchor", "teacher"),
    "targeted_loss": ("ce", "kl"),
    "partner_repair": ("batch_other_class", "none"),
}

@dataclass
class DarwinConfig:
    """DARWIN's objective (docs/methods.md, "DARWIN"). Units: eps and step_size in [0, 1] pixels."""

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
    random_start: bool = True             # xh(0) = x + U(-eps, eps) [choice]; false: xh(0) = x
    # The start's noise [choice]: 'uniform' U(-eps, eps) (PGD's); 'normal' 0.001 N(0, 1) (TRADES').
    start_kind: Literal["uniform", "normal"] = "uniform"
    # Project the start into the eps-ball and [0, 1] before the first gradient [choice] (as the
    # evaluation attacks; the baselines' official training attacks do not: their clamp_start false).
    clamp_start: bool = True
    label_free: bool = False              # DARWIN-LF: teacher's argmax replaces every label [choice]
    use_iakd: bool = True
    use_dbkd: bool = True
    tau: float = 1.0                      # softmax temperature of every p(.)
    # Reduction of the ARKD and IAKD KL terms [choice]: 'batchmean' (mean over the batch of the
    # class-summed KL) or 'elementwise_mean' (over batch x classes = batchmean / C), as the
    # baselines' kl_reduction (docs/methods.md, "Conventions"). The triplet's distances D are
    # per-sample values inside the hinge with margin m: not reduced by this.
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "batchmean"
    # The partner x' (docs/methods.md, "DARWIN"), drawn by the data pipeline:
    # partner_sampling [choice]: 'uniform_other_class' - a class drawn uniformly from the other
    #   classes, then an image uniformly from that class; 'uniform_other_image' - an image drawn
    #   uniformly from all images of the other classes (the same on a class-balanced pool).
    partner_sampling: Literal["uniform_other_class", "uniform_other_image"] = "uniform_other_class"
    # partner_pool [choice]: 'same' - from the anchor's own pool (a real image's partner is real,
    #   a generated image's is generated, by the generated file's labels); 'real' - always real.
    partner_pool: Literal["same", "real"] = "same"
    partner_augment: bool = True          # the partner gets its own random crop and flip [choice]
    # The targeted path from x' [choice]: towards the anchor's class ('anchor': y; with label_free,
    # the teacher's argmax on x) or the teacher's prediction on the anchor ('teacher': argmax f_t(x));
    # descending CE(f_s(xt), target) ('ce') or KL(p_t(x) || p_s(xt)) ('kl': towards the teacher's
    # distribution on the anchor; target_class is then unused).
    target_class: Literal["anchor", "teacher"] = "anchor"
    targeted_loss: Literal["ce", "kl"] = "ce"
    # DARWIN-LF (label_free): a partner whose teacher label equals its anchor's is re-drawn
    # uniformly from the batch's images of another class ('batch_other_class') or kept ('none')
    # [choice] (see partners_of_other_class).
    partner_repair: Literal["batch_other_class", "none"] = "batch_other_class"
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
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"DarwinConfig.{name} must be one of {list(allowed)}, "
                                 f"found {getattr(self, name)!r}")
        check_attack(self.eps, self.step_size, self.steps, "darwin")


def path_weights(i: int, n: int, p_t_clean: torch.Tensor, p_s_point: torch.Tensor, y: torch.Tensor,
                 gamma: float, weighting: str) -> torch.Tensor:
    """w(xh(i)|x) = (1-gamma) i/n + gamma |p_t(x)_y - p_s(xh(i))_y| / max_batch |...|.

    Computed without gradient; a zero denominator gives a zero second term. Under torchrun the
    max is over the global batch (all ranks), so the weights are those of one process. The zero
    test is a ``torch.where`` on the device: no host synchronisation (a Python ``if`` on the
    denominator waited for the GPU about 20 times per DARWIN step) and no graph break when compiled.
    """
    if weighting == "uniform":
        return torch.ones(len(y), device=y.device)
    with torch.no_grad():
        gap = (p_t_clean.gather(1, y[:, None]) - p_s_point.gather(1, y[:, None])).abs().squeeze(1)
        denom = global_max(gap.max())
        positive = denom > 0
        second = torch.where(positive, gap / torch.where(positive, denom, torch.ones_like(denom)),
                             torch.zeros_like(gap))
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


def partners_of_other_class(x, y, t_x, x_pair, y_pair, t_xp, generator=None):
    """DARWIN-LF: make every partner's class differ from its anchor's under the labels the loss
    uses (the teacher's argmax on the augmented images). The data pipeline picks partners by the
    teacher's labels of un-augmented images (or the file labels of generated images), which
    disagree for a few per cent of pairs; each such pair gets a partner drawn uniformly from the
    batch's images (anchors and partners) of another class [choice]. Returns the repaired
    (x_pair, y_pair, t_xp)."""
    clash = torch.nonzero(y_pair == y).flatten()
    if len(clash) == 0:
        return x_pair, y_pair, t_xp
    pool_x, pool_y, pool_t = torch.cat([x, x_pair]), torch.cat([y, y_pair]), torch.cat([t_x, t_xp])
    allowed = pool_y[None, :] != y[clash][:, None]                       # (clashes, 2B)
    dev = generator.device if generator is not None else x.device
    scores = torch.rand(allowed.shape, generator=generator, device=dev).to(x.device)
    pick = scores.masked_fill(~allowed, -1.0).argmax(1)
    fixable = allowed.any(1)                       # a batch of one class has nothing to offer
    clash, pick = clash[fixable], pick[fixable]
    x_pair, y_pair, t_xp = x_pair.clone(), y_pair.clone(), t_xp.clone()
    x_pair[clash], y_pair[clash], t_xp[clash] = pool_x[pick], pool_y[pick], pool_t[pick]
    return x_pair, y_pair, t_xp


def targeted_loss(cfg: DarwinConfig, t_x: torch.Tensor):
    """The targeted path's per-sample loss to descend, on the partner's logits: None for the
    default CE towards the target class (attacks.dual_branch_paths' own), or KL(p_t(x) || p_s(.))."""
    if cfg.targeted_loss == "ce":
        return None
    anchor = t_x.detach()
    return lambda z: kl_per_sample(anchor, z, cfg.tau)


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
    """An eval-mode model's logits on several mini-batches, joined or one by one, computed in
    inference mode (the teacher is never differentiated) and returned as normal tensors."""
    with torch.inference_mode():
        if join:
            outs = list(model(torch.cat(points)).float().split([len(p) for p in points]))
        else:
            outs = [model(p).float() for p in points]
    return [o.clone() for o in outs]


def darwin_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                x_pair: torch.Tensor | None, y_pair: torch.Tensor | None, config: DarwinConfig,
                generator: torch.Generator | None = None, autocast=contextlib.nullcontext
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_ARKD + lambda_iakd L_IAKD + lambda_dbkd L_DBKD (docs/methods.md), returning (loss, parts).

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
            if t_xp is not None and cfg.partner_repair == "batch_other_class":
                x_pair, y_pair, t_xp = partners_of_other_class(x, y, t_x, x_pair, y_pair, t_xp, generator)

        start = cfg.start_kind if cfg.random_start else None
        kw = dict(eps=cfg.eps, alpha=cfg.step_size, steps=n, start=start, bn_mode=cfg.attack_bn_mode,
                  generator=generator, autocast=autocast, clamp_start=cfg.clamp_start)
        if cfg.use_dbkd:
            target = y if cfg.target_class == "anchor" else t_x.argmax(1)
            path_u, path_t = attacks.dual_branch_paths(student, x, y, x_pair, target=target, joint=join,
                                                       target_loss=targeted_loss(cfg, t_x), **kw)
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
    return darwin_terms(cfg, t_x, t_xp, t_path, s_x, s_u, s_t, y, y_pair)


def darwin_terms(cfg: DarwinConfig, t_x: torch.Tensor, t_xp: torch.Tensor | None, t_path: list,
                 s_x: torch.Tensor, s_u: list, s_t: list, y: torch.Tensor, y_pair: torch.Tensor | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DARWIN's loss from the logits alone (a pure function of tensors, no host synchronisation,
    compilable with ``fullgraph=True``): teacher logits ``t_x``, ``t_xp`` (partners; None without
    DBKD) and ``t_path`` (on xh(1..n); None where unused), student logits ``s_x``, ``s_u`` (xh(1..n))
    and ``s_t`` (xt(1..n)), labels ``y`` and ``y_pair``. Returns (loss, {'arkd', 'iakd', 'dbkd'})."""
    n = cfg.steps
    need_path = cfg.use_iakd or cfg.use_dbkd
    classes = t_x.shape[1]

    def kl(target, logits, weight=None):   # a KL term, reduced as kl_reduction says
        per = kl_per_sample(target, logits, cfg.tau)
        return reduce_kl(per if weight is None else weight * per, classes, cfg.kl_reduction)

    arkd = kl(t_x, s_x) + cfg.beta * kl(t_path[-1], s_u[-1])
    zero = torch.zeros((), device=t_x.device)
    iakd, dbkd = zero, zero
    if need_path:
        p_t_x = F.softmax(t_x / cfg.tau, 1)
        w_u = [path_weights(i, n, p_t_x, F.softmax(s_u[i - 1].detach() / cfg.tau, 1), y, cfg.gamma,
                            cfg.weighting) for i in range(1, n + 1)]
    if cfg.use_iakd:
        iakd = sum(kl(t_path[i - 1], s_u[i - 1], w_u[i - 1]) for i in range(1, n)) if n > 1 else zero
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


def check_run(cfg: DarwinConfig, device: torch.device, sync_bn: bool) -> None:
    """Refuse what would silently change the method: the joint forward keeps per-point batch
    norm by grouping ``BatchNorm2d`` layers, which ``SyncBatchNorm`` layers are not."""
    if sync_bn and resolve_batching(cfg.batching, device) and cfg.loss_forward == "per_point":
        raise InputError("run.sync_bn: true cannot keep DARWIN's per-point batch norm in the joint "
                         f"forward (batching {cfg.batching!r} on {device.type}): set the method's "
                         "batching: split (per-point forwards through SyncBatchNorm) or run.sync_bn: false")


@dataclass(frozen=True)
class Ablation:
    """One row of the slides' two DARWIN ablation tables: a named override of the DARWIN settings.

    Every variant sets all four fields the tables vary (modules and weighting), so a row means the
    same whatever ``distill.settings.darwin`` says about them; the other settings (eps, steps,
    beta, lambdas, margin, ...) are the user's."""

    name: str
    tables: tuple[str, ...]        # "modules" (Impact of each module), "weighting" (Diverse weighting strategies)
    label: str                     # the row's name in the weighting table
    settings: dict

    @property
    def modules(self) -> tuple[bool, bool, bool]:
        """(ARKD, IAKD, DBKD) switched on: the module table's check marks."""
        return True, bool(self.settings["use_iakd"]), bool(self.settings["use_dbkd"])


def _ablation(name, tables, label, use_iakd=True, use_dbkd=True, weighting="adaptive", gamma=0.5):
    return Ablation(name, tables, label, {"use_iakd": use_iakd, "use_dbkd": use_dbkd,
                                          "weighting": weighting, "gamma": gamma})


# The slides' ablations (docs/methods.md#darwin, "Ablations"): modules ARKD; ARKD+IAKD; ARKD+DBKD;
# all three, each with the default adaptive weighting (gamma 0.5); weighting uniform (w = 1),
# gamma = 0 (w = i/n), gamma = 1 (the adaptive term alone), gamma = 0.5, each with all three
# modules. "full" is both tables' shared row (all modules, gamma 0.5): trained once.
ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    _ablation("arkd", ("modules",), "ARKD", use_iakd=False, use_dbkd=False),
    _ablation("arkd_iakd", ("modules",), "ARKD + IAKD", use_dbkd=False),
    _ablation("arkd_dbkd", ("modules",), "ARKD + DBKD", use_iakd=False),
    _ablation("full", ("modules", "weighting"), "gamma = 0.5"),
    _ablation("uniform", ("weighting",), "uniform", weighting="uniform"),
    _ablation("gamma0", ("weighting",), "gamma = 0", gamma=0.0),
    _ablation("gamma1", ("weighting",), "gamma = 1", gamma=1.0),
)}


def ablation_settings(base: dict, name: str) -> dict:
    """``base`` (a ``distill.settings.darwin`` block) with ablation ``name``'s overrides."""
    if name not in ABLATIONS:
        raise InputError(f"unknown DARWIN ablation {name!r}; expected one of {list(ABLATIONS)}")
    return {**(base or {}), **ABLATIONS[name].settings}


def partner_options(cfg: DarwinConfig) -> dict:
    """The partner settings the data pipeline reads (robustkd.data.TrainBatches' keywords)."""
    return {"partner_sampling": cfg.partner_sampling, "partner_pool": cfg.partner_pool,
            "partner_augment": cfg.partner_augment}


def darwin_objective(model, teacher, batch, cfg: DarwinConfig, step):
    return darwin_loss(model, teacher, batch.x, batch.y, batch.x_pair, batch.y_pair, cfg,
                       generator=step.generator, autocast=step.autocast)


# The paper's schedule is not public [choice]: the field's common 200-epoch recipe.
DARWIN_SCHEDULE = Schedule(epochs=200, lr=0.1, weight_decay=2e-4, milestones=(100, 150),
                           source="not published; ARD/IAD's 200-epoch recipe [choice]", official=False)

register(Method(
    name="darwin", config=DarwinConfig, loss=darwin_objective, role="student",
    summary="DARWIN: ARKD + intermediate-path IAKD + dual-branch DBKD",
    source="Dong et al., CVPR 2024 (slides); no official code; docs/methods.md#darwin",
    # labels: the untargeted attack's CE, the targeted path's class, the weights' class index and
    # the partner's class; the slides' column marks DARWIN x (docs/methods.md, "Labels")
    uses_labels=True, slides_labels=False, needs_partners=lambda cfg: cfg.use_dbkd, check_run=check_run,
    partner_options=partner_options,
    schedules={"cifar10": DARWIN_SCHEDULE, "cifar100": DARWIN_SCHEDULE}))
