"""ARD, Adversarially Robust Distillation (Goldblum, Fowl, Feizi, Goldstein, AAAI 2020), as the
official code computes it (docs/official-baselines.md, "ARD": repository, file and commit).

    attack: PGD on the student's CE from x + U(-eps, eps) (first gradient at the unclamped
            start), the student in TRAIN mode (batch norm moves during the attack)
    loss:   alpha T^2 KL(p_t^T(x) || p_s^T(x')) + (1 - alpha) CE(f_s(x), y),
            KL averaged over batch x classes (nn.KLDivLoss()), T = 30, alpha = 1
The official step forwards the student on x' and then on x even when alpha = 1 (the clean
term's weight is 0 but its forward moves batch norm's running statistics): so does this one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch.nn.functional as F

from .. import attacks
from ..attacks import kl_per_sample
from .common import ALPHA, EPS, check_attack, reduce_kl, teacher_logits
from .registry import Method, Schedule, register


@dataclass
class ArdConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    temperature: float = 30.0             # T (official --temp 30)
    alpha: float = 1.0                    # weight of the KD term (official --alpha 1.0)
    attack_bn_mode: Literal["eval", "train"] = "train"   # official: the attack runs in train mode
    clamp_start: bool = False             # official: first gradient at the unclamped start
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "elementwise_mean"  # official nn.KLDivLoss()

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "ard")


def ard_loss(student, teacher, batch, cfg: ArdConfig, step):
    x, y = batch.x, batch.y
    x_adv = attacks.pgd_ce(student, x, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", clamp_start=cfg.clamp_start, bn_mode=cfg.attack_bn_mode,
                           generator=step.generator, autocast=step.autocast)
    t_x = teacher_logits(teacher, x, step.autocast)
    with step.autocast():
        s_adv = student(x_adv).float()
        s_x = student(x).float()
    T = cfg.temperature
    kd = reduce_kl(kl_per_sample(t_x, s_adv, T), t_x.shape[1], cfg.kl_reduction)
    ce = F.cross_entropy(s_x, y)
    loss = cfg.alpha * T * T * kd + (1 - cfg.alpha) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach()}


# The official adjust_learning_rate divides a copy of the initial lr at each milestone, so its
# --lr_schedule 100 150 decays once: 0.1 -> 0.01 from epoch 100 (docs/official-baselines.md).
ARD_SCHEDULE = Schedule(epochs=200, lr=0.1, weight_decay=2e-4, milestones=(100,),
                        source="ARD official main.py: lr 0.1 -> 0.01 from epoch 100 (the coded "
                               "schedule; the intended second decay at 150 never happens)")

register(Method(
    name="ard", config=ArdConfig, loss=ard_loss, role="student",
    summary="ARD: KD at temperature 30 on the student's CE-PGD examples",
    source="goldblum/AdversariallyRobustDistillation (docs/official-baselines.md#ard)",
    uses_labels=True, slides_labels=True,
    schedules={"cifar10": ARD_SCHEDULE, "cifar100": replace(ARD_SCHEDULE, batch_size=256)}))
