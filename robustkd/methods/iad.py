"""IAD-I, Introspective Adversarial Distillation (Zhu, Yao, Han, Liu, Niu, Hsu, Chen, Sugiyama,
ICLR 2022), as the official code ``IAD-I.py`` computes it (docs/official-baselines.md, "IAD").

    attack: ARD's (PGD on the student's CE from x + U(-eps, eps), unclamped start, train mode)
    loss:   alpha [T^2 KL(p_t^T(x) || p_s^T(x')) + (1 - A) KL(p_s(x) || p_s(x'))]
            + (1 - alpha) CE(f_s(x), y),  batchmean,
            A = p_t(x')_y ^ beta, active from ``introspection_start_epoch`` (before it A = 1)
The introspection term backpropagates through the student's clean prediction p_s(x), as the
official code does (``detach_introspection_target: false``). The official step also forwards the
student (train mode) once more on x' (unused) and on x for the CE term even at alpha = 1; those
forwards move batch norm's running statistics, and ``official_forwards`` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import attacks
from ..attacks import kl_per_sample
from .ard import ARD_SCHEDULE
from .common import ALPHA, EPS, check_attack, reduce_kl, teacher_logits
from .registry import Method, register


@dataclass
class IadConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    temperature: float = 1.0
    alpha: float = 1.0                    # weight of the distillation terms (official --alpha 1.0)
    beta: float = 0.1                     # exponent of the teacher's true-class probability
    introspection_start_epoch: int = 60   # 0-based epoch from which A < 1 applies
    attack_bn_mode: Literal["eval", "train"] = "train"
    clamp_start: bool = False             # official: first gradient at the unclamped start
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "batchmean"
    detach_introspection_target: bool = False   # official: gradient flows through p_s(x)
    official_forwards: bool = True        # the official step's extra train-mode forwards (BN statistics)

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "iad")


def iad_loss(student, teacher, batch, cfg: IadConfig, step):
    x, y = batch.x, batch.y
    x_adv = attacks.pgd_ce(student, x, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", clamp_start=cfg.clamp_start, bn_mode=cfg.attack_bn_mode,
                           generator=step.generator, autocast=step.autocast)
    introspect = step.epoch >= cfg.introspection_start_epoch
    t_out = teacher_logits(teacher, torch.cat([x, x_adv]) if introspect else x, step.autocast)
    t_x = t_out[:len(x)]
    with step.autocast():
        s_adv = student(x_adv).float()
        if cfg.official_forwards:
            with torch.no_grad():
                student(x_adv)                                  # official: an unused forward on x'
        s_x = student(x).float() if introspect else None
        s_ce = student(x).float() if (cfg.official_forwards or cfg.alpha < 1) else None
    T = cfg.temperature
    C = t_x.shape[1]
    kd_per = kl_per_sample(t_x, s_adv, T) * T * T
    if introspect:
        a = F.softmax(t_out[len(x):], 1).gather(1, y[:, None]).squeeze(1).pow(cfg.beta)
        target = s_x.detach() if cfg.detach_introspection_target else s_x
        intro_per = (1 - a) * kl_per_sample(target, s_adv)
    else:
        intro_per = torch.zeros_like(kd_per)
    kd = reduce_kl(kd_per, C, cfg.kl_reduction)
    intro = reduce_kl(intro_per, C, cfg.kl_reduction)
    ce = F.cross_entropy(s_ce, y) if s_ce is not None else torch.zeros((), device=x.device)
    loss = cfg.alpha * (kd + intro) + (1 - cfg.alpha) * ce
    return loss, {"kd": kd.detach(), "introspection": intro.detach(), "ce": ce.detach()}


register(Method(
    name="iad", config=IadConfig, loss=iad_loss, role="student",
    summary="IAD-I: ARD with the teacher's reliability weighting a self-introspection term",
    source="ZFancy/IAD IAD-I.py (docs/official-baselines.md#iad)",
    uses_labels=True, slides_labels=True, schedules={"cifar10": ARD_SCHEDULE, "cifar100": ARD_SCHEDULE}))
